"""Peak RSS of table 1's memory workers, replayed deterministically: where glibc's heap
holes come from, and what would remove them.

Each method's memory worker (as ``bench_colora.py --memory-worker`` runs it: UperNet +
ConvNeXt-T, batch 2 x 256x256, two training steps, glibc's defaults) runs once with a
recorder preloaded (``heap_replay/recorder.c``) that writes every call to glibc's
allocator to a trace, with markers at the steps' start and end and at each backward
pass's start and end. A replayer (``heap_replay/replay.c``) then makes the same calls
again in a fresh process, writing every block in full, and reads the peak RSS growth
over the steps as the worker reads it. The replay is checked first: it must place
every block at the address (relative to the heap's start) where the worker placed it;
then the heap is the worker's, block for block, and the replayed peak is the worker's
less what lies outside the heap (the code pages a step touches first, Python's object
arenas: 20-40 MiB, about the same for every method).

On a trace the replay can then ask what-ifs that no process could be made to run, one
class of blocks at a time, and read the peak RSS they would give with nothing else
changed (in a training step's terms: a forward pass's block is a *temporary* when it is
freed before the backward pass starts, *kept* when it lives on into it):

- ``as recorded``: the worker's heap;
- ``>= 32 KiB mapped``: every block of 32 KiB or more made in the steps gets a mapping
  of its own (as a fixed 32 KiB mmap threshold would give it);
- ``transients mapped``: the same for the forward passes' temporaries and the backward
  passes' blocks only (the kept blocks stay in the heap);
- ``small kept left out``: the blocks under 32 KiB kept from a forward pass into its
  backward pass (autograd's nodes, saved-variable records, tensor headers, small
  tensors) are not made;
- ``both``: the last two together;
- ``extras left out`` (every method but the limit; needs the limit in ``--methods``):
  only what the method allocates beyond the limit: of its transients of 32 KiB or more,
  per size, as many as it has beyond the limit's count of that size get mappings of
  their own; of its small kept blocks, as many as it has beyond the limit's are not
  made (which ones: drawn at random, ``--seed``). The limit and full fine-tuning
  read as recorded there.

``--origins`` records the call stacks of the blocks made in the steps too (slower) and
counts each method's small kept blocks and transients by where they are made: in the
package's C++ extension (its autograd nodes and kernels), else by the module of the
first frame outside the allocator (libpython: Python objects; libtorch_python: torch's
Python bindings, Python autograd Functions included; libtorch_cpu: ATen and autograd).
It adds three what-ifs on the extension's blocks alone: ``extension: transients
mapped``, ``extension: small kept left out`` and ``extension: both`` (a method without
the extension reads as recorded there).

Needs Linux, glibc and a C compiler (``cc``, or ``$CC``); the traces take about 150 MB
a worker (``--work-dir``, deleted after each worker's replays unless ``--keep``).

    python benchmarks/experiments/heap_replay.py [--methods full limit lora colora]
        [--repeats 3] [--arch tiny --size 256 --head-channels 128] [--origins]
        [--variants 'as recorded' '>= 32 KiB mapped' ...]
"""
import argparse
import collections
import ctypes
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = os.path.join(HERE, 'heap_replay')
SMALL = 32 * 1024
MARK_TRIM, MARK_START, MARK_END = 99, 1, 2
MARK_STEP, MARK_BACKWARD, MARK_BACKWARD_END = 10, 20, 30
VARIANTS = ('as recorded', '>= 32 KiB mapped', 'transients mapped', 'small kept left out',
            'both', 'extras left out')
EXTENSION = "the package's C++ extension"
#: what-ifs on the blocks the package's C++ extension makes (``--origins``)
ORIGIN_VARIANTS = ('extension: transients mapped', 'extension: small kept left out',
                   'extension: both')


# ---------------------------------------------------------------------------- build

def build(build_dir: str) -> tuple:
    """``(recorder.so, replay)`` compiled from ``heap_replay/`` into ``build_dir`` (a
    subfolder per version of the sources)."""
    with open(os.path.join(SOURCES, 'recorder.c'), 'rb') as f:
        recorder_src = f.read()
    with open(os.path.join(SOURCES, 'replay.c'), 'rb') as f:
        replay_src = f.read()
    tag = hashlib.sha1(recorder_src + replay_src).hexdigest()[:12]
    out = os.path.join(build_dir, tag)
    recorder, replay = os.path.join(out, 'recorder.so'), os.path.join(out, 'replay')
    if os.path.exists(recorder) and os.path.exists(replay):
        return recorder, replay
    cc = os.environ.get('CC') or shutil.which('cc') or shutil.which('gcc')
    if cc is None:
        raise SystemExit('heap_replay.py: no C compiler found (cc or gcc); install one or '
                         'name it in $CC.')
    os.makedirs(out, exist_ok=True)
    for cmd in ([cc, '-O2', '-shared', '-fPIC', '-o', recorder,
                 os.path.join(SOURCES, 'recorder.c')],
                [cc, '-O2', '-o', replay, os.path.join(SOURCES, 'replay.c')]):
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f'heap_replay.py: {" ".join(cmd)} failed:\n{res.stderr}')
    return recorder, replay


# --------------------------------------------------------------------------- worker

def worker(args) -> None:
    """Runs under the recorder: table 1's memory worker, with markers."""
    sys.path.insert(0, os.path.dirname(HERE))
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
    import torch
    import bench_colora
    torch.set_num_threads(1)
    mark = ctypes.CDLL(None).heap_replay_mark
    libc = ctypes.CDLL('libc.so.6')
    mark(MARK_TRIM)
    libc.malloc_trim(0)          # as the memory worker does before building
    build_args = argparse.Namespace(arch=args.arch, size=args.size, batch=args.batch,
                                    head_channels=args.head_channels, device='cpu',
                                    amp=False)
    model, step, _ = bench_colora.build_trainer(args.worker, build_args)
    backward, passes = torch.autograd.backward, [0]

    def marked_backward(*a, **k):
        mark(MARK_BACKWARD + passes[0])
        result = backward(*a, **k)
        mark(MARK_BACKWARD_END + passes[0])
        passes[0] += 1
        return result

    torch.autograd.backward = marked_backward
    mark(MARK_START)
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
    before = bench_colora._proc_status_kib('VmRSS')
    for i in range(args.steps):
        step()
        mark(MARK_STEP + i)
    peak = bench_colora._proc_status_kib('VmHWM')
    mark(MARK_END)
    torch.autograd.backward = backward
    if args.maps_out:
        with open('/proc/self/maps') as f, open(args.maps_out, 'w') as out:
            out.write(f.read())
    print('RECORDED ' + json.dumps(dict(peak_mib=(peak - before) / 1024,
                                        backward_passes=passes[0])))


def record(method: str, args, recorder: str, work_dir: str, origins: bool) -> dict:
    """Runs ``method``'s worker under the recorder; its trace (and stacks, maps)."""
    prefix = os.path.join(work_dir, method.replace('/', '_'))
    env = dict(os.environ, LD_PRELOAD=recorder, HEAP_REPLAY_TRACE=prefix + '.trace')
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', method,
           '--arch', args.arch, '--size', str(args.size), '--batch', str(args.batch),
           '--head-channels', str(args.head_channels), '--steps', str(args.steps)]
    if origins:
        env['HEAP_REPLAY_BACKTRACES'] = prefix + '.stacks'
        cmd += ['--maps-out', prefix + '.maps']
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    out, err = proc.communicate(timeout=1800)
    if proc.returncode:
        raise SystemExit(f'heap_replay.py: the {method} worker failed:\n{err[-3000:]}')
    trace = f'{prefix}.trace.{proc.pid}'
    for name in os.listdir(work_dir):       # children's traces (compiler probes etc.)
        path = os.path.join(work_dir, name)
        if name.startswith(os.path.basename(prefix) + '.trace.') and path != trace:
            os.remove(path)
    line = next(l for l in out.splitlines() if l.startswith('RECORDED '))
    result = json.loads(line[len('RECORDED '):])
    result.update(trace=trace, stacks=prefix + '.stacks' if origins else None,
                  maps=prefix + '.maps' if origins else None)
    return result


# ------------------------------------------------------------------------- analysis

class Trace:
    """A trace's records and, for every block made in the steps, when it is freed."""

    def __init__(self, path: str):
        import numpy as np
        self.np = np
        rec = np.fromfile(path, dtype=np.uint64).reshape(-1, 4)
        self.rec = rec
        self.n = len(rec)
        self.op = (rec[:, 0] & 255).astype(np.int64)
        self.size = rec[:, 2].astype(np.int64)
        where = np.where(self.op == 6)[0]
        self.marks = {int(rec[i, 2]): int(i) for i in where}
        for m in (MARK_TRIM, MARK_START, MARK_END):
            if m not in self.marks:
                raise SystemExit(f'heap_replay.py: {path} lacks marker {m}')
        lo, hi = self.marks[MARK_START], self.marks[MARK_END]
        self.freed = np.full(self.n, self.n, dtype=np.int64)   # n: not freed in steps
        self.freed_by_realloc = np.zeros(self.n, dtype=bool)
        made = {}
        ops, blocks, news = (self.op[lo:hi].tolist(), rec[lo:hi, 1].tolist(),
                             rec[lo:hi, 3].tolist())
        for i, (o, a, c) in enumerate(zip(ops, blocks, news), lo):
            if o == 1 or o == 3 or o == 5:
                made[a] = i
            elif o == 2:
                j = made.pop(a, None)
                if j is not None:
                    self.freed[j] = i
            elif o == 4:
                if a:
                    j = made.pop(a, None)
                    if j is not None:
                        self.freed[j] = i
                        self.freed_by_realloc[j] = True
                if c:
                    made[c] = i
        self.index = np.arange(self.n)
        self.allocs = np.isin(self.op, (1, 3, 5)) & ~self.freed_by_realloc

    def steps(self) -> list:
        """``(forward start, backward start, backward end)`` per step."""
        out, start, k = [], self.marks[MARK_START], 0
        while MARK_STEP + k in self.marks:
            out.append((start, self.marks[MARK_BACKWARD + k], self.marks[MARK_BACKWARD_END + k]))
            start = self.marks[MARK_STEP + k]
            k += 1
        return out

    def classes(self) -> dict:
        """Boolean masks over the records: per step, 'kept' and 'temp' (forward
        blocks) and 'backward' blocks, all sizes."""
        np = self.np
        kept = np.zeros(self.n, bool)
        temp = np.zeros(self.n, bool)
        back = np.zeros(self.n, bool)
        for f0, b0, b1 in self.steps():
            fwd = self.allocs & (self.index >= f0) & (self.index < b0)
            kept |= fwd & (self.freed >= b0)
            temp |= fwd & (self.freed < b0)
            back |= self.allocs & (self.index >= b0) & (self.index < b1)
        return dict(kept=kept, temp=temp, backward=back)

    def actions(self, variant: str, limit: 'Trace' = None, seed: int = 0,
                where: dict = None):
        np = self.np
        cls = self.classes()
        large = self.size >= SMALL
        act = np.zeros(self.n, np.uint8)
        transient = (cls['temp'] | cls['backward']) & large
        small_kept = cls['kept'] & ~large
        if variant == '>= 32 KiB mapped':
            act[(cls['kept'] | cls['temp'] | cls['backward']) & large] = 1
        elif variant == 'transients mapped':
            act[transient] = 1
        elif variant == 'small kept left out':
            act[small_kept] = 2
        elif variant == 'both':
            act[transient] = 1
            act[small_kept] = 2
        elif variant == 'extras left out':
            rng = np.random.default_rng(seed)
            mine, theirs = self.steps(), limit.steps()
            lcls = limit.classes()
            ltransient = (lcls['temp'] | lcls['backward']) & (limit.size >= SMALL)
            lsmall = lcls['kept'] & (limit.size < SMALL)
            for (f0, _, b1), (g0, _, c1) in zip(mine, theirs):
                in_step = (self.index >= f0) & (self.index < b1)
                in_theirs = (limit.index >= g0) & (limit.index < c1)
                counts = collections.Counter(limit.size[ltransient & in_theirs].tolist())
                sel = np.where(transient & in_step)[0]
                by_size = collections.defaultdict(list)
                for i in sel:
                    by_size[int(self.size[i])].append(i)
                for s, idx in by_size.items():
                    extra = len(idx) - counts.get(s, 0)
                    if extra > 0:
                        act[rng.choice(idx, extra, replace=False)] = 1
                small = np.where(small_kept & in_step)[0]
                extra = len(small) - int((lsmall & in_theirs).sum())
                if extra > 0:
                    act[rng.choice(small, extra, replace=False)] = 2
        elif variant in ORIGIN_VARIANTS:
            ext = np.zeros(self.n, bool)
            ext[[i for i, w in (where or {}).items() if w == EXTENSION]] = True
            if variant != 'extension: small kept left out':
                act[transient & ext] = 1
            if variant != 'extension: transients mapped':
                act[small_kept & ext] = 2
        elif variant != 'as recorded':
            raise ValueError(variant)
        return act

    def placed_as_recorded(self, placed_path: str) -> int:
        """How many heap blocks the replay placed elsewhere than the worker did
        (relative to each one's lowest heap block): 0 for a faithful replay."""
        np = self.np
        placed = np.fromfile(placed_path, dtype=np.uint64)
        recorded = np.where(self.op == 4, self.rec[:, 3], self.rec[:, 1])
        made = np.isin(self.op, (1, 3, 4, 5))
        heap_r = made & (recorded > 0) & (recorded < 0x700000000000)
        heap_p = made & (placed > 0) & (placed < 0x700000000000)
        if not heap_r.any() or not heap_p.any():
            return -1
        r = np.where(heap_r, recorded.astype(np.int64) - int(recorded[heap_r].min()), -1)
        p = np.where(heap_p, placed.astype(np.int64) - int(placed[heap_p].min()), -1)
        return int(((heap_r | heap_p) & (r != p)).sum())


def replay(binary: str, trace: str, actions=None, placed: str = None) -> dict:
    cmd = [binary, trace]
    tmp = None
    if actions is not None or placed:
        if actions is not None:
            fd, tmp = tempfile.mkstemp(suffix='.actions', dir=os.path.dirname(trace))
            os.close(fd)
            actions.tofile(tmp)
        cmd.append(tmp or '-')
        if placed:
            cmd.append(placed)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if tmp:
        os.remove(tmp)
    if res.returncode:
        raise SystemExit(f'heap_replay.py: replay of {trace} failed:\n{res.stderr}')
    return json.loads(res.stdout)


# -------------------------------------------------------------------------- origins

def origins(trace: Trace, stacks_path: str, maps_path: str) -> tuple:
    """Where the steps' small kept blocks and transients are made (record index ->
    origin), and the counts of the last step's (the first also builds AdamW's state)."""
    np = trace.np
    maps = []
    with open(maps_path) as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split('-'))
            maps.append((lo, hi, os.path.basename(parts[5]) if len(parts) > 5 else ''))
    maps.sort()
    starts = np.array([m[0] for m in maps], dtype=np.uint64)
    ends = np.array([m[1] for m in maps], dtype=np.uint64)
    names = [(m[2] or '[anonymous]').split('.so')[0] for m in maps] + ['?']
    allocator = ('libc', 'recorder', 'libc10', 'libstdc++')
    cls = trace.classes()
    f0, _, b1 = trace.steps()[-1]
    in_step = (trace.index >= f0) & (trace.index < b1)
    wanted = {'small kept': cls['kept'] & (trace.size < SMALL),
              'transients >= 32 KiB': (cls['temp'] | cls['backward'])
              & (trace.size >= SMALL)}
    need = wanted['small kept'] | wanted['transients >= 32 KiB']
    stacks = np.fromfile(stacks_path, dtype=np.uint64).reshape(-1, 27)
    # the stacks come in the order their blocks were made
    lo, hi = trace.marks[MARK_START], trace.marks[MARK_END]
    made = [i for i in range(lo, hi) if trace.op[i] in (1, 3, 5)]
    rec_block, rec_size = trace.rec[:, 1].tolist(), trace.rec[:, 2].tolist()
    blocks, sizes = stacks[:, 0].tolist(), stacks[:, 1].tolist()
    where, j = {}, 0
    for k in range(len(stacks)):
        while j < len(made) and not (rec_block[made[j]] == blocks[k]
                                     and rec_size[made[j]] == sizes[k]):
            j += 1
        if j == len(made):
            break
        if need[made[j]]:
            depth = int(stacks[k, 2])
            addr = stacks[k, 3:3 + depth] - np.uint64(1)
            m = np.searchsorted(starts, addr, side='right') - 1
            m = np.where((m >= 0) & (addr < ends[np.maximum(m, 0)]), m, len(maps))
            frames = [names[i] for i in m.tolist()]
            if any(f.startswith('colora_mm') for f in frames):
                where[made[j]] = "the package's C++ extension"
            else:
                where[made[j]] = next((f for f in frames if not f.startswith(allocator)),
                                      '?')
        j += 1
    counts = {name: collections.Counter(where.get(int(i), '?')
                                        for i in np.where(mask & in_step)[0])
              for name, mask in wanted.items()}
    return where, counts


# ----------------------------------------------------------------------------- main

def table(title, header, rows):
    print(f'\n{title}\n')
    print('| ' + ' | '.join(header) + ' |')
    print('|' + '---|' * len(header))
    for r in rows:
        print('| ' + ' | '.join(str(c) for c in r) + ' |')


def saving(full, limit, method):
    return (full - method) / (full - limit) if full != limit else float('nan')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--methods', nargs='+', default=['full', 'limit', 'lora', 'colora'])
    parser.add_argument('--repeats', type=int, default=3,
                        help='workers per method (fresh processes, recorded in turn)')
    parser.add_argument('--arch', default='tiny')
    parser.add_argument('--size', type=int, default=256)
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--head-channels', type=int, default=128)
    parser.add_argument('--steps', type=int, default=2)
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS + ORIGIN_VARIANTS),
                        choices=VARIANTS + ORIGIN_VARIANTS,
                        help="what-ifs to replay ('as recorded' always runs; the "
                        "'extension:' ones with --origins only)")
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--origins', action='store_true',
                        help='record call stacks and count blocks by where they are made')
    parser.add_argument('--work-dir', default=None,
                        help='where traces go (default: a temporary folder)')
    parser.add_argument('--build-dir', default=os.path.join(
        os.path.expanduser('~'), '.cache', 'colora_mm', 'heap_replay'))
    parser.add_argument('--keep', action='store_true', help='keep the traces')
    parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)
    parser.add_argument('--maps-out', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if not sys.platform.startswith('linux'):
        raise SystemExit('heap_replay.py: needs Linux and glibc.')
    recorder, binary = build(args.build_dir)
    work_dir = args.work_dir or tempfile.mkdtemp(prefix='heap_replay_')
    os.makedirs(work_dir, exist_ok=True)
    variants = [v for v in VARIANTS + ORIGIN_VARIANTS
                if (v in args.variants or v == 'as recorded')
                and (v != 'extras left out' or 'limit' in args.methods)
                and (v not in ORIGIN_VARIANTS or args.origins)]
    peaks = collections.defaultdict(list)      # (variant, method) -> [MiB]
    recorded = collections.defaultdict(list)
    heap = collections.defaultdict(list)       # method -> [(top, free at top)]
    found = {}
    print(f'heap_replay: {args.arch} {args.size}x{args.size}, batch {args.batch}, '
          f'{args.steps} steps, glibc defaults; traces in {work_dir}')
    for rep in range(args.repeats):
        traces = {}
        order = (['limit'] if 'limit' in args.methods else []) + [
            m for m in args.methods if m != 'limit']
        for method in order:
            rec = record(method, args, recorder, work_dir, args.origins)
            trace = Trace(rec['trace'])
            where = {}
            if args.origins:
                where, counts = origins(trace, rec['stacks'], rec['maps'])
                if rep == 0:
                    found[method] = counts
            placed = rec['trace'] + '.placed'
            first = replay(binary, rec['trace'], placed=placed)
            moved = trace.placed_as_recorded(placed)
            os.remove(placed)
            if moved != 0:
                raise SystemExit(f'heap_replay.py: the replay of {method} placed {moved} '
                                 'blocks elsewhere than the worker did: not a faithful '
                                 'replay on this machine.')
            recorded[method].append(rec['peak_mib'])
            heap[method].append((first['heap_top_mib'], first['free_at_top_mib']))
            peaks[('as recorded', method)].append(first['peak_mib'])
            for v in variants[1:]:
                if v == 'extras left out':
                    if method in ('limit', 'full'):
                        peaks[(v, method)].append(first['peak_mib'])
                        continue
                    act = trace.actions(v, traces['limit'], seed=args.seed + rep)
                elif v in ORIGIN_VARIANTS and not any(w == EXTENSION for w in where.values()):
                    peaks[(v, method)].append(first['peak_mib'])
                    continue
                else:
                    act = trace.actions(v, where=where)
                peaks[(v, method)].append(replay(binary, rec['trace'], act)['peak_mib'])
            print(f'  repeat {rep + 1}, {method}: worker {rec["peak_mib"]:.1f} MiB, '
                  f'replay {first["peak_mib"]:.1f} MiB (every block placed as recorded)',
                  flush=True)
            if method == 'limit':
                traces['limit'] = trace
            if not args.keep:
                for p in (rec['trace'], rec['stacks'], rec['maps']):
                    if p and os.path.exists(p):
                        os.remove(p)
    if not args.keep and not args.work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)

    med = lambda xs: statistics.median(xs)  # noqa: E731
    table(f'Peak RSS growth over {args.steps} steps, MiB: the worker, its replay, and the '
          f'replayed heap at its highest point (medians of {args.repeats} workers; '
          'each value in brackets)',
          ['method', 'worker', 'replay', 'heap at its top', 'free inside it then'],
          [[m, f'{med(recorded[m]):.1f} ({", ".join(f"{x:.0f}" for x in recorded[m])})',
            f'{med(peaks[("as recorded", m)]):.1f} '
            f'({", ".join(f"{x:.0f}" for x in peaks[("as recorded", m)])})',
            f'{med([t for t, _ in heap[m]]):.1f}', f'{med([f for _, f in heap[m]]):.1f}']
           for m in args.methods])
    rows = []
    for v in variants:
        row = [v] + [f'{med(peaks[(v, m)]):.1f}' for m in args.methods]
        if 'full' in args.methods and 'limit' in args.methods:
            full, limit = peaks[(v, 'full')], peaks[(v, 'limit')]
            for m in args.methods:
                if m in ('full', 'limit'):
                    continue
                per = [saving(f, l, x) for f, l, x in zip(full, limit, peaks[(v, m)])]
                row.append(f'{med(per):.3f} ({", ".join(f"{x:.2f}" for x in per)})')
        rows.append(row)
    extra = [f'saving vs limit, {m}' for m in args.methods
             if 'full' in args.methods and 'limit' in args.methods
             and m not in ('full', 'limit')]
    table('Replayed peak RSS growth, MiB, per what-if (medians; savings per worker, '
          'then their median)', ['variant'] + list(args.methods) + extra, rows)
    if found:
        for name in ('small kept', 'transients >= 32 KiB'):
            keys = sorted({k for m in found for k in found[m][name]},
                          key=lambda k: -sum(found[m][name].get(k, 0) for m in found))
            table(f'{name} blocks of the last step, by where they are made (first worker)',
                  ['made in'] + list(found),
                  [[k] + [found[m][name].get(k, 0) for m in found] for k in keys]
                  + [['all'] + [sum(found[m][name].values()) for m in found]])


if __name__ == '__main__':
    main()
