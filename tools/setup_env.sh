#!/usr/bin/env bash
# Create (or bring up to date) the isolated environment this checkout runs in.
#
#   bash tools/setup_env.sh            # CPU ops, the default
#   FORCE_CUDA=1 bash tools/setup_env.sh   # compile mmcv's CUDA ops as well
#
# Idempotent: every step checks before it acts, and the compiled mmcv wheel is kept
# in a cache keyed by the torch version (and CPU/CUDA), so a second set-up takes
# seconds and never reuses a wheel built against another torch.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${COLORA_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
TORCH_VERSION="${TORCH_VERSION:-2.14.1}"
TORCHVISION_VERSION="${TORCHVISION_VERSION:-0.29.1}"
MMCV_VERSION="2.1.0"
CACHE="${COLORA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/colora_mm}"
FORCE_CUDA="${FORCE_CUDA:-0}"

step() { printf '[setup] %s\n' "$*"; }
t0=$SECONDS

command -v "$PYTHON" >/dev/null || { echo "[setup] error: $PYTHON not found; set PYTHON=/path/to/python3.11" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  step "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
else
  step "virtual environment $VENV exists"
fi
PY="$VENV/bin/python"
pip_q() { "$PY" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; return "${PIPESTATUS[0]}"; }

have() {  # have DIST VERSION: is exactly that version installed?
  "$PY" - "$1" "$2" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if version(sys.argv[1]).split('+')[0] == sys.argv[2] else 1)
PYEOF
}

if have torch "$TORCH_VERSION" && have torchvision "$TORCHVISION_VERSION"; then
  step "torch $TORCH_VERSION / torchvision $TORCHVISION_VERSION present"
else
  step "installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION (about a minute from a local wheel, longer from PyPI)"
  pip_q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi

step "build tools (setuptools>=77,<81: mmcv's setup.py needs pkg_resources)"
pip_q "setuptools>=77,<81" wheel ninja "numpy<2"

variant=cpu; [ "$FORCE_CUDA" = "1" ] && variant=cuda
WHEELS="$CACHE/mmcv-$MMCV_VERSION/torch-$TORCH_VERSION-$variant"
if have mmcv "$MMCV_VERSION" && "$PY" -c "import mmcv.ops" 2>/dev/null \
   && [ -f "$VENV/.mmcv-built-for" ] && [ "$(cat "$VENV/.mmcv-built-for")" = "torch-$TORCH_VERSION-$variant" ]; then
  step "mmcv $MMCV_VERSION with ops present (built for torch $TORCH_VERSION, $variant)"
else
  wheel=$(ls "$WHEELS"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$wheel" ]; then
    step "compiling mmcv $MMCV_VERSION with its ops against torch $TORCH_VERSION ($variant); about 11 minutes on 2 cores"
    mkdir -p "$WHEELS"
    tmp=$(mktemp -d)
    "$PY" -m pip download --quiet --no-deps --no-binary :all: -d "$tmp" "mmcv==$MMCV_VERSION"
    tar xzf "$tmp/mmcv-$MMCV_VERSION.tar.gz" -C "$tmp"
    # torch >= 2.10 headers require C++20; mmcv 2.1.0's setup.py hard-codes -std=c++17.
    sed -i 's/-std=c++17/-std=c++20/g' "$tmp/mmcv-$MMCV_VERSION/setup.py"
    MMCV_WITH_OPS=1 FORCE_CUDA="$FORCE_CUDA" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      "$PY" -m pip wheel --no-deps --no-build-isolation --disable-pip-version-check \
      -w "$tmp/dist" "$tmp/mmcv-$MMCV_VERSION" 2>&1 | grep -v '^WARNING: Location' || true
    ls "$tmp"/dist/mmcv-*.whl >/dev/null 2>&1 || { echo "[setup] error: mmcv $MMCV_VERSION failed to compile (log above)" >&2; exit 1; }
    mv "$tmp"/dist/mmcv-*.whl "$WHEELS"/
    rm -rf "$tmp"
    wheel=$(ls "$WHEELS"/mmcv-"$MMCV_VERSION"-*.whl | head -n1)
  else
    step "using cached mmcv wheel $wheel"
  fi
  pip_q --force-reinstall --no-deps "$wheel"
  echo "torch-$TORCH_VERSION-$variant" > "$VENV/.mmcv-built-for"
fi

step "OpenMMLab stack and test tools"
pip_q -r "$ROOT/requirements/runtime.txt" -r "$ROOT/requirements/tests.txt"

step "colora_mm (editable)"
pip_q --no-deps --no-build-isolation -e "$ROOT"

"$PY" -c "import colora_mm, mmcv.ops, mmseg, mmdet, mmpretrain; print('[setup] ready: colora_mm', colora_mm.__version__, '| torch', __import__('torch').__version__, '| mmcv', mmcv.__version__)"
step "done in $((SECONDS - t0)) s"
