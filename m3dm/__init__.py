"""M3DM: multimodal (RGB + 3D point cloud) industrial anomaly detection, reimplemented in PyTorch."""

__version__ = "0.1.0"
