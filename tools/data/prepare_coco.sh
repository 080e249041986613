#!/usr/bin/env bash
# Download and unpack COCO 2017 detection where the configs look for it:
# data/coco/{train2017,val2017}/*.jpg and data/coco/annotations/instances_*2017.json.
#
#   bash tools/data/prepare_coco.sh [DATA_DIR]        # DATA_DIR defaults to ./data
#
# Idempotent: existing archives or unpacked folders are kept (unzip -n: files already
# there are not asked about or replaced). The layout is checked at
# the end (tools/data/check_data.py).
set -euo pipefail
DATA_DIR="${1:-data}"
BASE="http://images.cocodataset.org"
DEST="$DATA_DIR/coco"
mkdir -p "$DEST"
fetch() {  # fetch URL FILE: download once, via a .part file
  if [ ! -f "$DEST/$2" ]; then
    echo "[coco] downloading $1"
    curl -L --fail -o "$DEST/$2.part" "$1"
    mv "$DEST/$2.part" "$DEST/$2"
  fi
}
for split in train2017 val2017; do
  if [ ! -d "$DEST/$split" ]; then
    fetch "$BASE/zips/$split.zip" "$split.zip"
    echo "[coco] unpacking $split"
    unzip -q -n "$DEST/$split.zip" -d "$DEST"
  fi
done
if [ ! -f "$DEST/annotations/instances_val2017.json" ]; then
  fetch "$BASE/annotations/annotations_trainval2017.zip" annotations_trainval2017.zip
  echo "[coco] unpacking annotations"
  unzip -q -n "$DEST/annotations_trainval2017.zip" -d "$DEST"
fi
# the checkout's .venv (tools/setup_env.sh) unless PYTHON names another interpreter
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python
  VENV_PY="$(dirname "$0")/../../.venv/bin/python"
  [ -x "$VENV_PY" ] && PYTHON="$VENV_PY"
fi
"$PYTHON" "$(dirname "$0")/check_data.py" coco "$DEST"
