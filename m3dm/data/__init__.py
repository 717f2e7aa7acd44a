"""Data: on-disk formats, sample discovery and pairing, per-sample tensors, the loader and synthetic data.

The torch dataset lives in ``m3dm.data.dataset`` (imported explicitly so that preprocessing does not pay for
importing torch).
"""

from m3dm.data.layout import Sample, available_classes, discover_samples

__all__ = ["Sample", "available_classes", "discover_samples"]
