"""Peak resident set per training step of table 1's model (UperNet + ConvNeXt-T, batch
2 x 256x256), per method, with glibc's allocator defaults (as the memory workers of
``bench_colora.py`` run), and what the first step leaves in glibc's heap: the tensors it
allocates that outlive it (AdamW's state, which AdamW creates in the first step, and
CoLoRA's partner offsets), how many, how large, and how far above the heap's top before
the step the highest of them sits (no block above it can be returned to the system); and after
the last step, the bytes in use in malloc's blocks against the heap's size and its free
part (``mallinfo2``), which separates what the steps hold from the heap's holes.

Four variants per method: ``as run`` (what table 1 measures), ``state first``
(AdamW's state created before the first step, as ``zeros_like`` of every trainable
parameter: the same values AdamW's first step would create), ``trimmed``
(``malloc_trim(0)`` before every step: glibc returns the free pages inside its heap to
the system, so that a step's peak counts only the pages touched in that step, not the
ones earlier steps left resident) and ``grads kept`` (every trainable parameter's
gradient made before the first step and zeroed in place after each step,
``zero_grad(set_to_none=False)``: autograd then adds into it instead of keeping a block
it made in the middle of backward, so no gradient block is placed inside a step). The
last three are diagnoses, not ways to train: they show how much of a method's peak is
where its long-lived blocks land, and how much is pages that earlier steps left
resident, rather than what it holds. The first step runs
on a fresh heap (every block from its top, nothing to fit between), so "saving vs
limit, step 1" of the ``state first`` variant is the peak-RSS saving without the
heap's layout. Each worker is a fresh process; methods and variants run in turn,
``--repeats`` times.

    python benchmarks/experiments/heap_layout.py [--steps 4] [--repeats 3]
        [--methods full limit lora colora]
        [--variants 'as run' 'state first' trimmed 'grads kept']
        [--arch tiny --size 256 --head-channels 128]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from types import SimpleNamespace

from _common import bench_colora, torch

VARIANTS = ('as run', 'state first', 'trimmed', 'grads kept')


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


def keep_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter a zero gradient now and make ``zero_grad`` zero it in
    place from then on (mmengine's ``OptimWrapper`` calls it after each step)."""
    for group in optimizer.param_groups:
        for p in group['params']:
            p.grad = torch.zeros_like(p)
    zero_grad = optimizer.zero_grad
    optimizer.zero_grad = lambda set_to_none=True: zero_grad(set_to_none=False)


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
    libc = ctypes.CDLL('libc.so.6')
    libc.malloc_trim(0)
    cfg = SimpleNamespace(arch=args.arch, size=args.size, head_channels=args.head_channels,
                          device='cpu', amp=False, batch=2, memory_mmap_threshold=0)
    steps = args.steps
    model, step, _ = bench_colora.build_trainer(method, cfg)
    before = bench_colora._proc_status_kib('VmRSS') * 1024
    heap_before = bench_colora.heap_state()
    if variant == 'state first':
        create_adamw_state(step.optimizer)
    if variant == 'grads kept':
        keep_gradients(step.optimizer)
    known = set(storages(model, step.optimizer))
    top_before = heap_range()[1]
    peaks, left, heaps = [], {}, []
    for i in range(steps):
        if variant == 'trimmed':
            libc.malloc_trim(0)
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        step()
        peaks.append(bench_colora._proc_status_kib('VmHWM') * 1024 - before)
        heap = bench_colora.heap_state()
        if heap:     # in use (heap blocks and mapped ones) over before step 1; heap, free
            heaps.append((in_use(heap) - in_use(heap_before), heap['heap'],
                          heap['heap_free']))
        if i == 0:
            lo, hi = heap_range()
            for ptr, (nbytes, kind) in storages(model, step.optimizer).items():
                if ptr in known or not lo <= ptr < hi:
                    continue
                count, total, highest = left.get(kind, (0, 0, 0))
                left[kind] = (count + 1, total + nbytes,
                              max(highest, ptr + nbytes - top_before))
    kept = {}
    for nbytes, kind in storages(model, step.optimizer).values():
        kept[kind] = kept.get(kind, 0) + nbytes
    print('HEAP ' + json.dumps(dict(peaks=peaks, left=left, heaps=heaps, kept=kept)))


def in_use(heap: dict) -> int:
    """Bytes the process holds in malloc's blocks: the heap's used part and the blocks
    mapped on their own."""
    return heap['heap'] - heap['heap_free'] + heap['mapped']


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
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=VARIANTS,
                        help='the variants to run (default: all four)')
    parser.add_argument('--variant', default='as run', choices=VARIANTS,
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.variant, args)
        return
    if args.steps < 2:
        parser.error('--steps must be at least 2 (table 1 reads the first two)')
    if heap_range() is None:
        raise SystemExit('heap_layout: needs Linux and glibc (/proc/self/maps has no '
                         '[heap] here).')
    variants = [v for v in VARIANTS if v in args.variants]
    runs = {(m, v): [] for v in variants for m in args.methods}
    for _ in range(args.repeats):
        for variant in variants:
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

    for variant in variants:
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

    if not all(r['heaps'] for rs in runs.values() for r in rs):
        return
    # What the steps leave held against what the heap keeps resident: blocks in use
    # after the last step (over before the first), the tensors among them, and the
    # heap's size and free part; the difference of the first two to the peak is the
    # step's transient memory plus the heap's holes.
    print('\nAfter the last step (glibc\'s mallinfo2; median of the repeats; MiB): '
          'blocks in use over before step 1, of which the tensors that outlive the '
          'steps (AdamW state, partner offsets), and the heap\'s size and free part\n')
    print('| method | variant | in use, over before step 1 | AdamW state | partner '
          'offsets | other | heap size | free inside the heap |\n|' + '---|' * 8)
    for variant in variants:
        for method in args.methods:
            rs = runs[method, variant]
            used = statistics.median(r['heaps'][-1][0] for r in rs)
            adamw = rs[0]['kept'].get('AdamW state', 0)
            partners = rs[0]['kept'].get('partner offsets', 0)
            print(f'| {method} | {variant} | {used / 2**20:.1f} | {adamw / 2**20:.1f} | '
                  f'{partners / 2**20:.1f} | {(used - adamw - partners) / 2**20:.1f} | '
                  f'{mib(statistics.median(r["heaps"][-1][1] for r in rs))} | '
                  f'{mib(statistics.median(r["heaps"][-1][2] for r in rs))} |')


if __name__ == '__main__':
    main()
