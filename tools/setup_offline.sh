#!/usr/bin/env bash
# Install colora_mm's stack on a node without network that has its own PyTorch (CUDA or
# not), from a bundle made by tools/offline_bundle.sh on a machine with a package index.
#
#   bash tools/setup_offline.sh BUNDLE_DIR        # same as: bash tools/setup_env.sh --offline BUNDLE_DIR
#
# Steps: (1) checks the bundle (every file's sha256, its Python version) and the node
# (torch, numpy, pillow, OpenCV, scipy, matplotlib; nvcc when torch sees a GPU);
# (2) a virtual environment layered on the node's Python: its own site-packages first,
# then every site folder of the interpreter that has torch (so the node's torch, numpy and
# CUDA libraries are used as they are, and nothing of the node is changed);
# (3) the bundle's wheels with pip --no-index --find-links BUNDLE_DIR: requirements.txt
# with dependencies (pip keeps what the node already has at a fitting version), then
# mmengine / mmsegmentation / mmdet / mmpretrain with --no-deps (mmengine's metadata asks
# for `opencv-python` and matplotlib, which the node's OpenCV / the optional matplotlib
# stand in for); (4) mmcv 2.1.0 with its ops, compiled from the bundle's source release
# against the node's torch: with CUDA when torch sees a GPU, for that GPU's architecture
# only (TORCH_CUDA_ARCH_LIST from torch.cuda.get_device_capability()), on every core;
# a wheel already built for exactly this torch, architecture and Python is reused from the
# cache (~/.cache/colora_mm/mmcv-2.1.0/torch-<torch version>-<cpu|cuda-ARCH>/, shared
# with tools/setup_env.sh) or from BUNDLE_DIR/mmcv-build/torch-<...>/ (the same layout,
# '+' written '_', for nodes whose cache does not last); (5) colora_mm in editable mode; (6) setup_env.sh's
# import check, and pip check.
#
# Versions: the node's numpy 2.x is kept; mmcv 2.1.0's ops do not use numpy's C API, and
# the OpenMMLab 2.x code that runs here works with numpy 2 (the test suite passes on
# numpy 2.4). setuptools < 81 (mmengine imports pkg_resources) is installed into the
# environment from the bundle, over the node's newer one.
#
# Environment: PYTHON (the node's interpreter that has torch; default python3),
# COLORA_VENV (default <checkout>/.venv; `none` installs into PYTHON's own environment
# instead), COLORA_CACHE (default ~/.cache/colora_mm), MAX_JOBS (compile jobs; default
# all cores), FORCE_CUDA (default 1 when torch sees a GPU, else 0), TORCH_CUDA_ARCH_LIST
# (default the visible GPU's, e.g. 9.0), CUDA_HOME (default torch's guess: nvcc on PATH,
# /usr/local/cuda).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MMCV_VERSION="2.1.0"
CACHE="${COLORA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/colora_mm}"
PYTHON="${PYTHON:-python3}"

t0=$SECONDS
step() { printf '[offline] %s\n' "$*"; }
fail() { printf '[offline] error: %s\n' "$*" >&2; exit 1; }

[ $# -eq 1 ] && [ "${1#-}" = "$1" ] || fail "usage: bash tools/setup_offline.sh BUNDLE_DIR (a folder made by tools/offline_bundle.sh)"
DIR="$1"
[ -f "$DIR/manifest.json" ] || fail "$DIR has no manifest.json: not a bundle; make one with 'bash tools/offline_bundle.sh DIR' on a machine with a package index"
DIR="$(cd "$DIR" && pwd)"
command -v "$PYTHON" >/dev/null || fail "$PYTHON not found; set PYTHON to the interpreter that has the node's torch"
PYTHON="$(command -v "$PYTHON")"

# 1. the bundle and the node
step "1/6 checking the bundle $DIR and the node's Python $PYTHON"
node_env=$("$PYTHON" - "$DIR" "${FORCE_CUDA:-}" "${TORCH_CUDA_ARCH_LIST:-}" <<'PYEOF'
import hashlib, importlib, json, os, re, shlex, subprocess, sys
bundle, force_cuda, arch_list = sys.argv[1:4]
say = lambda m: print(f'[offline]     {m}', file=sys.stderr)
errors = []
manifest = json.load(open(os.path.join(bundle, 'manifest.json')))
for e in manifest['files']:
    path = os.path.join(bundle, e['file'])
    if not os.path.isfile(path):
        errors.append(f"{e['file']} is missing from the bundle; copy the whole folder again")
        continue
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    if h.hexdigest() != e['sha256']:
        errors.append(f"{e['file']} differs from the manifest (sha256); copy it again")
here = f'{sys.version_info[0]}.{sys.version_info[1]}'
if manifest['python'] != here:
    errors.append(f"the bundle is for Python {manifest['python']}, this interpreter is "
                  f"{here}; rebuild it with 'bash tools/offline_bundle.sh DIR --python {here}'")
say(f"bundle: {len(manifest['files'])} files, {manifest['total_bytes'] / 2**20:.1f} MiB, "
    f"CPython {manifest['python']} {manifest['platform']}, groups: "
    f"{', '.join(manifest['groups']) or 'none'}")


def version(module):
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return None


groups = set(manifest['groups'])
torch_v = version('torch')
if torch_v is None:
    sys.exit(f'[offline] error: {sys.executable} has no torch; set PYTHON to the '
             "interpreter that has the node's PyTorch")
import torch  # noqa: E402
cuda = torch.cuda.is_available() and torch.version.cuda is not None
use_cuda = cuda if force_cuda == '' else force_cuda == '1'
say(f'torch {torch_v} (CUDA {torch.version.cuda}, GPU visible: {cuda})')
need = dict(numpy=('numpy', 'numpy', 'torchvision needs it too'),
            PIL=('pillow', 'pillow', 'torchvision needs it too'),
            cv2=('OpenCV', 'opencv', 'mmcv imports cv2'),
            scipy=('scipy', 'scipy', 'mmseg.models and mmdet.models import it'))
for module, (what, group, why) in need.items():
    v = version(module)
    if v is not None:
        say(f'{what} {v}: the node\'s')
    elif group in groups:
        say(f'{what}: from the bundle')
    else:
        errors.append(f'no {what} on this node and none in the bundle ({why}): install '
                      f"it on the node, or rebuild the bundle with '--include {group}'")
v = version('matplotlib')
if v is not None:
    say(f"matplotlib {v}: the node's")
elif 'matplotlib' in groups:
    say('matplotlib: from the bundle')
else:
    say('matplotlib: none (only drawing needs it: visualisers, tools/demo.py\'s figure, '
        "tools/analysis; '--include matplotlib' packs it)")
arch = ''
cpath = []
cuda_home = ''
if use_cuda:
    if not cuda:
        errors.append('FORCE_CUDA=1 but torch sees no GPU (or is a CPU build)')
    else:
        major, minor = torch.cuda.get_device_capability()
        arch = arch_list or f'{major}.{minor}'
        say(f'GPU: {torch.cuda.get_device_name()} (compute capability {major}.{minor}); '
            f'mmcv ops for TORCH_CUDA_ARCH_LIST={arch}')
        from torch.utils.cpp_extension import CUDA_HOME

        def toolkit(home):
            return bool(home) and all(os.path.isfile(os.path.join(home, *p)) for p in (
                ('bin', 'nvcc'), ('include', 'cuda_runtime_api.h')))

        if not os.environ.get('CUDA_HOME') and not toolkit(CUDA_HOME):
            # torch guesses from `nvcc` on PATH, which may be a wrapper script
            import glob
            v = torch.version.cuda
            for home in [f'/usr/local/cuda-{v}', '/usr/local/cuda'] + sorted(
                    glob.glob(f"/usr/local/cuda-{v.split('.')[0]}.*"), reverse=True):
                if toolkit(home):
                    say(f'CUDA_HOME={home} (torch guessed {CUDA_HOME}, which is no toolkit)')
                    CUDA_HOME = home
                    break
        cuda_home = CUDA_HOME or ''
        nvcc = os.path.join(CUDA_HOME or '', 'bin', 'nvcc')
        if not CUDA_HOME or not os.path.isfile(nvcc):
            errors.append('no CUDA compiler: set CUDA_HOME to the CUDA toolkit of '
                          f'torch\'s CUDA {torch.version.cuda} (the folder with bin/nvcc), '
                          'or FORCE_CUDA=0 for CPU ops only')
        else:
            out = subprocess.run([nvcc, '--version'], capture_output=True, text=True).stdout
            m = re.search(r'release (\d+)\.(\d+)', out)
            nv = m.group(0).split()[1] if m else '?'
            say(f'nvcc {nv} ({nvcc})')
            if m and m.group(1) != torch.version.cuda.split('.')[0]:
                errors.append(f'nvcc {nv} and torch\'s CUDA {torch.version.cuda} differ in '
                              'their major version; set CUDA_HOME to a matching toolkit')
            # torch's ATen/cuda headers include the cuBLAS / cuSPARSE / cuSOLVER headers;
            # a toolkit with the compiler alone lacks them, while the nvidia-* wheels
            # that CUDA torch depends on carry them (site-packages/nvidia/*/include)
            if not os.path.isfile(os.path.join(CUDA_HOME, 'include', 'cuda_runtime_api.h')):
                errors.append(f'{CUDA_HOME} (CUDA_HOME) has no include/cuda_runtime_api.h: '
                              'set CUDA_HOME to the CUDA toolkit folder (bin/nvcc, include/)')
            wanted = ('cusparse.h', 'cublas_v2.h', 'cusolverDn.h')
            missing = [h for h in wanted
                       if not os.path.isfile(os.path.join(CUDA_HOME, 'include', h))]
            if missing:
                import glob
                found = {}
                for p in sys.path:
                    for inc in sorted(glob.glob(os.path.join(p, 'nvidia', '*', 'include'))):
                        for h in missing:
                            if h not in found and os.path.isfile(os.path.join(inc, h)):
                                found[h] = inc
                if len(found) < len(missing):
                    errors.append(f"{', '.join(h for h in missing if h not in found)} "
                                  f'neither in {CUDA_HOME}/include nor in the nvidia-* '
                                  'packages of this Python: set CUDA_HOME to a complete '
                                  'CUDA toolkit')
                cpath = sorted(set(found.values()))
                say(f"{', '.join(missing)} not in {CUDA_HOME}/include: from "
                    f"{', '.join(cpath)} (CPATH)")
if errors:
    for e in errors:
        print(f'[offline] error: {e}', file=sys.stderr)
    sys.exit(1)
ns = {}
exec(open(os.path.join(os.path.dirname(torch.__file__), 'version.py')).read(), ns)
sites = [p for p in sys.path if os.path.basename(p) in ('site-packages', 'dist-packages')
         and os.path.isdir(p)]
for key, value in dict(TORCH_FULL=ns['__version__'], USE_CUDA=int(use_cuda), ARCH=arch,
                       HAS_CV2=int(version('cv2') is not None),
                       EXTRA_CPATH=os.pathsep.join(cpath), BUILD_CUDA_HOME=cuda_home,
                       PYTAG=f'cp{sys.version_info[0]}{sys.version_info[1]}',
                       NODE_SITES=os.pathsep.join(sites)).items():
    print(f'{key}={shlex.quote(str(value))}')
PYEOF
) || exit 1
eval "$node_env"

# 2. the environment
VENV="${COLORA_VENV:-$ROOT/.venv}"
PTH_NAME="_colora_node_env.pth"
if [ "$VENV" = none ]; then
  PY="$PYTHON"
  step "2/6 installing into $PYTHON's own environment (COLORA_VENV=none)"
else
  if [ -x "$VENV/bin/python" ] && ! ls "$VENV"/lib/python*/site-packages/"$PTH_NAME" >/dev/null 2>&1; then
    fail "$VENV exists and was not made by this script (its own torch?); set COLORA_VENV to another folder, or remove it"
  fi
  if [ -x "$VENV/bin/python" ]; then
    step "2/6 virtual environment $VENV exists (layered on $PYTHON)"
  else
    step "2/6 creating virtual environment $VENV, layered on $PYTHON"
    "$PYTHON" -m venv "$VENV"
  fi
  PY="$VENV/bin/python"
  site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # after the environment's own packages: every site folder of the node's interpreter,
  # with its .pth files (addsitedir), so the node's torch is imported as it is
  "$PY" - "$site/$PTH_NAME" "$NODE_SITES" <<'PYEOF'
import os, sys
path, sites = sys.argv[1], [s for s in sys.argv[2].split(os.pathsep) if s]
with open(path, 'w') as f:
    f.write('import site; ' + '; '.join(f'site.addsitedir({s!r})' for s in sites) + '\n')
PYEOF
fi
# pip from the bundle only: no index, no configured find-links or constraints
pip_off() {
  env -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_FIND_LINKS -u PIP_CONSTRAINT \
    -u PIP_NO_INDEX PIP_CONFIG_FILE=/dev/null \
    "$PY" -m pip --disable-pip-version-check "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }
  return "${PIPESTATUS[0]}"
}

# 3. the bundle's wheels
step "3/6 installing from $DIR (pip --no-index): requirements.txt, then $(xargs < "$DIR/stack.txt") with --no-deps"
reqs=$(mktemp)
tmp=""
trap 'rm -f "$reqs"; [ -z "$tmp" ] || rm -rf "$tmp"' EXIT
trap 'exit 130' INT TERM
if [ "$HAS_CV2" = 1 ]; then   # any OpenCV the node has serves; keep it
  grep -v '^opencv-python-headless' "$DIR/requirements.txt" > "$reqs"
else
  cp "$DIR/requirements.txt" "$reqs"
fi
pip_off install --quiet --no-index --find-links "$DIR" -r "$reqs" \
  || fail "pip could not install $DIR/requirements.txt from the bundle alone (above: what is missing); rebuild the bundle for this node"
pip_off install --quiet --no-index --find-links "$DIR" --no-deps -r "$DIR/stack.txt" \
  || fail "pip could not install $(xargs < "$DIR/stack.txt") from the bundle"

# 4. mmcv with its ops, built for exactly this torch
if [ "$USE_CUDA" = 1 ]; then
  variant="cuda-$(echo "$ARCH" | tr -c '0-9a-zA-Z.\n' '_')"
else
  variant=cpu
fi
WHEELS="$CACHE/mmcv-$MMCV_VERSION/torch-$TORCH_FULL-$variant"
jobs="${MAX_JOBS:-$(nproc)}"
build_env="MMCV_WITH_OPS=1 FORCE_CUDA=$USE_CUDA MAX_JOBS=$jobs CFLAGS=-g0${ARCH:+ TORCH_CUDA_ARCH_LIST=$ARCH}${BUILD_CUDA_HOME:+ CUDA_HOME=$BUILD_CUDA_HOME}${EXTRA_CPATH:+ CPATH=$EXTRA_CPATH}"
build_cmd="$build_env $PY -m pip wheel --no-deps --no-build-isolation --no-index -w DIST mmcv-$MMCV_VERSION/"
# a wheel built before: in the cache, or carried in the bundle's mmcv-build/ folder (the
# cache's layout; benchmarks/gpu_check.sh writes one there in its output)
wheel=$(ls "$WHEELS"/mmcv-"$MMCV_VERSION"-"$PYTAG"-*.whl \
  "$DIR/mmcv-build/torch-${TORCH_FULL//+/_}-$variant"/mmcv-"$MMCV_VERSION"-"$PYTAG"-*.whl \
  2>/dev/null | head -n1 || true)
if [ -n "$wheel" ]; then
  step "4/6 mmcv $MMCV_VERSION: wheel built before for torch $TORCH_FULL ($variant): $wheel"
  step "    (without it: unpack $DIR/mmcv-$MMCV_VERSION.tar.gz, -std=c++17 -> c++20, then $build_cmd)"
else
  mkdir -p "$CACHE"
  log="$CACHE/mmcv-build-$TORCH_FULL-$variant.log"
  tmp=$(mktemp -d)
  tar xzf "$DIR/mmcv-$MMCV_VERSION.tar.gz" -C "$tmp"
  # torch >= 2.10 headers need C++20; mmcv 2.1.0's setup.py hard-codes -std=c++17
  # (for the host compiler and nvcc alike)
  sed -i 's/-std=c++17/-std=c++20/g' "$tmp/mmcv-$MMCV_VERSION/setup.py"
  src="$tmp/mmcv-$MMCV_VERSION/mmcv/ops/csrc/pytorch"
  total=$(ls "$src"/*.cpp "$src"/cpu/*.cpp | wc -l)
  [ "$USE_CUDA" = 1 ] && total=$((total + $(ls "$src"/cuda/*.cu "$src"/cuda/*.cpp 2>/dev/null | wc -l)))
  step "4/6 compiling mmcv $MMCV_VERSION ops against torch $TORCH_FULL ($variant, $jobs jobs, $total sources; log: $log)"
  step "    $build_cmd"
  if [ -n "$EXTRA_CPATH" ]; then export CPATH="$EXTRA_CPATH${CPATH:+:$CPATH}"; fi
  if [ -n "$BUILD_CUDA_HOME" ]; then export CUDA_HOME="$BUILD_CUDA_HOME"; fi
  # -g0 after Python's -g: no host debug information (a smaller wheel, a faster build)
  ( cd "$tmp" && env -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_FIND_LINKS \
      -u PIP_CONSTRAINT MMCV_WITH_OPS=1 FORCE_CUDA="$USE_CUDA" MAX_JOBS="$jobs" \
      ${ARCH:+TORCH_CUDA_ARCH_LIST="$ARCH"} PIP_CONFIG_FILE=/dev/null \
      CFLAGS="${CFLAGS:+$CFLAGS }-g0" CXXFLAGS="${CXXFLAGS:+$CXXFLAGS }-g0" \
      "$PY" -m pip wheel --no-deps --no-build-isolation --no-index --disable-pip-version-check \
      -w "$tmp/dist" "$tmp/mmcv-$MMCV_VERSION" ) >"$log" 2>&1 &
  build=$!
  t_build=$SECONDS
  while kill -0 "$build" 2>/dev/null; do
    for _ in $(seq 30); do kill -0 "$build" 2>/dev/null && sleep 1; done
    kill -0 "$build" 2>/dev/null || break
    done_n=$(find "$tmp/mmcv-$MMCV_VERSION/build" -name '*.o' 2>/dev/null | wc -l)
    step "    ... compiling for $((SECONDS - t_build)) s, $done_n of $total sources done"
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
pip_off install --quiet --no-index --force-reinstall --no-deps "$wheel"
step "    mmcv wheel: $wheel"
[ "$VENV" = none ] || echo "torch-$TORCH_FULL-$variant" > "$VENV/.mmcv-built-for"

# 5. this package, editable
step "5/6 installing colora_mm in editable mode from $ROOT"
# PEP 660 in this environment: setuptools >= 80's `setup.py develop` would call pip
# again with build isolation, which needs an index
pip_off install --quiet --no-index --no-deps --no-build-isolation --use-pep517 -e "$ROOT"

# 6. the whole stack imports (the check of tools/setup_env.sh, step 6)
step "6/6 checking that the stack imports"
"$PY" - <<'PYEOF'
import torch, mmcv, mmcv.ops, mmengine, mmseg, mmdet, mmpretrain, colora_mm
import mmseg.models, mmdet.models, mmpretrain.models  # noqa: E401
print(f'[setup] ready: colora_mm {colora_mm.__version__} | torch {torch.__version__} '
      f'(CUDA available: {torch.cuda.is_available()}) | mmcv {mmcv.__version__} | '
      f'mmengine {mmengine.__version__} | mmseg {mmseg.__version__} | '
      f'mmdet {mmdet.__version__} | mmpretrain {mmpretrain.__version__}')
PYEOF
"$PY" - <<'PYEOF'
import cv2, numpy
from mmcv.ops import get_compiler_version, get_compiling_cuda_version
print(f'[offline] numpy {numpy.__version__} | OpenCV {cv2.__version__} | mmcv ops: '
      f'CUDA {get_compiling_cuda_version()}, {get_compiler_version()}')
PYEOF
# what pip check reports, less what the node's own OpenCV / the optional matplotlib
# stand in for by design (mmengine's metadata names opencv-python and matplotlib)
problems=$(pip_off check 2>&1 | grep -v -E "requires (opencv-python|matplotlib), which is not installed|^No broken requirements" || true)
if [ -n "$problems" ]; then
  step "pip check reports (informational):"
  printf '%s\n' "$problems" | sed 's/^/[offline]     /'
fi
if [ "$VENV" != none ] && [ "$VENV" = "$ROOT/.venv" ]; then
  touch "$VENV/.setup-done"   # `make test` uses this environment as it is
fi
step "done in $((SECONDS - t0)) s; python: $PY"
