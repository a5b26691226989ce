#!/usr/bin/env bash
# Everything .ci/install.sh installs, plus what the tests need: the `dev` extra (pytest, ruff,
# scikit-image, playwright, schemathesis, ...), from Debian, Chromium (the app's browser
# test; never `playwright install`) and Open MPI (multi-process CPU launches), and Label
# Studio in .venv-labelstudio (the real Label Studio test). Fails loudly.
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
# Label Studio itself (the real-server test) pins numpy and others below the project's
# versions, so it gets its own venv next to .venv, and its slow first start (database
# migrations) is done once here: tests/labelstudio_server.py.
if [ ! -x .venv-labelstudio/bin/label-studio ]; then
  python -m venv .venv-labelstudio
  .venv-labelstudio/bin/python -m pip install --quiet "label-studio==1.23.2" \
    "label-studio-sdk==2.1.2"
fi
python tests/labelstudio_server.py prepare
echo "install-dev: done"
