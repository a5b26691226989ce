#!/usr/bin/env bash
# Everything .ci/install.sh installs, plus what the tests need: the `dev` extra (pytest, ruff,
# scikit-image, playwright, schemathesis, ...) and, from Debian, Chromium (the app's browser
# test; never `playwright install`) and Open MPI (multi-process CPU launches). Fails loudly.
set -euo pipefail
cd "$(dirname "$0")/.."

bash .ci/install.sh
python -m pip install --quiet -e ".[all,dev]"

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v mpirun >/dev/null 2>&1 || missing+=(openmpi-bin)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "error: ${missing[*]} missing; install them (Debian: apt-get install chromium openmpi-bin) or run as root" >&2
    exit 1
  fi
fi
echo "install-dev: done"
