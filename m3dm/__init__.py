"""M3DM: multimodal (RGB + 3D point cloud) industrial anomaly detection, reimplemented in PyTorch.

From Python (docs/api.md)::

    import m3dm

    model = m3dm.fit("datasets/mvtec3d/bagel", method="DINO+Point_MAE")
    model.save("models/bagel.pt")
    prediction = m3dm.load("models/bagel.pt").predict("part.png", "part.tiff")

``import m3dm`` stays light: the names below are imported from ``m3dm.api`` and ``m3dm.config`` on first use, so
torch, open3d, matplotlib and scikit-learn load only when a model is fitted or loaded.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {"fit": "m3dm.api", "load": "m3dm.api", "Model": "m3dm.api", "Prediction": "m3dm.api",
         "Evaluation": "m3dm.api", "Settings": "m3dm.config", "read_settings": "m3dm.config",
         "settings_yaml": "m3dm.config"}
__all__ = ["Evaluation", "Model", "Prediction", "Settings", "__version__", "fit", "load", "read_settings",
           "settings_yaml"]

if TYPE_CHECKING:  # for type checkers only (import-linter leaves these out: pyproject.toml)
    from m3dm.api import Evaluation, Model, Prediction, fit, load
    from m3dm.config import Settings, read_settings, settings_yaml


def __getattr__(name: str) -> Any:
    """The public names, imported when first asked for (PEP 562). ``importlib``, not an import statement: the
    package itself is imported by the layers below the API (its ``__version__``), which must not depend on it."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'm3dm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
