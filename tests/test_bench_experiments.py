"""benchmarks/experiments: every variant they time still equals what the package
computes (the scripts assert it before timing), and they print their tables; bench_colora
refuses an input size its tables cannot run at, with a clear message."""
import os.path as osp
import platform
import shutil
import subprocess
import sys

import pytest

pytest.importorskip('mmseg')
pytest.importorskip('mmpretrain')

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def run(script, *args):
    res = subprocess.run([sys.executable, osp.join(ROOT, 'benchmarks', 'experiments', script),
                          *args], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_spatial_variants_match_the_grouped_conv():
    out = run('spatial_variants.py', '--repeats', '1', '--no-compile')
    assert '| 3 (C=768, 8x8) | 24 |' in out and '| all | - |' in out


def test_merged_branch_variants_match_the_package():
    out = run('merged_branch.py', '--repeats', '1')
    assert 'Self time per forward pass' in out
    for name in ('as is', 'down as matmul', 'up channels-last', 'both', 'no-grad filter'):
        assert f'| {name} | ' in out


def test_op_counts_print_their_tables():
    out = run('op_counts.py', '--no-model', '--methods', 'limit', 'lora', 'colora')
    rows = {line.split('|')[1].strip(): line.split('|')[2].strip()
            for line in out.splitlines() if line.startswith('| ')}
    # a block's forward + backward: LoRA dispatches more than the limit, CoLoRA more still
    assert 0 < int(rows['limit']) < int(rows['lora']) < int(rows['colora'])
    # the scalings of one pair side: the fused op dispatches fewer ops than plain ops,
    # in each pass
    cells = {tuple(c.strip() for c in line.split('|')[1:3]): int(line.split('|')[3])
             for line in out.splitlines() if line.startswith('| ') and 'scalings' not in line
             and line.split('|')[2].strip() in ('forward', 'backward')}
    plain = {p: n for (name, p), n in cells.items() if name.startswith('plain')}
    fused = {p: n for (name, p), n in cells.items() if name.startswith('one autograd op')}
    assert set(plain) == set(fused) == {'forward', 'backward'}
    assert 0 < fused['forward'] <= plain['forward'] and 0 < fused['backward'] < plain['backward']


STEADY_PROBE = r'''
import sys
sys.path.insert(0, {exp!r})
import torch
from op_counts import adapted_convnext, counted, warm_up
torch.manual_seed(0)
block = adapted_convnext('colora', 'atto').train().stages[1][0]
x = torch.randn(2, block.depthwise_conv.in_channels, 16, 16, requires_grad=True)
def step():
    block(x).sum().backward()
step()                   # outside the counter: the CPU's C++ pair node, not the GPU path
first = counted(step)    # the GPU path's first step: its one-off constants included
warm_up(step)
print('COUNTS', first.kernels, counted(step).kernels, counted(step).kernels)
'''


def test_op_counts_count_a_steady_step_of_the_path_a_gpu_runs():
    """The counted step is a later step of the formulation a GPU runs (the C++ pair node
    steps aside under the counter): its one-off constants are made in the warm-up, so two
    counted steps after it agree, and both dispatch fewer ops than that path's first."""
    code = STEADY_PROBE.format(exp=osp.join(ROOT, 'benchmarks', 'experiments'))
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith('COUNTS')][0]
    first, steady, again = map(int, line.split()[1:])
    assert steady == again
    assert steady < first


def saved_rows(out):
    return {line.split('|')[1].strip(): float(line.split('|')[2])
            for line in out.splitlines() if line.startswith('| ') and 'MiB' not in line
            and not line.startswith('| colora_mm/')}


def test_saved_tensors_table():
    """Under bf16 autocast (the default) CoLoRA's step keeps less than the limit's:
    the plain model's pointwise layers keep autocast's bf16 copy of every frozen weight,
    the package's low-rank op keeps the float32 weight itself."""
    out = run('saved_tensors.py', '--arch', 'atto', '--size', '64', '--top', '4')
    rows = saved_rows(out)
    assert 0 < rows['colora'] < rows['limit']
    assert 'bfloat16' in out and 'colora_mm/adapters/' in out


def test_saved_tensors_by_shape():
    """``--shapes``: the package's places by the shape saved there, for the adapted
    methods only; the counts and MiB of a place's rows add up to its line above."""
    out = run('saved_tensors.py', '--arch', 'atto', '--size', '64', '--top', '50',
              '--autocast', 'none', '--methods', 'limit', 'colora', '--shapes')
    assert "limit: the package's places by shape" not in out
    rows = saved_rows(out)
    # float32: the adapters keep their thin products and their branches' inputs, at
    # this size within the table's 0.1 MiB of the frozen model's own
    assert 0 < rows['limit'] <= rows['colora'] <= 1.1 * rows['limit']
    head, _, table = out.partition("colora: the package's places by shape")
    assert table
    rows = [[c.strip() for c in line.split('|')[1:-1]] for line in table.splitlines()
            if line.startswith('| colora_mm/')]
    assert rows and all(int(count) > 0 and float(mib) >= 0 for _, _, count, mib in rows)
    per_place, n_rows = {}, {}
    for where, _, _, mib in rows:
        per_place[where] = per_place.get(where, 0.0) + float(mib)
        n_rows[where] = n_rows.get(where, 0) + 1
    listed = {line.split()[-1]: float(line.split()[0]) for line in head.splitlines()
              if line.strip().endswith(tuple(per_place)) and 'float32' in line}
    assert set(listed) == set(per_place)
    for where, mib in listed.items():     # rounded to 0.1 there, to 0.01 per row here
        assert abs(per_place[where] - mib) <= 0.05 + 0.005 * n_rows[where]


def test_compiled_backbone_matches_eager():
    """The script checks the compiled backbone against the eager one before timing
    (here traced by AOTAutograd without generating code, at a small size, with LoRA:
    CoLoRA's compiled training is checked against eager in test_models_compile.py, and
    tracing it here would double the time)."""
    out = run('compiled_backbone.py', '--arch', 'atto', '--size', '64', '--repeats', '1',
              '--backend', 'aot_eager', '--methods', 'lora')
    assert '| lora | ' in out and 'compiled / eager' in out


@pytest.mark.skipif(platform.system() != 'Linux', reason='reads /proc and glibc\'s heap')
def test_heap_layout_reports_what_the_first_step_leaves_in_the_heap():
    """AdamW creates its state in the first step (so it is left in the heap by it);
    CoLoRA's partner offsets are first written in the first step (ConvNeXt-atto: 12
    pairs, 2 sides, 2 factors each); the saving columns read 0 for full fine-tuning and
    1 for the limit; the variant that keeps the gradients holds them (half AdamW's
    moments) after the steps. (Two of the four variants, each a process per method: the
    trimmed one only returns the heap's free pages before every step, and what the
    'state first' one changes is checked in the next test, in this process, for the
    suite's time.)"""
    variants = ('as run', 'grads kept')
    out = run('heap_layout.py', '--arch', 'atto', '--size', '64', '--head-channels', '32',
              '--repeats', '1', '--steps', '2', '--methods', 'full', 'limit', 'colora',
              '--variants', *variants)
    first, _, after = out.partition('After the last step')
    rows, held = {}, {}
    for text, table in ((first, rows), (after, held)):
        for line in text.splitlines():
            cells = [c.strip() for c in line.split('|')[1:-1]]
            if len(cells) == 8 and cells[1] in variants:
                table[cells[0], cells[1]] = cells
    assert set(rows) == {(m, v) for m in ('full', 'limit', 'colora') for v in variants}
    for variant in variants:
        for col in (5, 6):
            assert rows['full', variant][col] == '0.00'
            assert rows['limit', variant][col] == '1.00'
        assert 'partner offsets: 48,' in rows['colora', variant][7]
        assert 'partner' not in rows['limit', variant][7]
        assert float(rows['colora', variant][4]) > 0
        assert 'AdamW state:' in rows['colora', variant][7]
    # after the steps: what is held, the tensors among it, the heap and its holes
    assert set(held) == set(rows)
    for key, cells in held.items():
        used, adamw, partners, other, heap, free = map(float, cells[2:])
        assert abs(used - adamw - partners - other) < 0.15, cells
        assert used >= adamw + partners - 0.1 and 0 <= free <= heap, cells
        assert (partners > 0) == (key[0] == 'colora'), cells
    assert float(held['full', 'as run'][3]) > 4 * float(held['limit', 'as run'][3])
    for method in ('full', 'colora'):
        grads = float(held[method, 'grads kept'][5]) - float(held[method, 'as run'][5])
        assert 0.4 < grads / float(held[method, 'as run'][3]) < 0.6, (method, grads)


def test_heap_layout_state_first_is_the_state_adamws_first_step_creates():
    """The 'state first' variant creates AdamW's state before the first step: the step
    then updates those tensors in place (none replaced, none added), and they hold what
    AdamW's own first step computes from a fresh state."""
    import argparse

    import torch
    sys.path.insert(0, osp.join(ROOT, 'benchmarks', 'experiments'))
    import heap_layout
    bc = _bench()
    args = argparse.Namespace(arch='atto', size=64, head_channels=16, batch=2,
                              device='cpu', amp=False)
    runs = {}
    for created in (False, True):
        torch.manual_seed(0)
        model, step, _ = bc.build_trainer('colora', args)
        if created:
            heap_layout.create_adamw_state(step.optimizer)
            before = {id(p): {k: t.untyped_storage().data_ptr() for k, t in s.items()}
                      for p, s in step.optimizer.state.items()}
            assert before and len(before) == sum(len(g['params'])
                                                 for g in step.optimizer.param_groups)
        torch.manual_seed(1)
        step()
        state = step.optimizer.state
        if created:
            after = {id(p): {k: t.untyped_storage().data_ptr() for k, t in s.items()}
                     for p, s in state.items()}
            assert after == before
        runs[created] = [(float(s['step']), s['exp_avg'].clone(), s['exp_avg_sq'].clone())
                         for group in step.optimizer.param_groups
                         for s in (state[p] for p in group['params'])]
    assert len(runs[False]) == len(runs[True])
    for (n0, m0, v0), (n1, m1, v1) in zip(runs[False], runs[True]):
        assert n0 == n1 == 1.0
        assert torch.equal(m0, m1) and torch.equal(v0, v1)


def _refused(capsys, *argv) -> str:
    """bench_colora's ``main`` on ``argv``, in this process: the usage error's message
    (argparse's exit status 2) before any table runs."""
    bc = _bench()
    with pytest.raises(SystemExit) as exc:
        bc.main(list(argv))
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.skipif(platform.system() != 'Linux' or not (shutil.which('cc')
                                                        or shutil.which('gcc')),
                    reason='preloads a recorder into glibc\'s allocator; needs a C compiler')
def test_heap_replay_is_faithful_and_names_where_blocks_are_made():
    """The replay places every block where the recorded worker placed it (the script
    stops otherwise); a what-if row reads for every method, and the limit's 'extras
    left out' is its recorded peak; CoLoRA's small kept blocks include its C++ nodes',
    the limit's none. (Two of the six what-ifs, for the suite's time.)"""
    out = run('heap_replay.py', '--arch', 'atto', '--size', '64', '--head-channels', '32',
              '--repeats', '1', '--steps', '1', '--methods', 'limit', 'colora',
              '--origins', '--variants', 'small kept left out', 'extras left out')
    assert out.count('(every block placed as recorded)') == 2
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.split('|')[1:-1]]
        if cells:
            rows.setdefault(cells[0], []).append(cells[1:])
    assert 'both' not in rows
    for variant in ('as recorded', 'small kept left out', 'extras left out'):
        assert variant in rows and all(float(c) > 0 for c in rows[variant][0][:2])
    assert rows['extras left out'][0][0] == rows['as recorded'][0][0]
    ext = rows["the package's C++ extension"][0]      # small kept blocks, then transients
    assert int(ext[0]) == 0 and int(ext[1]) > 0


@pytest.mark.parametrize('flag', ['--size', '--merge-size'])
def test_bench_colora_refuses_an_input_smaller_than_the_backbone_stride(capsys, flag):
    assert f'{flag} 16: at least 32' in _refused(capsys, '--only', 'spatial', flag, '16')


def test_table_1_prints_its_targets_and_the_round_by_round_spread(tmp_path):
    """Table 1 on a tiny model: the target lines, and the step-time ratios of every
    round beside them (their spread is this run's noise), also in the JSON."""
    out_json = tmp_path / 'train.json'
    res = subprocess.run(
        [sys.executable, osp.join(ROOT, 'benchmarks', 'bench_colora.py'), '--only', 'train',
         '--methods', 'full', 'limit', 'lora', 'colora', '--arch', 'atto', '--size', '64',
         '--batch', '2', '--head-channels', '32', '--repeats', '2', '--threads', '1',
         '--json', str(out_json)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'CoLoRA step / LoRA step: ' in res.stdout
    assert 'Step-time ratios round by round (2 rounds' in res.stdout
    import json
    ratios = json.loads(out_json.read_text())['train_round_ratios']
    assert set(ratios) == {'colora/lora', 'colora/limit', 'lora/limit'}
    assert all(len(v) == 2 and v == sorted(v) and v[0] > 0 for v in ratios.values())


def test_pair_cost_rows_and_the_same_numbers_check():
    """The script checks the variants that compute the same numbers (python factors,
    stacked factors, plain-op scalings) against the pairs as they are before timing,
    then prints every row."""
    out = run('pair_cost.py', '--arch', 'atto', '--repeats', '1', '--head-channels', '32')
    for name in ('lora', 'pairs', 'python factors', 'stacked factors', 'plain-op scalings',
                 'no stds', 'no partner products', 'no partner offsets'):
        assert f'| {name} | ' in out
    assert ('largest relative gradient difference of python factors and stacked factors '
            'and plain-op scalings') in out
    assert '| W1 dC (backward) | ' in out
    assert '| 768 | 1 | ' in out or 'the C++ extension cannot be built here' in out


MMAP_PROBE = r'''
import ctypes, sys
sys.path.insert(0, {bench!r})
import bench_colora as bc

libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if {fix}:
    assert bc.fix_mmap_threshold(1 << 20)
libc.free(libc.malloc(16 << 20))       # glibc's defaults: the threshold rises to 16 MiB
before = bc.heap_state()['mapped']
p = libc.malloc(2 << 20)
print('MMAPPED', bc.heap_state()['mapped'] - before >= 2 << 20)
libc.free(p)
'''


@pytest.mark.parametrize('fix', [False, True])
def test_fixed_mmap_threshold_keeps_mid_size_blocks_out_of_the_heap(fix):
    """With glibc's defaults a freed 16 MiB block lifts the mmap threshold, and a 2 MiB
    block then comes from the heap; with --memory-mmap-threshold 1 MiB it is mapped on
    its own (and returned when freed)."""
    if not osp.exists('/proc/self/status') or platform.libc_ver()[0] != 'glibc':
        pytest.skip('glibc on Linux only')
    code = MMAP_PROBE.format(bench=osp.join(ROOT, 'benchmarks'), fix=fix)
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f'MMAPPED {fix}' in res.stdout


def memory_worker(*extra):
    res = subprocess.run(
        [sys.executable, osp.join(ROOT, 'benchmarks', 'bench_colora.py'), '--memory-worker',
         'limit', '--arch', 'atto', '--size', '64', '--head-channels', '32',
         '--memory-steps', '1', '--threads', '1', *extra],
        capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    import json
    line = [x for x in res.stdout.splitlines() if x.startswith('MEMORY ')][0]
    return json.loads(line[len('MEMORY '):])


def test_memory_worker_names_its_malloc_policy_and_reports_the_heap():
    out = memory_worker('--memory-mmap-threshold', '1048576')
    assert 'glibc mmap threshold fixed at 1 MiB' in out['kind']
    assert 0 <= out['heap_free'] <= out['heap'] and out['delta'] > 0


def test_amp_on_the_cpu_trains_under_bf16_autocast():
    """``--amp`` on the CPU: the step's forward runs under bfloat16 autocast (the
    wrapper's context turns it on), so autograd keeps low-precision copies beside the
    float32 tensors the upcast ops (LayerNorm, the losses) keep: not the bytes the same
    step keeps in float32."""
    import torch
    sys.path.insert(0, osp.join(ROOT, 'benchmarks'))
    import bench_colora as bc
    layer = torch.nn.Linear(4, 4)
    wrapper = bc.cpu_autocast_wrapper(torch.optim.SGD(layer.parameters(), lr=0.1))
    with wrapper.optim_context(layer):
        assert torch.is_autocast_enabled('cpu')
        assert layer(torch.randn(2, 4)).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled('cpu')
    fp32, amp = memory_worker(), memory_worker('--amp')
    assert fp32['precision'] == 'fp32' and amp['precision'] == 'AMP bf16 (CPU autocast)'
    assert amp['saved'] > 0 and amp['saved'] != fp32['saved'], (amp['saved'], fp32['saved'])


@pytest.mark.parametrize('value, message', [
    ('-1', '--memory-mmap-threshold -1: between 0'),
    ('67108864', '--memory-mmap-threshold 67108864: between 0')])
def test_bench_colora_refuses_an_mmap_threshold_glibc_cannot_take(capsys, value, message):
    assert message in _refused(capsys, '--only', 'spatial', '--memory-mmap-threshold', value)


def test_merge_table_runs_each_forward_in_its_own_autocast_region(monkeypatch):
    """Table 3 under ``--amp``: autocast keeps the cast of a weight that requires grad
    (the plain model's) until its region closes, so every timed forward pass opens a
    region of its own, as mmengine's test loop does per batch; one region around every
    repeat let the plain model cast its weights once for all of them."""
    import types

    import torch
    sys.path.insert(0, osp.join(ROOT, 'benchmarks'))
    import bench_colora as bc
    seen, inside = [], []

    def interleaved(fns, device, repeats):
        for name, fn in fns.items():
            assert not torch.is_autocast_enabled('cpu'), name
            inside.clear()
            fn()
            assert not torch.is_autocast_enabled('cpu'), name
            seen.append((name, len(inside), all(inside)))
        return {name: 1.0 for name in fns}

    def record(module, args):
        inside.append(torch.is_autocast_enabled('cpu'))

    monkeypatch.setattr(bc, 'interleaved', interleaved)
    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        args = types.SimpleNamespace(device='cpu', amp=True, merge_size=32,
                                     merge_batch=1, repeats=1)
        results = {}
        bc.bench_merge(args, results)
    finally:
        hook.remove()
    assert len(seen) == 3 * len(results['merge']) == 12
    assert all(calls > 10 and under_autocast for _, calls, under_autocast in seen), seen


def test_preloaded_allocator_is_read_from_the_mapped_libraries():
    """Under ``LD_PRELOAD`` of jemalloc or tcmalloc the memory workers' peak RSS is that
    allocator's: the headers and target lines say so, and glibc's heap (unused then) is
    not reported."""
    sys.path.insert(0, osp.join(ROOT, 'benchmarks'))
    import bench_colora as bc
    glibc = ('7f1c2a000000-7f1c2a028000 r--p 00000000 fe:01 1234 '
             '/usr/lib/x86_64-linux-gnu/libc.so.6\n'
             '7f1c2b000000-7f1c2b001000 rw-p 00000000 00:00 0 \n'
             '7ffd1000000-7ffd1021000 rw-p 00000000 00:00 0 [stack]\n')
    assert bc.preloaded_allocator(glibc) is None
    for path, name in (('/usr/lib/x86_64-linux-gnu/libjemalloc.so.2', 'jemalloc'),
                       ('/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4', 'tcmalloc'),
                       ('/opt/lib/libmimalloc.so.2.1', 'mimalloc')):
        maps = glibc + f'7f1c2c000000-7f1c2c0a0000 r-xp 00001000 fe:01 99 {path}\n'
        assert bc.preloaded_allocator(maps) == name
    # a file whose name only contains an allocator's name is not one
    assert bc.preloaded_allocator(
        glibc + '7f1c2c000000-7f1c2c0a0000 r--p 00000000 fe:01 7 /data/my_jemalloc.log\n') is None


def test_preloaded_allocator_names_itself_in_the_worker(monkeypatch):
    sys.path.insert(0, osp.join(ROOT, 'benchmarks'))
    import argparse

    import bench_colora as bc
    args = argparse.Namespace(memory_mmap_threshold=0, device='cpu')
    monkeypatch.setattr(bc, 'preloaded_allocator', lambda maps=None: None)
    assert bc.malloc_policy(args) == "glibc's defaults" and bc.rss_label(args) == 'peak RSS'
    monkeypatch.setattr(bc, 'preloaded_allocator', lambda maps=None: 'jemalloc')
    assert bc.malloc_policy(args) == "jemalloc preloaded in place of glibc's malloc"
    assert bc.rss_label(args) == 'peak RSS, jemalloc'
    assert bc.heap_state() == {}


def test_frozen_partner_row_keeps_no_partner_offsets(capsys):
    """``--methods colora-frozen`` (an optional row): CoLoRA as the paper-reproduction
    configs set it but with ``partner_policy='frozen'``; after a training step its pairs
    hold no partner offsets, where the ``colora`` row's hold the step's rank-r snapshot.
    An unknown row is refused with the list of rows."""
    import argparse

    sys.path.insert(0, osp.join(ROOT, 'benchmarks'))
    import bench_colora as bc
    from colora_mm.adapters.colora_pair import CoLoRAPair
    assert 'colora-frozen' in bc.known_rows() and 'colora-frozen' not in bc.BREAKDOWN
    args = argparse.Namespace(arch='atto', size=64, head_channels=32, batch=2,
                              device='cpu', amp=False)
    widths = {}
    for row in ('colora', 'colora-frozen'):
        model, step, _ = bc.build_trainer(row, args)
        step()
        pairs = [m for m in model.modules() if isinstance(m, CoLoRAPair)]
        assert pairs
        widths[row] = {(p.partner_policy, p.partner_l1.shape[1], p.partner_r2.shape[0])
                       for p in pairs}
    assert {w[0] for w in widths['colora-frozen']} == {'frozen'}
    assert all(w[1] == w[2] == 0 for w in widths['colora-frozen'])
    assert {w[0] for w in widths['colora']} == {'effective'}
    assert all(w[1] > 0 and w[2] > 0 for w in widths['colora'])
    err = _refused(capsys, '--only', 'train', '--methods', 'full', 'limit', 'lorra')
    assert "unknown rows ['lorra']" in err and 'colora-frozen' in err


def test_fixed_heap_layouts_read_the_same_peak_rss_again(monkeypatch, capsys):
    """``--memory-layouts N``: each memory worker starts with address randomisation off
    and ``PYTHONHASHSEED`` fixed, so a process with the same seed places the heap's
    blocks the same way and reads the same peak RSS (fresh processes otherwise differ
    by tens of MiB at table 1's size); the row reads the median of the N. Refused below
    0."""
    import argparse

    sys.path.insert(0, osp.join(ROOT, 'benchmarks'))
    import bench_colora as bc
    err = _refused(capsys, '--only', 'spatial', '--memory-layouts', '-1')
    assert '--memory-layouts -1: 0 (one fresh process per row) or more' in err
    if platform.libc_ver()[0] != 'glibc' or not bc.layout_off_prefix():
        pytest.skip('needs glibc and `setarch -R` (address randomisation off)')
    args = argparse.Namespace(device='cpu', arch='atto', size=64, batch=2,
                              head_channels=32, memory_steps=1, memory_mmap_threshold=0,
                              amp=False, threads=1, memory_layouts=0)
    first, again = (bc.memory_worker_run('limit', args, seed=0) for _ in range(2))
    assert first['delta'] > 0
    assert abs(first['delta'] - again['delta']) <= 1 << 20, (first['delta'], again['delta'])
    # the median of the layouts, each one's value kept beside it
    monkeypatch.setattr(bc, 'memory_worker_run', lambda method, a, seed=None: dict(
        first, delta=[30, 10, 20][seed], heap=seed))
    out = bc.measure_memory('limit', argparse.Namespace(memory_layouts=3))
    assert out['delta'] == 20 and out['deltas'] == [30, 10, 20] and out['heap'] == 2
    assert out['kind'].endswith('median of 3 fixed heap layouts (address randomisation '
                                'off, PYTHONHASHSEED 0-2)')


def _bench():
    sys.path.insert(0, osp.join(ROOT, 'benchmarks'))
    import bench_colora as bc
    return bc


def test_memory_columns_count_the_tensors_a_method_adds():
    """'live' and 'kept' count every tensor a method holds beyond the plain frozen model:
    CoLoRA's partner offsets (empty when built, r (d + d') floats per pair side after a
    step), its factors, PiSSA's flags, the optimizer state; the frozen model's own
    tensors (BN statistics, the frozen weights) are not counted, for any method."""
    import argparse

    import torch
    bc = _bench()
    from colora_mm.adapters.colora_pair import OFFSET_NAMES
    offset_names = {n for pair in OFFSET_NAMES for n in pair}
    args = argparse.Namespace(arch='atto', size=64, head_channels=16, batch=2,
                              device='cpu', amp=False)
    frozen = bc.plain_tensor_names(args)
    expected = {}
    for row in ('limit', 'colora', 'pissa'):
        model, step, _ = bc.build_trainer(row, args)
        before = bc.added_memory(bc.tensor_snapshot(model, step.optimizer), frozen)
        step()
        added = bc.added_memory(bc.tensor_snapshot(model, step.optimizer), frozen)
        offsets = sum(b.numel() * b.element_size() for n, b in model.named_buffers()
                      if n.rsplit('.', 1)[-1] in offset_names)
        adapter = sum(t.numel() * t.element_size() for n, t in
                      list(model.named_parameters()) + list(model.named_buffers())
                      if n not in frozen)
        state = sum(t.numel() * t.element_size() for s in step.optimizer.state.values()
                    for t in s.values() if torch.is_tensor(t))
        assert added['offsets'] == offsets, (row, added, offsets)
        assert added['adapter'] == adapter and added['optimizer'] == state > 0, (row, added)
        assert before['offsets'] == 0 and before['optimizer'] == 0
        expected[row] = offsets
    assert expected['colora'] > 0 and expected['limit'] == expected['pissa'] == 0
    # the worker: kept = saved + gradients + optimizer state + the adapter's tensors,
    # offsets included (after its steps, as in the model above)
    out = memory_worker_of('colora')
    assert out['offsets'] == expected['colora']
    assert out['adapter'] > out['offsets']
    assert out['kept'] == out['saved'] + out['state'] + out['adapter']
    assert out['live'] > out['adapter'] + out['optimizer']


def memory_worker_of(row, *extra):
    res = subprocess.run(
        [sys.executable, osp.join(ROOT, 'benchmarks', 'bench_colora.py'), '--memory-worker',
         row, '--arch', 'atto', '--size', '64', '--head-channels', '16',
         '--memory-steps', '1', '--threads', '1', *extra],
        capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    import json
    line = [x for x in res.stdout.splitlines() if x.startswith('MEMORY ')][0]
    return json.loads(line[len('MEMORY '):])


def test_merge_table_check_fails_for_a_broken_merge(monkeypatch):
    """Table 3 builds ConvNeXt with layer scale 1.0 (as the dense-prediction configs
    do) and checks merged against unmerged relative to the output scale: a merge that
    drops the spatial branches (1.8e-6 at mmpretrain's default layer scale 1e-6) is
    refused."""
    import torch

    import colora_mm.adapters as adapters
    from colora_mm.adapters.spatial import SpatialLowRankBranch
    from colora_mm.models import CoLoRAConvNeXt
    bc = _bench()
    real = adapters.merge_adapters

    def broken(model, *a, **kw):
        unfolded = real(model, *a, **kw)
        if isinstance(model, CoLoRAConvNeXt):
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, SpatialLowRankBranch):
                        m.up.weight.zero_()
        return unfolded

    monkeypatch.setattr(adapters, 'merge_adapters', broken)
    monkeypatch.setattr(bc, 'interleaved', lambda fns, device, repeats: {k: 1.0 for k in fns})
    import types
    args = types.SimpleNamespace(device='cpu', amp=False, merge_size=32, merge_batch=1,
                                 repeats=1)
    with pytest.raises(AssertionError, match='ConvNeXt-T, filter on: the merged model '
                                             'differs from the unmerged one'):
        bc.bench_merge(args, {})
    assert bc.CONVNEXT_T['layer_scale_init_value'] == 1.0


@pytest.mark.parametrize('choice', ['auto', 'conv'])
def test_spatial_target_reads_the_packages_formulation(monkeypatch, capsys, choice):
    """Table 2b's verdict is the formulation the package runs here (the C++ kernel on
    the CPU where it builds and COLORA_MM_UP3X3 is auto; the grouped conv otherwise),
    not the fastest candidate; the others are printed for information."""
    import types
    bc = _bench()
    from colora_mm.adapters import up3x3
    monkeypatch.setenv('COLORA_MM_UP3X3', choice)
    fake = {'grouped conv': 1.0, bc.PACKAGE_KERNEL: 0.45, 'unfold-matmul': 0.3}
    monkeypatch.setattr(bc, 'interleaved',
                        lambda fns, device, repeats: {k: fake.get(k, 0.9) for k in fns})
    args = types.SimpleNamespace(device='cpu', arch='atto', size=32, batch=1, repeats=1)
    results = {}
    bc.bench_spatial(args, results)
    target = results['spatial_targets'][0]
    kernel = choice == 'auto' and up3x3.load_kernel() is not None
    if kernel:
        assert results['spatial_selected'] == bc.PACKAGE_KERNEL
        assert target['value'] == pytest.approx(0.45) and target['met']
    else:
        assert results['spatial_selected'] == 'grouped conv'
        assert target['value'] == pytest.approx(1.0) and not target['met']
    out = capsys.readouterr().out
    assert 'unfold-matmul 0.30' in out and 'fastest: unfold-matmul' in out


def test_a_failing_table_is_reported_and_the_others_are_kept(tmp_path):
    """One table failing: the next still runs, the JSON holds what finished (written
    after every table), and the run exits non-zero."""
    out_json = tmp_path / 'bench.json'
    code = (
        'import runpy, sys\n'
        'import colora_mm.adapters as a\n'
        'a.RangeKernelFilter = None\n'          # table 2 fails
        f'sys.argv = [{osp.join(ROOT, "benchmarks", "bench_colora.py")!r}, "--only", '
        f'"filter", "deltas", "--arch", "atto", "--repeats", "1", "--threads", "1", '
        f'"--json", {str(out_json)!r}]\n'
        'runpy.run_path(sys.argv[0], run_name="__main__")\n')
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 1, res.stderr[-3000:]
    assert 'table filter FAILED: TypeError' in res.stdout
    assert '4. Forming every weight update' in res.stdout
    import json
    results = json.loads(out_json.read_text())
    assert set(results['deltas_s']) == {'lora', 'hira', 'colora'}
    assert list(results['failed_tables']) == ['filter']


def test_a_failed_memory_worker_leaves_the_timing_table(monkeypatch, capsys):
    """Table 1 with one memory worker failing (e.g. out of memory): the timings and the
    other rows' memory are printed, the failed row's memory cells say so with the
    reason, its memory targets read 'not measured', and the table then fails."""
    import types

    import torch
    bc = _bench()
    names = ['full', 'limit', 'lora', 'colora']

    def build_trainer(method, args):
        step = lambda: None  # noqa: E731
        step.optimizer = None
        return torch.nn.Module(), step, 1000

    def measure_memory(method, args):
        if method == 'colora':
            raise bc.MemoryWorkerError(method, -9, 'some output\n')
        v = dict(full=100, limit=40, lora=45)[method] * 2 ** 20
        return dict(delta=v, live=v, kept=v, kind='peak RSS growth (test)')

    monkeypatch.setattr(bc, 'build_trainer', build_trainer)
    monkeypatch.setattr(bc, 'measure_memory', measure_memory)
    monkeypatch.setattr(bc, 'interleaved_times', lambda steps, device, repeats, warmup:
                        {m: [0.1 * (i + 1)] for i, m in enumerate(steps)})
    args = types.SimpleNamespace(methods=names, no_breakdown=True, device='cpu', arch='atto',
                                 size=64, batch=2, head_channels=16, repeats=1, amp=False,
                                 malloc='retain', memory_mmap_threshold=0)
    results = {}
    with pytest.raises(RuntimeError, match='memory workers of colora failed'):
        bc.bench_train(args, results)
    out = capsys.readouterr().out
    row = [ln for ln in out.splitlines() if ln.startswith('| colora |')][0]
    assert row.count('| failed ') == 7 and '| 400 |' in row     # its step time is there
    assert '| lora | ' in out and 'colora: killed by SIGKILL (out of memory?)' in out
    assert 'CoLoRA memory saving / limit saving (kept tensors): not measured' in out
    assert 'CoLoRA step / LoRA step: 1.333' in out
    assert results['train_memory_failed'] == {'colora': 'killed by SIGKILL (out of memory?)'}
    assert set(results['train_step_s']) == set(names)


def test_memory_notes_say_what_is_measured(monkeypatch, capsys):
    """Table 1b says its allocator column is step 1's (one step per process, as the
    spec asks at that size); the notes name CUDA's measure on CUDA."""
    import types
    bc = _bench()
    cuda = bc.memory_note(types.SimpleNamespace(device='cuda'))
    assert 'max_memory_allocated' in cuda and 'RSS' not in cuda
    assert 'peak RSS' in bc.memory_note(types.SimpleNamespace(device='cpu'))

    def measure_memory(method, args):
        assert args.memory_steps == 1 and args.size == 512
        v = dict(full=100, limit=40, colora=45)[method] * 2 ** 20
        return dict(delta=v, live=v, kept=v, kind='peak RSS growth (test)')

    monkeypatch.setattr(bc, 'measure_memory', measure_memory)
    args = types.SimpleNamespace(methods=['full', 'limit', 'colora'], device='cpu',
                                 amp=False, memory_mmap_threshold=0)
    bc.bench_paper(args, {})
    out = capsys.readouterr().out
    assert '| method | train mem MiB, step 1 |' in out
    assert 'train mem is the peak of step 1' in out


def test_gpu_check_takes_every_row_the_benchmark_takes(capsys):
    """gpu_check.sh reads the rows from the benchmark (--list-methods) instead of a list
    of its own: the optional rows (colora-frozen) and the package's methods (pissa)
    pass."""
    bc = _bench()
    assert bc.main(['--list-methods']) == {}
    rows = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert rows == bc.known_rows() and {'colora-frozen', 'pissa', 'peft-lora'} <= set(rows)
    with open(osp.join(ROOT, 'benchmarks', 'gpu_check.sh')) as f:
        script = f.read()
    assert 'bench_colora.py --list-methods' in script and 'b.BREAKDOWN' not in script
