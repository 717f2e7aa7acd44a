"""Dataset readers, per-sample transforms and on-disk formats.

The torch dataset lives in ``m3dm.data.dataset`` (imported explicitly so that preprocessing does not pay for
importing torch).
"""

from m3dm.errors import DataError
from m3dm.data.layout import Sample, available_classes, discover_samples

__all__ = ["DataError", "Sample", "available_classes", "discover_samples"]
