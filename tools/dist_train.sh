#!/usr/bin/env bash
# Distributed training on torchrun: one process per GPU (per CPU worker on a host
# without CUDA, where the gloo backend is used).
#
#   bash tools/dist_train.sh CONFIG GPUS [train.py options]
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 PORT=29500 bash tools/dist_train.sh ...
#
# PYTHON selects the interpreter (default: the checkout's .venv/bin/python when
# tools/setup_env.sh has made it, else python).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG GPUS [train.py options]" >&2
  exit 2
fi
CONFIG=$1
GPUS=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
USAGE="CONFIG GPUS [train.py options]"
if [ ! -f "$CONFIG" ]; then
  echo "error: config file $CONFIG does not exist (usage: $0 $USAGE)" >&2
  exit 2
fi
if ! [[ "$GPUS" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: GPUS='$GPUS' must be a positive number of processes per node, e.g. 2 (usage: $0 $USAGE)" >&2
  exit 2
fi
HERE="$(cd "$(dirname "$0")" && pwd)"
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python
  [ -x "$HERE/../.venv/bin/python" ] && PYTHON="$HERE/../.venv/bin/python"
fi

# Every check once, before the processes start: a wrong option or setting is one
# error line (exit status 2), not one per process and torchrun's failure report.
PYTHONPATH="$HERE/..${PYTHONPATH:+:$PYTHONPATH}" \
"$PYTHON" "$HERE/train.py" "$CONFIG" \
    --launcher pytorch "${@:3}" --check-only >/dev/null

PYTHONPATH="$HERE/..${PYTHONPATH:+:$PYTHONPATH}" \
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$GPUS" \
    --master_port="$PORT" \
    "$HERE/train.py" \
    "$CONFIG" \
    --launcher pytorch "${@:3}"
