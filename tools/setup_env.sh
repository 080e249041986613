#!/usr/bin/env bash
# Create, or bring up to date, the isolated environment this checkout runs in.
#
#   bash tools/setup_env.sh                  # CPU: mmcv's ops compiled for the CPU
#   FORCE_CUDA=1 bash tools/setup_env.sh     # GPU: mmcv's CUDA ops too (needs nvcc
#                                            # matching torch's CUDA, and CUDA_HOME)
#   MMCV_FIND_LINKS=https://download.openmmlab.com/mmcv/dist/cu121/torch2.1/index.html \
#   TORCH_VERSION=2.1.2 TORCHVISION_VERSION=0.16.2 bash tools/setup_env.sh
#                                            # GPU: OpenMMLab's prebuilt mmcv wheel
#   bash tools/setup_env.sh --offline DIR    # a node without network, on its own torch:
#                                            # tools/setup_offline.sh DIR (a bundle made
#                                            # by tools/offline_bundle.sh)
#
# Steps: (1) virtual environment in the checkout (.venv), (2) torch + torchvision,
# (3) mmcv 2.1.0 with its ops, compiled against that torch, (4) the OpenMMLab stack and
# test tools (requirements/*.txt), (5) colora_mm in editable mode, (6) an import check.
# Idempotent: each step checks before it acts. The compiled mmcv wheel is cached under
# ~/.cache/colora_mm/mmcv-2.1.0/torch-<torch version>-<cpu|cuda>/, one wheel per Python
# version, so a second set-up takes seconds and a wheel built against another torch is
# never reused.
#
# Environment: PYTHON (interpreter for the venv; default python3.11, else python3),
# COLORA_VENV (default <checkout>/.venv), COLORA_CACHE (default ~/.cache/colora_mm),
# TORCH_VERSION / TORCHVISION_VERSION (default 2.14.1 / 0.29.1), FORCE_CUDA,
# MMCV_FIND_LINKS, MAX_JOBS (compile jobs; default: number of cores).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "${1:-}" = "--offline" ]; then
  shift
  exec bash "$ROOT/tools/setup_offline.sh" "$@"
fi
VENV="${COLORA_VENV:-$ROOT/.venv}"
TORCH_VERSION="${TORCH_VERSION:-2.14.1}"
TORCHVISION_VERSION="${TORCHVISION_VERSION:-0.29.1}"
MMCV_VERSION="2.1.0"
CACHE="${COLORA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/colora_mm}"
FORCE_CUDA="${FORCE_CUDA:-0}"
MMCV_FIND_LINKS="${MMCV_FIND_LINKS:-}"

t0=$SECONDS
step_name=''; step_t0=$SECONDS
step() {  # one line per step; a numbered step (N/M) or "done" first times the last one
  if [[ "$1" =~ ^([0-9]+/[0-9]+|done) ]]; then
    [ -n "$step_name" ] && printf '[setup]     step %s took %d s\n' "$step_name" $((SECONDS - step_t0))
    step_name=${BASH_REMATCH[1]}; step_t0=$SECONDS
  fi
  printf '[setup] %s\n' "$*"
}
fail() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3.11; command -v "$PYTHON" >/dev/null || PYTHON=python3
fi
command -v "$PYTHON" >/dev/null || fail "$PYTHON not found; set PYTHON=/path/to/python3.11"

# 1. virtual environment
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import pip' 2>/dev/null; then
  step "1/6 virtual environment $VENV exists"
else
  step "1/6 creating virtual environment $VENV ($PYTHON)"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
# pip, quiet, without the notices about this machine's unused local index folders
# and a heartbeat line every 30 s while it runs
pip_q() {
  local t=$SECONDS beat rc
  ( while sleep 30 && kill -0 $$ 2>/dev/null; do
      printf '[setup]     ... pip %s still running, %d s\n' "$1" $((SECONDS - t)); done ) &
  beat=$!
  "$PY" -m pip --disable-pip-version-check "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }
  rc=${PIPESTATUS[0]}
  kill "$beat" 2>/dev/null; wait "$beat" 2>/dev/null || true
  return "$rc"
}
have() {  # have DIST VERSION: is exactly that release installed (local tag ignored)?
  "$PY" - "$1" "$2" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if version(sys.argv[1]).split('+')[0] == sys.argv[2] else 1)
PYEOF
}

# 2. torch + torchvision
if have torch "$TORCH_VERSION" && have torchvision "$TORCHVISION_VERSION"; then
  step "2/6 torch $TORCH_VERSION / torchvision $TORCHVISION_VERSION present"
else
  # torch's CUDA build with its libraries takes about 5.5 GiB in the venv, and pip
  # unpacks it beside; stop before starting rather than midway with ENOSPC
  need_kib=$((7 * 1024 * 1024))
  free_kib=$(df -Pk "$VENV" | awk 'NR == 2 {print $4}')
  if [ -n "$free_kib" ] && [ "$free_kib" -lt "$need_kib" ]; then
    fail "installing torch into $VENV needs about 7 GiB free on its disk, $((free_kib / 1024)) MiB are free ($(df -P "$VENV" | awk 'NR == 2 {print $6}')); free some space or point COLORA_VENV at a disk with room"
  fi
  step "2/6 installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION (about 2 minutes from this machine's wheels, longer from PyPI)"
  pip_q install --quiet "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi
# torch.__version__ (with the build tag, e.g. 2.14.1+cu130), read without importing torch
TORCH_FULL=$("$PY" -c 'import importlib.util as u, os
ns = {}
exec(open(os.path.join(os.path.dirname(u.find_spec("torch").origin), "version.py")).read(), ns)
print(ns["__version__"])')
PYTAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')

# 3. mmcv with its ops, built for exactly this torch
variant=cpu
if [ "$FORCE_CUDA" = "1" ]; then  # CUDA wheels also differ by the GPU architectures built
  variant=cuda; [ -n "${TORCH_CUDA_ARCH_LIST:-}" ] && variant="cuda-$(echo "$TORCH_CUDA_ARCH_LIST" | tr -c '0-9a-zA-Z.\n' '_')"
fi
if [ -n "$MMCV_FIND_LINKS" ]; then
  built_for="prebuilt $MMCV_FIND_LINKS"
else
  built_for="torch-$TORCH_FULL-$variant"
fi
MARKER="$VENV/.mmcv-built-for"
has_ops() {  # mmcv's compiled extension is installed (step 6 imports it)
  "$PY" -c 'import importlib.util as u, os, sys
spec = u.find_spec("mmcv")
root = os.path.dirname(spec.origin) if spec else ""
sys.exit(0 if root and any(f.startswith("_ext") for f in os.listdir(root)) else 1)' 2>/dev/null
}
if have mmcv "$MMCV_VERSION" && [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$built_for" ] \
   && has_ops; then
  step "3/6 mmcv $MMCV_VERSION with ops present ($built_for)"
elif [ -n "$MMCV_FIND_LINKS" ]; then
  step "3/6 installing OpenMMLab's prebuilt mmcv $MMCV_VERSION from $MMCV_FIND_LINKS"
  pip_q install --quiet --force-reinstall --no-deps --only-binary mmcv \
    -f "$MMCV_FIND_LINKS" "mmcv==$MMCV_VERSION"
  echo "$built_for" > "$MARKER"
else
  WHEELS="$CACHE/mmcv-$MMCV_VERSION/torch-$TORCH_FULL-$variant"
  wheel=$(ls "$WHEELS"/mmcv-"$MMCV_VERSION"-"$PYTAG"-*.whl 2>/dev/null | head -n1 || true)
  if [ -n "$wheel" ]; then
    step "3/6 installing cached mmcv wheel $wheel"
  else
    jobs="${MAX_JOBS:-$(nproc)}"
    log="$VENV/mmcv-build.log"
    step "3/6 compiling mmcv $MMCV_VERSION with its ops against torch $TORCH_FULL ($variant, $jobs jobs): about 15 minutes on 2 cores, longer on a busy machine; log: $log"
    # setuptools < 81: mmcv's setup.py (and mmengine at run time) import pkg_resources
    pip_q install --quiet "setuptools>=64,<81" wheel ninja "numpy>=1.23,<2"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    trap 'exit 130' INT TERM
    pip_q download --quiet --no-deps --no-binary :all: -d "$tmp" "mmcv==$MMCV_VERSION"
    tar xzf "$tmp/mmcv-$MMCV_VERSION.tar.gz" -C "$tmp"
    # torch >= 2.10 headers need C++20; mmcv 2.1.0's setup.py hard-codes -std=c++17.
    sed -i 's/-std=c++17/-std=c++20/g' "$tmp/mmcv-$MMCV_VERSION/setup.py"
    src="$tmp/mmcv-$MMCV_VERSION/mmcv/ops/csrc/pytorch"
    total=$(ls "$src"/*.cpp "$src"/cpu/*.cpp | wc -l)
    [ "$FORCE_CUDA" = "1" ] && total=$((total + $(ls "$src"/cuda/*.cu | wc -l)))
    # -g0 after Python's -g: no debug information (a wheel of about a third the size,
    # which an offline bundle can carry; a faster build)
    MMCV_WITH_OPS=1 FORCE_CUDA="$FORCE_CUDA" MAX_JOBS="$jobs" \
      CFLAGS="${CFLAGS:+$CFLAGS }-g0" CXXFLAGS="${CXXFLAGS:+$CXXFLAGS }-g0" \
      "$PY" -m pip wheel --no-deps --no-build-isolation --disable-pip-version-check \
      -w "$tmp/dist" "$tmp/mmcv-$MMCV_VERSION" >"$log" 2>&1 &
    build=$!
    t_build=$SECONDS
    while kill -0 "$build" 2>/dev/null; do
      sleep 60
      kill -0 "$build" 2>/dev/null || break
      done_n=$(find "$tmp/mmcv-$MMCV_VERSION/build" -name '*.o' 2>/dev/null | wc -l)
      step "    ... compiling for $((SECONDS - t_build)) s, $done_n of about $total sources done"
    done
    if ! wait "$build" || ! ls "$tmp"/dist/mmcv-*.whl >/dev/null 2>&1; then
      tail -n 40 "$log" >&2
      fail "mmcv $MMCV_VERSION failed to compile; full log: $log"
    fi
    mkdir -p "$WHEELS"
    mv "$tmp"/dist/mmcv-*.whl "$WHEELS"/
    wheel=$(ls "$WHEELS"/mmcv-"$MMCV_VERSION"-"$PYTAG"-*.whl | head -n1)
    step "    compiled in $((SECONDS - t_build)) s; cached as $wheel"
  fi
  pip_q install --quiet --force-reinstall --no-deps "$wheel"
  echo "$built_for" > "$MARKER"
fi

# 4. the OpenMMLab stack and the test tools, at the versions in requirements/*.txt
step "4/6 OpenMMLab stack and test tools (requirements/runtime.txt, requirements/tests.txt)"
pip_q install --quiet -r "$ROOT/requirements/runtime.txt" -r "$ROOT/requirements/tests.txt"

# 5. this package, editable
if "$PY" - "$ROOT" <<'PYEOF' 2>/dev/null
import importlib.util, os, sys
from importlib.metadata import version
root = os.path.realpath(sys.argv[1])
ns = {}
exec(open(os.path.join(root, 'colora_mm', 'version.py')).read(), ns)
spec = importlib.util.find_spec('colora_mm')  # locates, does not import
sys.exit(0 if spec and spec.origin and version('colora_mm') == ns['__version__']
         and os.path.realpath(spec.origin).startswith(root + os.sep) else 1)
PYEOF
then
  step "5/6 colora_mm installed in editable mode from $ROOT"
else
  step "5/6 installing colora_mm in editable mode from $ROOT"
  pip_q install --quiet --no-deps --no-build-isolation -e "$ROOT"
fi

# 6. the whole stack imports; the package's CPU kernels are built (or found built) in
# ~/.cache/colora_mm/extensions (COLORA_MM_EXT_DIR), so that the first training run
# does not stop for the compiler; where they cannot be built the package warns and runs
# PyTorch ops instead, and so does the set-up
step "6/6 checking that the stack imports; building colora_mm's CPU kernels (about 30-70 s once)"
"$PY" - <<'PYEOF'
import torch, mmcv, mmcv.ops, mmengine, mmseg, mmdet, mmpretrain, colora_mm
import mmseg.models, mmdet.models, mmpretrain.models  # noqa: E401
from colora_mm.adapters import up3x3
kernels = ('built' if up3x3.load_kernel() is not None
           else 'not built, PyTorch ops run instead (see the warning above)')
print(f'[setup] colora_mm CPU kernels: {kernels} ({up3x3.build_dir()})')
print(f'[setup] ready: colora_mm {colora_mm.__version__} | torch {torch.__version__} '
      f'(CUDA available: {torch.cuda.is_available()}) | mmcv {mmcv.__version__} | '
      f'mmengine {mmengine.__version__} | mmseg {mmseg.__version__} | '
      f'mmdet {mmdet.__version__} | mmpretrain {mmpretrain.__version__}')
PYEOF
step "done in $((SECONDS - t0)) s"
