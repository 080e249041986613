"""tools/analysis/correlation.py (appendix B): the mean singular values it reports for
checkpoints this test writes, against torch.linalg.svdvals computed directly."""
import csv
import importlib
import os.path as osp
import sys

import pytest
import torch

pytest.importorskip('mmseg')
pytest.importorskip('mmpretrain')

from colora_mm.adapters import (is_adapter_name, merge_adapters,  # noqa: E402
                                reset_adapters_from_weights)

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOLS = osp.join(ROOT, 'tools', 'analysis')


def load_tool(name):
    """The tools import each other by file name, as they do when run as scripts."""
    if TOOLS not in sys.path:
        sys.path.insert(0, TOOLS)
    return importlib.import_module(name)


correlation = load_tool('correlation')
param_flops = load_tool('param_flops')


def build(method, **adapter):
    model = param_flops._registry('mmseg').build(
        dict(type='CoLoRAConvNeXt', arch='atto', adapter=dict(method=method, **adapter)))
    reset_adapters_from_weights(model)     # partner buffers, as init_weights() does
    return model


def build_resnet(method='full'):
    return param_flops._registry('mmseg').build(
        dict(type='CoLoRAResNet', depth=50, base_channels=16, stem_channels=16,
             deep_stem=False, adapter=dict(method=method)))


def save(model, path, step, prefix='backbone.'):
    torch.save({'meta': {'iter': step},
                'state_dict': {prefix + k: v for k, v in model.state_dict().items()}},
               path)
    return str(path)


def direct(w_new, w_old):
    return torch.linalg.svdvals((w_new - w_old).double()).mean().item()


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_colora_series_against_merged_weights(tmp_path):
    """CoLoRA checkpoints as training leaves them (the effective partners hold the
    previous step's update, offsets of inner width r, where a fresh model has none):
    the tool's numbers equal svdvals of the differences of the merged (plain)
    pointwise weights, loaded from each checkpoint independently."""
    model = build('colora')
    gen = torch.Generator().manual_seed(0)
    paths = []
    for step in range(3):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if is_adapter_name(name):
                    p.add_(torch.randn(p.shape, generator=gen) * 0.02)
            model.train()
            model(torch.randn(1, 3, 64, 64, generator=gen))   # the partners move
            model.eval()
        offsets = [v for k, v in model.state_dict().items() if k.endswith('partner_l1')]
        assert offsets and all(v.shape[1] > 0 for v in offsets)
        paths.append(save(model, tmp_path / f'iter_{step * 100}.pth', step * 100))

    merged = []
    for path in paths:
        fresh = build('colora')
        sd = torch.load(path, weights_only=False)['state_dict']
        fresh.load_state_dict({k[len('backbone.'):]: v for k, v in sd.items()})
        assert merge_adapters(fresh) == [n for n in fresh.adapted_layer_names
                                         if n.endswith('depthwise_conv')]
        merged.append({f'stages.{i}.{j}': (blk.pointwise_conv1.weight.detach().clone(),
                                           blk.pointwise_conv2.weight.detach().clone())
                       for i, stage in enumerate(fresh.stages)
                       for j, blk in enumerate(stage)})

    out = tmp_path / 'out'
    rows = correlation.main([str(tmp_path), '--backbone', 'convnext_atto',
                             '--method', 'colora', '--out-dir', str(out)])
    assert len(rows) == 2 * 12                            # 2 intervals x 12 blocks
    on_disk = read_csv(out / 'mean_singular_values.csv')
    assert len(on_disk) == len(rows)
    assert (out / 'mean_singular_values.png').stat().st_size > 10_000
    for row, disk in zip(rows, on_disk):
        k = row['interval']
        new, old = merged[k][row['block']], merged[k - 1][row['block']]
        assert row['W1'] == pytest.approx(direct(new[0], old[0]), rel=1e-5)
        assert row['W2'] == pytest.approx(direct(new[1], old[1]), rel=1e-5)
        assert float(disk['W1']) == pytest.approx(row['W1'], rel=1e-6)
        assert disk['block'] == row['block']
        assert disk['to'] == f'iter {k * 100}' and disk['from'] == f'iter {(k - 1) * 100}'
        assert row['W1'] > 0 and row['W2'] > 0


def test_effective_weights_include_the_adapter_update(tmp_path):
    """Changing only adapter parameters moves the measured weights: the tool reads
    W + dW, not the frozen base weight."""
    model = build('colora')
    a = save(model, tmp_path / 'a.pth', 0)
    with torch.no_grad():
        model.stages[3][1].pointwise_conv1.adapter_branch.pair.B1.fill_(0.1)
    b = save(model, tmp_path / 'b.pth', 1)
    rows = correlation.weight_update_study(build('colora'), [a, b])
    moved = {r['block'] for r in rows if r['W1'] > 0 or r['W2'] > 0}
    assert moved == {'stages.3.1'}
    row = [r for r in rows if r['block'] == 'stages.3.1'][0]
    assert row['W1'] > 1e-3 and row['W2'] == 0.0        # B1 only feeds W1' (Eq. 14)


def test_labels_follow_the_checkpoint_kind():
    """mmengine records both counters in every checkpoint: an epoch-based run's
    ``epoch_N.pth`` is labelled by its epoch, an ``iter_N.pth`` by its iteration."""
    ckpt = {'meta': {'epoch': 3, 'iter': 1500}}
    assert correlation.checkpoint_label('/w/epoch_3.pth', ckpt) == 'epoch 3'
    assert correlation.checkpoint_label('/w/iter_1500.pth', ckpt) == 'iter 1500'
    assert correlation.checkpoint_label('/w/best.pth', ckpt) == 'iter 1500'
    assert correlation.checkpoint_label('/w/epoch_2.pth', {'meta': {'iter': 9}}) == 'iter 9'
    assert correlation.checkpoint_label('/w/model.pth', {'state_dict': {}}) == 'model'


def test_plain_resnet_against_raw_tensors_and_a_known_update(tmp_path):
    """A plain (full fine-tuning) ResNet: bottleneck pairs (conv1, conv3) read straight
    from the checkpoint tensors, and a rank-1 update of known singular value."""
    model = build_resnet('full')
    a = save(model, tmp_path / 'epoch_1.pth', 1, prefix='')
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
        w = model.layer2[1].conv1.weight                       # (out, in, 1, 1)
        u = torch.randn(w.shape[0], generator=gen)
        v = torch.randn(w.shape[1], generator=gen)
    b = save(model, tmp_path / 'epoch_2.pth', 2, prefix='')
    with torch.no_grad():
        w.add_((3.0 * torch.outer(u / u.norm(), v / v.norm())).view_as(w))
    c = save(model, tmp_path / 'epoch_3.pth', 3, prefix='')

    study = correlation.weight_update_study(build_resnet('full'), [a, b, c])
    blocks = sorted({r['block'] for r in study})
    assert len(blocks) == 16                                  # 3 + 4 + 6 + 3 bottlenecks
    sds = [torch.load(p, weights_only=False)['state_dict'] for p in (a, b, c)]
    for r in study:
        k = r['interval']
        for col, conv in (('W1', 'conv1'), ('W2', 'conv3')):
            key = f'{r["block"]}.{conv}.weight'
            new, old = sds[k][key].flatten(1), sds[k - 1][key].flatten(1)
            assert r[col] == pytest.approx(direct(new, old), rel=1e-6)
    known = [r for r in study if r['interval'] == 2 and r['block'] == 'layer2.1'][0]
    assert known['W1'] == pytest.approx(3.0 / min(w.shape[:2]), rel=1e-5)
    assert known['W2'] == 0.0
    assert all(r['W1'] == 0.0 for r in study if r['interval'] == 2
               and r['block'] != 'layer2.1')


def test_refuses_a_checkpoint_of_another_model(tmp_path):
    a = save(build('colora'), tmp_path / 'a.pth', 0)
    b = save(build('colora'), tmp_path / 'b.pth', 1)
    with pytest.raises(ValueError, match='does not match the model'):
        correlation.weight_update_study(build('lora'), [a, b])
    with pytest.raises(ValueError, match='at least two'):
        correlation.expand_checkpoints([a])


@pytest.fixture
def two_checkpoints(tmp_path):
    model = build('full')
    return [save(model, tmp_path / f'iter_{i}.pth', i) for i in (1, 2)]


def test_command_line_errors_are_one_line(tmp_path, capsys, two_checkpoints):
    """Bad input: one ``error:`` line naming the file or the argument, exit status 2,
    nothing written."""
    a, b = two_checkpoints
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'notes.pth').write_text('# not a checkpoint\n')
    (tmp_path / 'a_file').write_text('x')
    out = tmp_path / 'out'
    cases = [
        ([str(tmp_path / 'nothere.pth')],
         f'checkpoint {tmp_path / "nothere.pth"} does not exist'),
        ([a, str(tmp_path / 'nothere.pth')],
         f'checkpoint {tmp_path / "nothere.pth"} does not exist'),
        ([a], f'need at least two checkpoints (the study compares consecutive ones), got '
         f'1: {a}'),
        ([str(tmp_path / 'empty')], f'folder {tmp_path / "empty"} holds no iter_*.pth'),
        ([a, b, '--config', str(tmp_path / 'nothere.py')],
         f'config file {tmp_path / "nothere.py"} does not exist'),
        ([a, b, '--backbone', 'vit_b'], '--backbone vit_b: use convnext_b'),
        ([a, str(tmp_path / 'notes.pth'), '--backbone', 'convnext_atto'],
         f'cannot read checkpoint {tmp_path / "notes.pth"}'),
        ([a, b, '--backbone', 'convnext_atto', '--method', 'lora'],
         f'{a} does not match the model'),
        ([a, b, '--out-dir', str(tmp_path / 'a_file')],
         f'--out-dir {tmp_path / "a_file"} is a file'),
    ]
    for argv, message in cases:
        if '--out-dir' not in argv:
            argv = argv + ['--out-dir', str(out)]
        assert correlation.cli(argv) == 2, argv
        captured = capsys.readouterr()
        line, = captured.err.strip().splitlines()
        assert line.startswith(f'error: {message}'), (argv, line)
        assert not out.exists()
    assert (tmp_path / 'a_file').read_text() == 'x'
    assert correlation.cli([a, b, '--backbone', 'convnext_atto', '--method', 'full',
                            '--out-dir', str(out)]) == 0
    assert (out / 'mean_singular_values.csv').is_file()


def test_script_exit_status(tmp_path):
    import os
    import subprocess
    result = subprocess.run([sys.executable, osp.join(TOOLS, 'correlation.py'),
                             'nothere.pth', '--out-dir', str(tmp_path / 'out')],
                            capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
                            env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1'))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1] == 'error: checkpoint nothere.pth does not exist'
    assert 'Traceback' not in result.stderr
    assert not (tmp_path / 'out').exists()


def test_a_model_of_other_settings_is_one_line(tmp_path, capsys):
    """A checkpoint of the same method at another gamma (same keys, other shapes), or
    settings no model takes: one ``error:`` line, exit status 2."""
    a = save(build('colora'), tmp_path / 'iter_1.pth', 0)
    b = save(build('colora'), tmp_path / 'iter_2.pth', 1)
    cases = [
        (['--method', 'colora', '--gamma', '2'], 'does not match the model'),
        (['--method', 'colora', '--gamma', '0'], 'gamma=0'),
        (['--method', 'colora', '--share-ratio', '3'], 'share_ratio'),
    ]
    for extra, message in cases:
        argv = [a, b, '--backbone', 'convnext_atto', *extra, '--out-dir',
                str(tmp_path / 'out')]
        assert correlation.cli(argv) == 2, argv
        line, = capsys.readouterr().err.strip().splitlines()
        assert line.startswith('error: ') and message in line, (argv, line)


def test_correlation_summary_needs_three_intervals_and_takes_the_true_median():
    def blocks(*curves):
        return {f'b{i}': {'interval': list(range(len(w1))), 'W1': w1, 'W2': w2}
                for i, (w1, w2) in enumerate(curves)}
    short = correlation.correlation_summary(blocks(([1.0, 2.0], [2.0, 1.0])))
    assert short.startswith('2 interval(s) per block: too few') and 'four or more' in short
    up, down = [1.0, 2.0, 3.0], [3.0, 2.0, 1.0]
    line = correlation.correlation_summary(blocks(
        (up, up), (up, down), (up, [1.0, 3.0, 2.0]), (up, [2.0, 3.0, 1.0])))
    # r = 1, -1, 0.5, -0.5: the median of four is the mean of the middle two
    assert line == ('Pearson r of the W1 and W2 curves over 4 blocks: median 0.000, '
                    'min -1.000, max 1.000'), line
