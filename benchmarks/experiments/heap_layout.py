"""Peak resident set per training step of table 1's model (UperNet + ConvNeXt-T, batch
2 x 256x256), per method, with glibc's allocator defaults (as the memory workers of
``bench_colora.py`` run), and what the first step leaves in glibc's heap: the tensors it
allocates that outlive it (AdamW's state, which AdamW creates in the first step, and
CoLoRA's partner offsets), how many, how large, and how far above the heap's top before
the step the highest of them sits (no block above it can be returned to the system).

Two variants per method: ``as run`` (what table 1 measures) and ``state first``
(AdamW's state created before the first step, as ``zeros_like`` of every trainable
parameter: the same values AdamW's first step would create). The second variant is a
diagnosis, not a way to train: it shows how much of a method's peak is where its
long-lived blocks land rather than what it holds. The first step runs on a fresh heap
(every block from its top, nothing to fit between), so "saving vs limit, step 1" of the
``state first`` variant is the peak-RSS saving without the heap's layout. Each worker is a fresh process;
methods and variants run in turn, ``--repeats`` times.

    python benchmarks/experiments/heap_layout.py [--steps 4] [--repeats 3]
        [--methods full limit lora colora] [--arch tiny --size 256 --head-channels 128]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from types import SimpleNamespace

from _common import bench_colora, torch

VARIANTS = ('as run', 'state first')


def heap_range():
    with open('/proc/self/maps') as f:
        for line in f:
            if line.rstrip().endswith('[heap]'):
                lo, hi = line.split()[0].split('-')
                return int(lo, 16), int(hi, 16)
    return None


def create_adamw_state(optimizer: torch.optim.Optimizer) -> None:
    """What ``torch.optim.AdamW`` creates in its first step (non-capturable, not
    fused): a float step counter and two zero moments per parameter."""
    for group in optimizer.param_groups:
        for p in group['params']:
            state = optimizer.state[p]
            state['step'] = torch.tensor(0.0, dtype=torch.get_default_dtype())
            state['exp_avg'] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state['exp_avg_sq'] = torch.zeros_like(p, memory_format=torch.preserve_format)


def storages(model, optimizer) -> dict:
    """``{data_ptr: (bytes, kind)}`` of the tensors a step can leave behind."""
    out = {}
    for name, buf in model.named_buffers():
        kind = 'partner offsets' if '.partner_' in name else 'buffers'
        out[buf.untyped_storage().data_ptr()] = (buf.untyped_storage().nbytes(), kind)
    for state in optimizer.state.values():
        for t in state.values():
            if torch.is_tensor(t):
                out[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(),
                                                       'AdamW state')
    return out


def worker(method: str, variant: str, args) -> None:
    import ctypes
    torch.set_num_threads(1)
    ctypes.CDLL('libc.so.6').malloc_trim(0)
    cfg = SimpleNamespace(arch=args.arch, size=args.size, head_channels=args.head_channels,
                          device='cpu', amp=False, batch=2, memory_mmap_threshold=0)
    steps = args.steps
    model, step, _ = bench_colora.build_trainer(method, cfg)
    before = bench_colora._proc_status_kib('VmRSS') * 1024
    if variant == 'state first':
        create_adamw_state(step.optimizer)
    known = set(storages(model, step.optimizer))
    top_before = heap_range()[1]
    peaks, left = [], {}
    for i in range(steps):
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        step()
        peaks.append(bench_colora._proc_status_kib('VmHWM') * 1024 - before)
        if i == 0:
            lo, hi = heap_range()
            for ptr, (nbytes, kind) in storages(model, step.optimizer).items():
                if ptr in known or not lo <= ptr < hi:
                    continue
                count, total, highest = left.get(kind, (0, 0, 0))
                left[kind] = (count + 1, total + nbytes,
                              max(highest, ptr + nbytes - top_before))
    print('HEAP ' + json.dumps(dict(peaks=peaks, left=left)))


def run_worker(method: str, variant: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', method,
           '--variant', variant, '--steps', str(args.steps), '--arch', args.arch,
           '--size', str(args.size), '--head-channels', str(args.head_channels)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith('HEAP '):
            return json.loads(line[5:])
    raise SystemExit(f'heap_layout worker {method} ({variant}) failed:\n'
                     f'{proc.stderr[-3000:]}')


def mib(n: float) -> str:
    return f'{n / 2**20:.0f}'


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--steps', type=int, default=4)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--methods', nargs='+', default=['full', 'limit', 'lora', 'colora'])
    parser.add_argument('--arch', default='tiny')
    parser.add_argument('--size', type=int, default=256)
    parser.add_argument('--head-channels', type=int, default=128)
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    parser.add_argument('--variant', default='as run', choices=VARIANTS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.variant, args)
        return
    if args.steps < 2:
        parser.error('--steps must be at least 2 (table 1 reads the first two)')
    if heap_range() is None:
        raise SystemExit('heap_layout: needs Linux and glibc (/proc/self/maps has no '
                         '[heap] here).')
    runs = {(m, v): [] for v in VARIANTS for m in args.methods}
    for _ in range(args.repeats):
        for variant in VARIANTS:
            for method in args.methods:
                runs[method, variant].append(run_worker(method, variant, args))
    print(f'ConvNeXt-{args.arch}, {args.size}x{args.size}, batch 2, 1 thread, glibc '
          f'defaults, {args.repeats} fresh process(es) per row; MiB of peak RSS over the '
          'RSS before the first step, median per step (every repeat of steps 1 and 2 in '
          'brackets); "first two steps" is what table 1 reads (its --memory-steps 2); '
          'what step 1 left in the heap is from the first repeat\n')
    head = ' | '.join(f'step {i + 1}' for i in range(args.steps))
    print(f'| method | variant | {head} | first two steps | saving vs limit | saving vs '
          'limit, step 1 | left in the heap by step 1: kind, tensors, MiB, highest MiB '
          'above the old top |\n|' + '---|' * (args.steps + 6))

    def saving(peaks: dict, method: str) -> str:
        if 'full' not in peaks or 'limit' not in peaks or peaks['full'] == peaks['limit']:
            return '-'
        return (f'{(peaks["full"] - peaks[method]) / (peaks["full"] - peaks["limit"]):.2f}')

    for variant in VARIANTS:
        two = {m: statistics.median(max(r['peaks'][:2]) for r in runs[m, variant])
               for m in args.methods}
        first = {m: statistics.median(r['peaks'][0] for r in runs[m, variant])
                 for m in args.methods}
        for method in args.methods:
            rs = runs[method, variant]
            cells = []
            for i in range(args.steps):
                vals = [r['peaks'][i] for r in rs]
                cell = mib(statistics.median(vals))
                if i < 2 and len(vals) > 1:
                    cell += ' (' + ', '.join(mib(v) for v in vals) + ')'
                cells.append(cell)
            left = rs[0]['left']
            kinds = '; '.join(f'{k}: {c}, {mib(t)}, {mib(h)}'
                              for k, (c, t, h) in sorted(left.items())) or '-'
            print(f'| {method} | {variant} | {" | ".join(cells)} | {mib(two[method])} | '
                  f'{saving(two, method)} | {saving(first, method)} | {kinds} |')


if __name__ == '__main__':
    main()
