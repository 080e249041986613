#!/usr/bin/env bash
# Download and unpack COCO 2017 detection where the configs look for it:
# data/coco/{train2017,val2017}/*.jpg and data/coco/annotations/instances_*2017.json.
#
#   bash tools/data/prepare_coco.sh [DATA_DIR]        # DATA_DIR defaults to ./data
#
# Idempotent: downloaded archives are kept; an unpack that completed leaves a marker
# (.NAME.unpacked) and is not repeated; an unpack that was interrupted is run again
# over what is there (unzip -o: a file cut short is replaced, nothing is asked) until
# one completes. Folders unpacked by hand, without their archive, are kept as they
# are. The layout is checked at the end (tools/data/check_data.py).
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
unpack() {  # unpack ARCHIVE WHAT: once it completed (a marker), again if interrupted
  unzip -q -o "$DEST/$1" -d "$DEST"
  touch "$DEST/.${1%.zip}.unpacked"
}
needed() {  # needed ARCHIVE PRESENT: no completed unpack, and the archive is here or
            # what it holds (PRESENT) is not
  [ ! -f "$DEST/.${1%.zip}.unpacked" ] && { [ -f "$DEST/$1" ] || [ ! -e "$2" ]; }
}
for split in train2017 val2017; do
  if needed "$split.zip" "$DEST/$split"; then
    fetch "$BASE/zips/$split.zip" "$split.zip"
    echo "[coco] unpacking $split"
    unpack "$split.zip"
  fi
done
if needed annotations_trainval2017.zip "$DEST/annotations/instances_val2017.json"; then
  fetch "$BASE/annotations/annotations_trainval2017.zip" annotations_trainval2017.zip
  echo "[coco] unpacking annotations"
  unpack annotations_trainval2017.zip
fi
# the checkout's .venv (tools/setup_env.sh) unless PYTHON names another interpreter
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python
  VENV_PY="$(dirname "$0")/../../.venv/bin/python"
  [ -x "$VENV_PY" ] && PYTHON="$VENV_PY"
fi
"$PYTHON" "$(dirname "$0")/check_data.py" coco "$DEST"
