#!/usr/bin/env bash
# One command on a GPU node without network: install from an offline bundle, run the
# GPU tests, the CUDA benchmark at the paper's size and a short demo training on CUDA.
#
#   bash benchmarks/gpu_check.sh BUNDLE_DIR OUT_DIR            # on the GPU node
#   bash benchmarks/gpu_check.sh BUNDLE_DIR OUT_DIR --dry-run  # any machine, CPU, tiny sizes
#
# Stages, each timed (printed as it ends, and in OUT_DIR/summary.md):
#   install    tools/setup_offline.sh BUNDLE_DIR: the bundle's wheels, mmcv's ops
#              compiled for the node's torch and its GPU (or a cached wheel), import check
#   gpu_tests  pytest -m gpu tests/test_gpu.py: AMP fp16 / bf16 training steps, the range
#              filter on CUDA against the CPU, merge on CUDA, CUDA checkpoint -> CPU
#   bench_train   benchmarks/bench_colora.py --device cuda --amp --only train: UperNet +
#              ConvNeXt-B at 512x512, 2 images, head channels 512; methods $METHODS
#              (a failed memory worker, e.g. out of memory, marks its memory cells failed;
#              the timings are still printed, and the stage fails)
#   bench_tables  the same script's other tables (filter, spatial, merge, deltas) on CUDA;
#              a table that fails is reported and the next one runs (the stage fails);
#              the benchmark writes its JSON after every table, so what finished is kept
#   spatial_variants  benchmarks/experiments/spatial_variants.py on CUDA at ConvNeXt-B's
#              shapes: the up-projection's formulations, Triton-compiled taps included
#   demo       the demo's synthetic domains; tools/train.py of the demo's pretraining
#              (full) and of its CoLoRA fine-tuning, both --amp, $DEMO_ITERS iterations
#              each on CUDA; tools/test.py of the fine-tuned model (mIoU)
#   compiled   (only when STAGES names it) benchmarks/experiments/compiled_backbone.py
#              on CUDA with fp16 autocast at the paper's size: limit, LoRA and CoLoRA
#              backbones eager and compiled by Inductor (a few minutes of compiling)
# --dry-run walks the same stages on the CPU at tiny sizes (no --amp: mmengine's AMP is
# CUDA-only; the GPU tests are collected and skipped), so the script is known to work
# before a GPU is at hand.
#
# OUT_DIR receives: summary.md (stage times, the benchmark's tables, the demo's mIoU),
# summary.json (the same, with the benchmark's full JSON), logs/{install,gpu_tests,bench,
# demo}.log, and mmcv-build/torch-<version>-<variant>/mmcv-*.whl, the mmcv wheel
# installed: put that folder into the bundle (BUNDLE_DIR/mmcv-build/) and the next install
# on such a node skips the compile.
#
# Environment: PYTHON (the node's interpreter with torch; default python3), COLORA_VENV
# (default <checkout>/.venv; see tools/setup_offline.sh), METHODS (default
# "full limit lora peft-lora hira colora": rows of bench_colora.py, any that its
# --list-methods prints, colora-frozen and pissa included; others are left out, named), STAGES (default "gpu_tests bench_train bench_tables spatial_variants demo";
# "compiled" too where named; the install always runs, so that a rerun after a fix can
# take only the stages that failed), DEMO_ITERS (default 300), BENCH_ARGS (extra arguments to bench_colora.py),
# BUDGET_S (default 600: the summary says when the whole run took longer); the install's
# own (tools/setup_offline.sh), e.g. FORCE_CUDA=0: mmcv with CPU ops only, enough for
# this check (it runs no mmcv op on CUDA), and with a bundle that carries such a wheel
# (tools/offline_bundle.sh packs the ones built before) no compile at all.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
say() { printf '[gpu-check] %s\n' "$*"; }
fail() { printf '[gpu-check] error: %s\n' "$*" >&2; exit 1; }

BUNDLE="" OUT="" DRY=0
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^[^#]/{/^#/p}' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) fail "unknown option $a (see --help)" ;;
    *) if [ -z "$BUNDLE" ]; then BUNDLE="$a"; elif [ -z "$OUT" ]; then OUT="$a";
       else fail "usage: bash benchmarks/gpu_check.sh BUNDLE_DIR OUT_DIR [--dry-run]"; fi ;;
  esac
done
[ -n "$BUNDLE" ] && [ -n "$OUT" ] || fail "usage: bash benchmarks/gpu_check.sh BUNDLE_DIR OUT_DIR [--dry-run]"
[ -f "$BUNDLE/manifest.json" ] || fail "$BUNDLE is not a bundle (no manifest.json); make one with tools/offline_bundle.sh"
PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null || fail "$PYTHON not found; set PYTHON to the node's interpreter with torch"
METHODS="${METHODS:-full limit lora peft-lora hira colora}"
DEFAULT_STAGES="gpu_tests bench_train bench_tables spatial_variants demo"
ALL_STAGES="$DEFAULT_STAGES compiled"
STAGES="${STAGES:-$DEFAULT_STAGES}"
for st in $STAGES; do
  [[ " $ALL_STAGES " == *" $st "* ]] || fail "STAGES: unknown stage '$st'; stages: $ALL_STAGES (install always runs)"
done
want() { [[ " $STAGES " == *" $1 "* ]]; }
DEMO_ITERS="${DEMO_ITERS:-300}"
BUDGET_S="${BUDGET_S:-600}"
if [ "$DRY" = 0 ]; then
  "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null \
    || fail "$PYTHON's torch sees no CUDA device; on a machine without one, use --dry-run"
fi
mkdir -p "$OUT/logs" || fail "cannot create $OUT"
OUT="$(cd "$OUT" && pwd)"
BUNDLE="$(cd "$BUNDLE" && pwd)"
rm -rf "$OUT"/logs/*.log "$OUT"/summary.* "$OUT"/stages.tsv "$OUT"/mmcv-build
work=$(mktemp -d)      # the demo's data and work folders: many small files, not kept
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
t_all=$SECONDS
mode=$([ "$DRY" = 1 ] && echo "dry run: CPU, tiny sizes" || echo "CUDA")
say "$mode; bundle $BUNDLE; output $OUT"

failed=0
# run_stage NAME LOG CMD...: runs CMD with its output into LOG and on screen, timed
run_stage() {
  local name="$1" log="$2"; shift 2
  local t=$SECONDS status=ok
  say "stage $name: $*"
  { echo "\$ $*"; "$@"; } 2>&1 | tee -a "$log"
  [ "${PIPESTATUS[0]}" = 0 ] || { status=FAILED; failed=1; }
  local s=$((SECONDS - t))
  printf '%s\t%s\t%s\n' "$name" "$s" "$status" >> "$OUT/stages.tsv"
  say "stage $name: $status in $s s (elapsed $((SECONDS - t_all)) s; log $log)"
  [ "$status" = ok ]
}

# 1. install
if ! run_stage install "$OUT/logs/install.log" bash "$ROOT/tools/setup_offline.sh" "$BUNDLE"; then
  say "the install failed; the other stages need it (see $OUT/logs/install.log)"
else
  # the mmcv wheel installed, kept in OUT_DIR in the cache's layout: copied into a
  # bundle's mmcv-build/, it spares the next install on such a node the compile
  wheel=$(sed -n 's/^\[offline\]     mmcv wheel: //p' "$OUT/logs/install.log" | tail -n1)
  if [ -n "$wheel" ] && [ -f "$wheel" ]; then
    keep="$OUT/mmcv-build/$(basename "$(dirname "$wheel")" | tr '+' '_')"
    mkdir -p "$keep" && cp "$wheel" "$keep/"
  fi
  VENV="${COLORA_VENV:-$ROOT/.venv}"
  if [ "$VENV" = none ]; then PY="$(command -v "$PYTHON")"; else PY="$VENV/bin/python"; fi
  cd "$ROOT"

  # 2. GPU tests
  want gpu_tests && run_stage gpu_tests "$OUT/logs/gpu_tests.log" \
    "$PY" -m pytest tests/test_gpu.py -m gpu -v -rs -p no:cacheprovider

  # 3. the benchmark
  # the rows the benchmark itself accepts (its --methods check), whatever it adds later
  known=$("$PY" benchmarks/bench_colora.py --list-methods 2>/dev/null | tail -n1)
  methods=()
  if [ -z "$known" ]; then
    say "bench: bench_colora.py --list-methods printed nothing; METHODS passed as given"
    read -r -a methods <<< "$METHODS"
  else
    for m in $METHODS; do
      if [[ " $known " == *" $m "* ]]; then methods+=("$m"); else
        say "bench: method '$m' is not one of this colora_mm's ($known); left out"; fi
    done
  fi
  # table 1 (training step) on its own, so that its numbers are kept if a later table fails
  if [ "$DRY" = 1 ]; then
    bench=(--device cpu --arch atto --size 64 --batch 2 --head-channels 16 --repeats 1
           --memory-steps 1 --merge-size 32 --merge-batch 1)
  else
    bench=(--device cuda --amp --arch base --size 512 --batch 2 --head-channels 512
           --repeats 5)
  fi
  # shellcheck disable=SC2086
  want bench_train && run_stage bench_train "$OUT/logs/bench.log" "$PY" benchmarks/bench_colora.py "${bench[@]}" \
    --only train --methods "${methods[@]}" --no-breakdown --json "$work/bench_train.json" \
    ${BENCH_ARGS:-}
  # shellcheck disable=SC2086
  want bench_tables && run_stage bench_tables "$OUT/logs/bench.log" "$PY" benchmarks/bench_colora.py "${bench[@]}" \
    --only filter spatial merge deltas --json "$work/bench_tables.json" ${BENCH_ARGS:-}

  # the up-projection's formulations beyond table 2b (split backward, eager and compiled
  # shifted taps: Triton on CUDA), for the choice of its kernel per device
  if [ "$DRY" = 1 ]; then
    exp=(--channels 16 --size 64 --batch 2 --repeats 1 --no-compile)
  else
    exp=(--device cuda --channels 128 --size 512 --batch 2 --repeats 10)
  fi
  want spatial_variants && run_stage spatial_variants "$OUT/logs/bench.log" "$PY" \
    benchmarks/experiments/spatial_variants.py "${exp[@]}"

  # 4. the demo config on CUDA
  if [ "$DRY" = 1 ]; then
    iters=4 warm=1 ntrain=16 nval=8 batch=4 amp=()
  else
    iters=$DEMO_ITERS warm=15 ntrain=320 nval=64 batch=8 amp=(--amp)
  fi
  data="$work/data" pre="$work/pretrain" ft="$work/colora" test_dir="$work/test"
  sched=(train_cfg.max_iters="$iters" default_hooks.checkpoint.interval="$iters"
         param_scheduler.0.end="$warm" param_scheduler.1.begin="$warm"
         param_scheduler.1.end="$iters" train_dataloader.batch_size="$batch"
         default_hooks.logger.interval=50)
  demo() {
    "$PY" -c "from colora_mm.demo.data import make_demo_data; make_demo_data('$data', num_train=$ntrain, num_val=$nval, size=64, seed=0)" &&
    echo "== pretraining (full), $iters iterations" &&
    "$PY" tools/train.py configs/demo/pretrain_full_source.py --work-dir "$pre" "${amp[@]}" \
      --cfg-options "${sched[@]}" train_dataloader.dataset.data_root="$data/source" \
      test_dataloader.dataset.data_root="$data/target" &&
    echo "== CoLoRA fine-tuning, $iters iterations" &&
    "$PY" tools/train.py configs/demo/finetune_colora_target.py --work-dir "$ft" "${amp[@]}" \
      --cfg-options "${sched[@]}" train_dataloader.dataset.data_root="$data/target" \
      test_dataloader.dataset.data_root="$data/target" \
      model.backbone.init_cfg.checkpoint="$pre/iter_$iters.pth" \
      model.decode_head.init_cfg.checkpoint="$pre/iter_$iters.pth" \
      model.auxiliary_head.init_cfg.checkpoint="$pre/iter_$iters.pth" &&
    echo "== test of the fine-tuned model" &&
    "$PY" tools/test.py configs/demo/finetune_colora_target.py "$ft/iter_$iters.pth" \
      --work-dir "$test_dir" --cfg-options test_dataloader.dataset.data_root="$data/target" \
      model.backbone.init_cfg.checkpoint="$pre/iter_$iters.pth" \
      model.decode_head.init_cfg.checkpoint="$pre/iter_$iters.pth" \
      model.auxiliary_head.init_cfg.checkpoint="$pre/iter_$iters.pth"
  }
  want demo && run_stage demo "$OUT/logs/demo.log" demo

  # 5. only where STAGES names it, last (a few minutes of compiling): the backbones
  # eager and compiled, what fusing the adapters' small ops buys where a step is bound
  # by kernel launches
  if [ "$DRY" = 1 ]; then
    exp=(--arch atto --size 64 --repeats 1 --backend aot_eager)
  else
    exp=(--device cuda --amp --arch base --size 512 --batch 2 --repeats 10)
  fi
  want compiled && run_stage compiled "$OUT/logs/bench.log" "$PY" \
    benchmarks/experiments/compiled_backbone.py "${exp[@]}"
fi

# 6. summary
total=$((SECONDS - t_all))
"${PY:-$PYTHON}" - "$OUT" "$total" "$BUDGET_S" "$DRY" "$work" <<'PYEOF'
import glob, json, os, re, sys
out, total, budget, dry, work = sys.argv[1:6]
test_dir, ft_dir = os.path.join(work, 'test'), os.path.join(work, 'colora')
total, budget = int(total), int(budget)
stages = []
for line in open(os.path.join(out, 'stages.tsv')):
    name, seconds, status = line.rstrip('\n').split('\t')
    stages.append(dict(stage=name, seconds=int(seconds), status=status))
os.remove(os.path.join(out, 'stages.tsv'))
summary = dict(dry_run=dry == '1', total_s=total, budget_s=budget, stages=stages)
try:
    import torch
    summary['torch'] = torch.__version__
    summary['device'] = (torch.cuda.get_device_name() if torch.cuda.is_available()
                         else 'cpu')
except Exception as err:  # noqa: BLE001 - the summary is written whatever failed
    summary['torch'] = f'not importable: {err}'
for part in ('train', 'tables'):
    bench = os.path.join(work, f'bench_{part}.json')
    if os.path.isfile(bench):
        summary[f'bench_{part}'] = json.load(open(bench))
metrics = os.path.join(test_dir, 'metrics.json')
if os.path.isfile(metrics):
    summary['demo_miou'] = json.load(open(metrics)).get('mIoU')
scalars = sorted(glob.glob(os.path.join(ft_dir, '*', 'vis_data', 'scalars.json')))
if scalars:
    times = [json.loads(l)['time'] for l in open(scalars[-1]) if '"time"' in l]
    if times:
        summary['demo_finetune_s_per_iter'] = sum(times) / len(times)
with open(os.path.join(out, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1, default=str)
lines = ['# colora_mm GPU check' + (' (dry run: CPU, tiny sizes)' if dry == '1' else ''),
         '', f"torch {summary.get('torch')}, device: {summary.get('device')}", '',
         '| stage | seconds | status |', '|---|---|---|']
lines += [f"| {s['stage']} | {s['seconds']} | {s['status']} |" for s in stages]
lines.append(f'| total | {total} | {"within" if total <= budget else "OVER"} the '
             f'{budget} s budget |')
bench_log = os.path.join(out, 'logs', 'bench.log')
if os.path.isfile(bench_log):
    lines += ['', '## Benchmark (benchmarks/bench_colora.py)']
    for line in open(bench_log):
        line = line.rstrip('\n')
        if re.match(r'\d+[a-z]?\. ', line):         # a table's title (1., 1b., 2b., ...)
            lines += ['', line, '']
        elif line.startswith('experiment: '):         # benchmarks/experiments/*.py
            lines += ['', line[len('experiment: '):], '']
        elif line.startswith('device:'):
            lines += ['', line]
        elif line.startswith('command:'):
            lines += ['', f'`{line[len("command: "):]}`']
        elif line.startswith('|'):
            lines.append(line)
if 'demo_miou' in summary:
    per_iter = summary.get('demo_finetune_s_per_iter')
    lines += ['', f"Demo: CoLoRA fine-tuning of the demo config, target val mIoU "
              f"{summary['demo_miou']:.2f}"
              + (f', {per_iter * 1e3:.0f} ms/iter' if per_iter else '')]
with open(os.path.join(out, 'summary.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
print('\n'.join(lines[4:4 + len(stages) + 3]))
PYEOF
if [ "$total" -gt "$BUDGET_S" ]; then
  say "took $total s, over the $BUDGET_S s budget: the stage times above show which stage"
fi
say "wrote $OUT/summary.md, summary.json (with the benchmark's JSON), logs/, mmcv-build/"
exit "$failed"
