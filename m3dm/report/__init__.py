"""The HTML report of a run (or of several runs side by side), built from its saved results alone."""

from m3dm.report.build import build_report, default_output

__all__ = ["build_report", "default_output"]
