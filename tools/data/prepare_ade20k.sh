#!/usr/bin/env bash
# Download and unpack ADE20K (SceneParsing, ADEChallengeData2016) where the configs
# look for it: data/ade/ADEChallengeData2016/{images,annotations}/{training,validation}.
#
#   bash tools/data/prepare_ade20k.sh [DATA_DIR]      # DATA_DIR defaults to ./data
#
# Idempotent: a downloaded archive is kept; an unpack that completed leaves a marker
# (.ADEChallengeData2016.unpacked) and is not repeated; an unpack that was interrupted
# is run again over what is there (unzip -o: a file cut short is replaced, nothing is
# asked) until one completes. A folder unpacked by hand, without the archive, is kept
# as it is. The layout is checked at the end (tools/data/check_data.py).
set -euo pipefail
DATA_DIR="${1:-data}"
URL="http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
DEST="$DATA_DIR/ade"
MARK="$DEST/.ADEChallengeData2016.unpacked"
mkdir -p "$DEST"
if [ ! -f "$MARK" ] && { [ -f "$DEST/ADEChallengeData2016.zip" ] \
    || [ ! -d "$DEST/ADEChallengeData2016/images" ]; }; then
  if [ ! -f "$DEST/ADEChallengeData2016.zip" ]; then
    echo "[ade20k] downloading $URL (about 920 MB)"
    curl -L --fail -o "$DEST/ADEChallengeData2016.zip.part" "$URL"
    mv "$DEST/ADEChallengeData2016.zip.part" "$DEST/ADEChallengeData2016.zip"
  fi
  echo "[ade20k] unpacking into $DEST"
  unzip -q -o "$DEST/ADEChallengeData2016.zip" -d "$DEST"
  touch "$MARK"
fi
# the checkout's .venv (tools/setup_env.sh) unless PYTHON names another interpreter
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python
  VENV_PY="$(dirname "$0")/../../.venv/bin/python"
  [ -x "$VENV_PY" ] && PYTHON="$VENV_PY"
fi
"$PYTHON" "$(dirname "$0")/check_data.py" ade20k "$DEST/ADEChallengeData2016"
