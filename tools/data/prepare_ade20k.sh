#!/usr/bin/env bash
# Download and unpack ADE20K (SceneParsing, ADEChallengeData2016) where the configs
# look for it: data/ade/ADEChallengeData2016/{images,annotations}/{training,validation}.
#
#   bash tools/data/prepare_ade20k.sh [DATA_DIR]      # DATA_DIR defaults to ./data
#
# Idempotent: an existing archive or unpacked folder is kept (unzip -n: files already
# there are not asked about or replaced). The layout is checked at
# the end (tools/data/check_data.py).
set -euo pipefail
DATA_DIR="${1:-data}"
URL="http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
DEST="$DATA_DIR/ade"
mkdir -p "$DEST"
if [ ! -d "$DEST/ADEChallengeData2016/images" ]; then
  if [ ! -f "$DEST/ADEChallengeData2016.zip" ]; then
    echo "[ade20k] downloading $URL (about 920 MB)"
    curl -L --fail -o "$DEST/ADEChallengeData2016.zip.part" "$URL"
    mv "$DEST/ADEChallengeData2016.zip.part" "$DEST/ADEChallengeData2016.zip"
  fi
  echo "[ade20k] unpacking into $DEST"
  unzip -q -n "$DEST/ADEChallengeData2016.zip" -d "$DEST"
fi
# the checkout's .venv (tools/setup_env.sh) unless PYTHON names another interpreter
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python
  VENV_PY="$(dirname "$0")/../../.venv/bin/python"
  [ -x "$VENV_PY" ] && PYTHON="$VENV_PY"
fi
"$PYTHON" "$(dirname "$0")/check_data.py" ade20k "$DEST/ADEChallengeData2016"
