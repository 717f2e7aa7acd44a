"""``python -m m3dm.export --model results/models/<class>.pt --format onnx [--out FILE]``: see m3dm.export.cli."""

from m3dm.export.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
