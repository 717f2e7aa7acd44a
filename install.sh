#!/usr/bin/env bash
# Create .venv and install everything the project needs. Safe to re-run.
# open3d (used by utils/preprocessing.py) needs the system library libusb-1.0; on Debian/Ubuntu it is installed
# here when missing. Code that does not need open3d never imports it.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

if ! ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so'; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    echo "installing libusb-1.0 (needed by open3d)"
    $SUDO apt-get install -y -q libusb-1.0-0 >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q libusb-1.0-0 >/dev/null; }
  else
    echo "warning: libusb-1.0 not found and apt-get unavailable: open3d will not import (only" \
         "utils/preprocessing.py needs it)" >&2
  fi
fi

# The report's browser tests (tests/unit/report/test_browser.py) drive the system's Chromium through playwright; on
# Debian/Ubuntu it is installed here when missing and we are root (elsewhere those tests skip, saying why).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
  echo "installing chromium (for the report's browser tests)"
  apt-get install -y -q chromium >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } \
    || echo "warning: chromium could not be installed: the report's browser tests will skip" >&2
fi

if [ ! -x .venv/bin/python ]; then "$PYTHON" -m venv .venv; fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
# the package itself, editable: `import m3dm` from anywhere, and the console scripts (m3dm, m3dm-predict, ...)
.venv/bin/python -m pip install -q --no-deps -e .
.venv/bin/python -c "import torch, timm, open3d; print(f'installed: torch {torch.__version__}, timm {timm.__version__}, open3d {open3d.__version__}')"
