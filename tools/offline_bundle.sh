#!/usr/bin/env bash
# Collect, on a machine with a package index, every file tools/setup_offline.sh needs to
# install colora_mm's stack on a node without network that has its own CUDA PyTorch.
#
#   bash tools/offline_bundle.sh OUT_DIR [--python 3.12] [--platform manylinux_2_28_x86_64]
#                                [--include GROUP]... [--exclude GROUP]... [--max-mib 64]
#                                [--no-mmcv-wheels]
#
# OUT_DIR receives, flat (pip's --find-links folder) but for mmcv-build/:
#   * wheels for the target Python and platform of mmengine, mmsegmentation, mmdet and
#     mmpretrain (versions from requirements/runtime.txt) and of requirements/offline.txt
#     with everything they pull in, except torch, torchvision and what those bring
#     (numpy, pillow): the node's own are kept;
#   * mmcv-2.1.0.tar.gz, mmcv's source release, compiled on the node against its torch
#     (its build requirements setuptools < 81, wheel and ninja are among the wheels);
#   * requirements.txt (what setup_offline.sh installs), stack.txt (the four pinned
#     packages), manifest.json and manifest.tsv (name, version, file, bytes, sha256);
#   * mmcv-build/torch-<version, + as _>-<cpu|cuda-arch>/: every mmcv wheel for the target
#     Python built before on this machine (COLORA_CACHE, as setup_env.sh and
#     setup_offline.sh keep them), so a node whose torch matches one skips the compile
#     (--no-mmcv-wheels leaves them out).
#
# Groups, the large optional parts (the bundle must stay under --max-mib, 64 by default):
#   scipy       (in by default; ~34 MiB) imported by mmseg.models and mmdet.models
#   opencv      (out; 48-59 MiB) opencv-python-headless; else the node's OpenCV is used
#   matplotlib  (out; ~16 MiB with fonttools, kiwisolver, ...) drawing only
#   numpy, pillow (out) normally the node's, which torch / torchvision need anyway
# opencv does not fit in 64 MiB beside the rest (about 16 MiB) even without scipy: a node
# without OpenCV needs a larger limit or a second bundle.
#
# Environment: PYTHON (the interpreter whose pip downloads; default python3),
# COLORA_CACHE (default ~/.cache/colora_mm: where built mmcv wheels are looked for). pip's
# own configuration (index, proxy) applies.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MMCV_VERSION="2.1.0"

fail() { printf '[bundle] error: %s\n' "$*" >&2; exit 1; }
step() { printf '[bundle] %s\n' "$*"; }
usage() { sed -n '2,33p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

OUT="" PYVER="3.12" PLATFORM="manylinux_2_28_x86_64" MAX_MIB=64 MMCV_WHEELS=1
declare -A GROUPS_ON=([scipy]=1 [opencv]=0 [matplotlib]=0 [numpy]=0 [pillow]=0)
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PYVER="${2:?--python needs a version, e.g. 3.12}"; shift 2 ;;
    --platform) PLATFORM="${2:?--platform needs a tag, e.g. manylinux_2_28_x86_64}"; shift 2 ;;
    --include|--exclude)
      g="${2:?$1 needs a group: ${!GROUPS_ON[*]}}"
      [ -n "${GROUPS_ON[$g]+x}" ] || fail "unknown group '$g'; groups: ${!GROUPS_ON[*]}"
      [ "$1" = --include ] && GROUPS_ON[$g]=1 || GROUPS_ON[$g]=0
      shift 2 ;;
    --max-mib) MAX_MIB="${2:?--max-mib needs a number}"; shift 2 ;;
    --no-mmcv-wheels) MMCV_WHEELS=0; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) fail "unknown option $1 (see --help)" ;;
    *) [ -z "$OUT" ] || fail "one OUT_DIR only (got '$OUT' and '$1')"; OUT="$1"; shift ;;
  esac
done
[ -n "$OUT" ] || { usage >&2; fail "OUT_DIR missing"; }
[[ "$PYVER" =~ ^3\.[0-9]+$ ]] || fail "--python $PYVER: expected MAJOR.MINOR, e.g. 3.12"
PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null || fail "$PYTHON not found; set PYTHON=/path/to/python3"
"$PYTHON" -m pip --version >/dev/null 2>&1 || fail "$PYTHON has no pip; set PYTHON to one that has"

if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
  [ -f "$OUT/manifest.json" ] || fail "$OUT exists and is not a bundle (no manifest.json); give an empty or new folder"
  step "replacing the bundle in $OUT"
  rm -rf "$OUT"
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
t0=$SECONDS

# pip matches --platform exactly: name every older manylinux tag the target accepts too
platforms=()
if [[ "$PLATFORM" =~ ^manylinux_2_([0-9]+)_(.+)$ ]]; then
  glibc="${BASH_REMATCH[1]}" arch="${BASH_REMATCH[2]}"
  for ((n = glibc; n >= 5; n--)); do platforms+=(--platform "manylinux_2_${n}_${arch}"); done
  [ "$glibc" -ge 17 ] && platforms+=(--platform "manylinux2014_${arch}")
  [ "$glibc" -ge 12 ] && platforms+=(--platform "manylinux2010_${arch}")
  platforms+=(--platform "manylinux1_${arch}")
else
  platforms+=(--platform "$PLATFORM")
fi

# the four OpenMMLab packages, pinned in requirements/runtime.txt
stack=$(grep -E '^(mmengine|mmsegmentation|mmdet|mmpretrain)==' "$ROOT/requirements/runtime.txt")
[ "$(echo "$stack" | wc -l)" = 4 ] || fail "requirements/runtime.txt must pin mmengine, mmsegmentation, mmdet and mmpretrain with =="
printf '%s\n' "$stack" > "$OUT/stack.txt"

# what setup_offline.sh installs with dependencies: requirements/offline.txt + groups
reqs="$OUT/requirements.txt"
{
  echo "# tools/offline_bundle.sh: requirements/offline.txt and the groups packed here"
  grep -v '^\s*#' "$ROOT/requirements/offline.txt" | grep -v '^\s*$'
  # 4.10 and 4.11 run on numpy 1.x and 2.x and are the smallest (48 MiB; 4.12+: 52-59)
  declare -A LINE=([scipy]="scipy" [opencv]="opencv-python-headless>=4.10,<4.12"
                   [matplotlib]="matplotlib" [numpy]="numpy" [pillow]="pillow")
  for g in scipy opencv matplotlib numpy pillow; do
    if [ "${GROUPS_ON[$g]}" = 1 ]; then echo "${LINE[$g]}"; fi
  done
} > "$reqs"
included=$(for g in "${!GROUPS_ON[@]}"; do if [ "${GROUPS_ON[$g]}" = 1 ]; then echo "$g"; fi; done | sort | xargs)
step "target: CPython $PYVER, $PLATFORM; groups packed: ${included:-none}; limit $MAX_MIB MiB"

pipdl() { "$PYTHON" -m pip --disable-pip-version-check download --quiet "$@"; }
step "1/3 wheels of the stack and of $(basename "$reqs") (with their dependencies)"
pipdl --only-binary=:all: --python-version "$PYVER" --implementation cp "${platforms[@]}" \
  -d "$OUT" --no-deps $stack
pipdl --only-binary=:all: --python-version "$PYVER" --implementation cp "${platforms[@]}" \
  -d "$OUT" -r "$reqs"

step "2/3 mmcv $MMCV_VERSION source release"
# pip reads the release's metadata by running its setup.py, which imports pkg_resources
cons=$(mktemp)
trap 'rm -f "$cons"' EXIT
echo "setuptools<81" > "$cons"
PIP_CONSTRAINT="$cons" PIP_BUILD_CONSTRAINT="$cons" \
  pipdl --no-deps --no-binary :all: -d "$OUT" "mmcv==$MMCV_VERSION"
[ -f "$OUT/mmcv-$MMCV_VERSION.tar.gz" ] || fail "pip did not save mmcv-$MMCV_VERSION.tar.gz"

# mmcv wheels built before for this Python, in the layout setup_offline.sh looks for
CACHE="${COLORA_CACHE:-$HOME/.cache/colora_mm}"
pytag="cp${PYVER//./}"
if [ "$MMCV_WHEELS" = 1 ]; then
  for whl in "$CACHE/mmcv-$MMCV_VERSION"/torch-*/mmcv-"$MMCV_VERSION"-"$pytag"-*.whl; do
    [ -f "$whl" ] || continue
    dest="$OUT/mmcv-build/$(basename "$(dirname "$whl")" | tr '+' '_')"
    mkdir -p "$dest" && cp "$whl" "$dest/"
    step "    mmcv wheel built before: $(basename "$dest")/$(basename "$whl")"
  done
fi

step "3/3 manifest"
"$PYTHON" - "$OUT" "$PYVER" "$PLATFORM" "$MAX_MIB" "$included" <<'PYEOF'
import hashlib, json, os, re, sys, time
out, pyver, platform, max_mib, included = sys.argv[1:6]
included = included.split()
# what torch / torchvision bring: the node's own are used unless a group packs them
node_provided = {'numpy', 'pillow'} - set(included)
files = []
for fn in sorted(os.listdir(out)):
    path = os.path.join(out, fn)
    if fn.endswith('.whl'):
        name, version = fn.split('-')[:2]
    elif fn.endswith('.tar.gz'):
        name, version = fn[:-len('.tar.gz')].rsplit('-', 1)
    else:
        continue
    name = re.sub(r'[-_.]+', '-', name).lower()
    if name in node_provided:
        os.remove(path)         # pulled in as a dependency; the node's is used
        continue
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    files.append(dict(name=name, version=version, file=fn, bytes=os.path.getsize(path),
                      sha256=h.hexdigest()))
total = sum(f['bytes'] for f in files)
manifest = dict(python=pyver, platform=platform, groups=included,
                node_provides=sorted(node_provided | {'torch', 'torchvision'}
                                     | ({'opencv'} if 'opencv' not in included else set())
                                     | ({'matplotlib'} if 'matplotlib' not in included
                                        else set())
                                     | ({'scipy'} if 'scipy' not in included else set())),
                built=time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()),
                total_bytes=total, files=files)
with open(os.path.join(out, 'manifest.json'), 'w') as f:
    json.dump(manifest, f, indent=1)
with open(os.path.join(out, 'manifest.tsv'), 'w') as f:
    f.write('name\tversion\tbytes\tsha256\tfile\n')
    for e in files:
        f.write(f"{e['name']}\t{e['version']}\t{e['bytes']}\t{e['sha256']}\t{e['file']}\n")
for e in sorted(files, key=lambda e: -e['bytes']):
    print(f"[bundle]   {e['bytes'] / 2**20:7.2f} MiB  {e['name']} {e['version']}")
folder = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
built = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out)
               for f in fs if f.endswith('.whl') and d != out)
for rel in built:
    print(f"[bundle]   {os.path.getsize(os.path.join(out, rel)) / 2**20:7.2f} MiB  {rel}")
print(f'[bundle] {len(files)} files, {folder / 2**20:.1f} MiB in {out} '
      f'(node provides: {", ".join(manifest["node_provides"])})'
      + (f'; {len(built)} mmcv wheel(s) built before' if built else ''))
if folder > float(max_mib) * 2**20:
    # no manifest for a bundle over the limit: setup_offline.sh and gpu_check.sh
    # refuse a folder without one
    for name in ('manifest.json', 'manifest.tsv'):
        os.remove(os.path.join(out, name))
    sizes = [(e['name'], e['bytes']) for e in files] + [
        (rel, os.path.getsize(os.path.join(out, rel))) for rel in built]
    big = ', '.join(f"{name} {size / 2**20:.0f} MiB"
                    for name, size in sorted(sizes, key=lambda e: -e[1])[:3])
    sys.exit(f'[bundle] error: {folder / 2**20:.1f} MiB is over the {max_mib} MiB limit '
             f'(largest: {big}); leave a group to the node (--exclude GROUP) or raise '
             '--max-mib' + (', or --no-mmcv-wheels' if built else ''))
PYEOF
step "done in $((SECONDS - t0)) s: bash tools/setup_offline.sh $OUT on the node"
