"""What benchmarks/gpu_check.sh needs, checked in seconds, so that a missing package is named at once rather than
deep in a traceback minutes into a GPU session.

    python3 benchmarks/gpu_preflight.py [--cpu]       # --cpu: no GPU expected (the rehearsal)
"""

from __future__ import annotations

import importlib
import platform
import sys

NEEDED = ("numpy", "torch", "timm", "tifffile", "sklearn", "scipy", "matplotlib", "yaml", "tqdm", "PIL", "pytest")
OPTIONAL = {"open3d": "the background plane is fitted by m3dm's own RANSAC (Open3D's plane)",
            "pytest_timeout": "no per-test time limit; the tests step's own limit applies"}


def main() -> None:
    missing = []
    for name in NEEDED:
        try:
            module = importlib.import_module(name)
            print(f"  {name} {getattr(module, '__version__', '')}")
        except ImportError:
            missing.append(name)
    for name, without in OPTIONAL.items():
        try:
            importlib.import_module(name)
            print(f"  {name}: installed")
        except ImportError:
            print(f"  {name}: not installed ({without})")
    if missing:
        sys.exit(f"MISSING for {sys.executable}: {', '.join(missing)}. Nothing can be installed on the GPU machine: "
                 "carry these as wheels, or run benchmarks/gpu.py alone")
    import torch

    import m3dm.app.cli
    import m3dm.preprocess.mvtec3d  # the checkout's package, importable without open3d

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"python {platform.python_version()} at {sys.executable}; torch {torch.__version__} (CUDA "
          f"{torch.version.cuda}), GPU: {gpu}; m3dm from {m3dm.__path__[0]}")
    if gpu == "none" and "--cpu" not in sys.argv:
        sys.exit("no CUDA GPU visible to torch: this check is for a GPU machine (--rehearse runs it on a CPU)")


if __name__ == "__main__":
    main()
