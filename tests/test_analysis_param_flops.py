"""tools/analysis/param_flops.py: appendix Table 1's formulas against what runs on the
built backbones (parameters, matmul MACs of the weight updates, branch MACs, merged
inference), on small ConvNeXt and ResNet backbones."""
import glob
import os
import importlib
import os.path as osp
import sys

import pytest
import torch

pytest.importorskip('mmseg')
pytest.importorskip('mmpretrain')

from colora_mm.adapters import (CoLoRAPairLayer, HiRA, LoRA,  # noqa: E402
                                SpatialLowRankBranch, iter_adapted_layers,
                                reset_adapters_from_weights)

TOOLS = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'tools', 'analysis')
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)
param_flops = importlib.import_module('param_flops')

SIZE = (64, 64)


def build(kind, **adapter):
    if kind == 'convnext':
        cfg = dict(type='CoLoRAConvNeXt', arch='atto', out_indices=(0, 1, 2, 3))
    else:
        cfg = dict(type='CoLoRAResNet', depth=50, base_channels=32, stem_channels=32,
                   deep_stem=False)
    model = param_flops._registry('mmseg').build(dict(cfg, adapter=adapter))
    if adapter['method'] == 'colora':
        reset_adapters_from_weights(model)      # partner buffers, as init_weights() does
    return model


def matmul_part(layer):
    """The matmul-only part of Table 1's update cost: r d_in d_out per LoRA/PiSSA/HiRA
    layer; (r + rs) d'(d + d'') per CoLoRA pair (Bs W2^T and W1^T As cost rs d'(d+d''),
    the three products with As, Bs, A_i, B_i another r d'(d + d''))."""
    a = layer.adapter_branch
    if isinstance(a, CoLoRAPairLayer):
        if a.index:
            return 0
        p = a.get_pair()
        return (p.r + p.rs) * p.d_mid * (p.d + p.d_out)
    if isinstance(a, (LoRA, HiRA)):
        return a.rank * layer.in_channels * layer.out_channels
    return 0


@pytest.mark.parametrize('kind,adapter', [
    ('convnext', dict(method='colora')),
    ('resnet', dict(method='colora', gamma=4, share_ratio=0.8)),
    ('resnet', dict(method='colora', use_filter=False)),
    ('convnext', dict(method='lora')),
    ('resnet', dict(method='pissa')),
    ('convnext', dict(method='hira')),
    ('resnet', dict(method='conv_adapter')),
    ('convnext', dict(method='full'))],
    ids=lambda a: a if isinstance(a, str) else '-'.join(str(v) for v in a.values()))
def test_counts_match_table1(kind, adapter):
    model = build(kind, **adapter)
    row = param_flops.analyse(model, 'x', '', adapter, SIZE)
    layers = list(iter_adapted_layers(model))
    method = adapter['method']

    # parameters: every adapter's own count, its tensors, and the closed form agree
    assert row.adapters == row.adapters_formula
    assert row.adapters == sum(p.numel() for n, p in model.named_parameters()
                               if 'adapter_' in n)
    total = sum(p.numel() for p in model.parameters())
    assert row.backbone_params == total - row.adapters
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert row.trainable == trainable
    if method == 'full':
        assert row.trainable == total and row.percent == 100.0

    # weight updates: matmul MACs exactly Table 1's matmul terms; the remaining
    # element-wise work is O(d d') per layer (the scalings, HiRA's Hadamard, W + dW)
    assert row.update_counted_matmul == sum(matmul_part(layer) for _, layer in layers)
    elementwise = row.update_counted - row.update_counted_matmul
    sizes = sum(layer.weight.numel() for _, layer in layers
                if layer.adapter_branch.delta_weight(layer) is not None)
    assert sizes <= elementwise <= 5 * sizes
    assert (row.update_formula == 0) == (method in ('full', 'conv_adapter'))

    # branches: Conv-Adapter and the filter-less spatial branch are exact; the filter's
    # separable passes run as products with m x m axis operators (m multiply-adds per
    # output instead of k): counted = formula + 4 r hw (h + w - 2k) per spatial branch
    has_filter = method == 'colora' and adapter.get('use_filter', True)
    if has_filter:
        extra = 0
        for name, layer in layers:
            f = getattr(layer.adapter_branch, 'filter', None)
            if f is not None:
                h, w = row.layer_shapes[name][:2]
                extra += 4 * layer.adapter_branch.rank * h * w * (h + w - 2 * f.window)
        assert row.branch_counted == row.branch_formula + extra
    else:
        assert row.branch_counted == row.branch_formula
    assert (row.branch_formula > 0) == (method in ('colora', 'conv_adapter'))

    # inference: what folds costs nothing; what stays is the branch cost
    folds_all = method in ('lora', 'pissa', 'hira', 'full') or (
        method == 'colora' and kind == 'resnet' and not has_filter)
    if folds_all:
        assert row.unfolded == [] and row.infer_merged == row.infer_plain
    else:
        assert row.unfolded
        assert row.infer_merged > row.infer_plain
    if not has_filter:
        assert row.infer_merged == row.infer_formula


def test_paper_lookup_and_table():
    assert param_flops.paper_params('convnext_b', dict(method='colora', gamma=8,
                                                       share_ratio=0.8)) == 5.7
    assert param_flops.paper_params('resnet50', dict(method='hira')) == 1.2
    assert param_flops.paper_params('resnet50', dict(method='hira', gamma=20)) == 1.2
    assert param_flops.paper_params('resnet50', dict(method='hira', gamma=8)) is None
    assert param_flops.paper_params('convnext_s', dict(method='colora')) == 2.6
    assert param_flops.paper_params('convnext_s', dict(method='lora')) is None
    variants = param_flops.default_variants(['convnext_b'], ['colora', 'full'], None,
                                            None, sweep=True)
    assert len(variants) == 2 + 7          # the default (16, 0.5) is not repeated
    row = param_flops.analyse(build('convnext', method='colora'), 'atto colora', '',
                              dict(method='colora'), SIZE)
    line = param_flops.format_row(row)
    assert line.count('|') == param_flops.HEADER.count('|')


# ------------------------------------------------ the paper's ConvNeXt #Param figures
ROOT = osp.dirname(osp.dirname(TOOLS))
PAPER_TOLERANCE = 1.1        # percent
CONVNEXT_COLORA = [(kind, adapter) for kind, adapter in param_flops.default_variants(
    ['convnext_s', 'convnext_b'], ['colora'], None, None, sweep=True)]
COLORA_CONVNEXT_CONFIGS = sorted(
    p for p in glob.glob(osp.join(ROOT, 'configs', 'ade20k', 'upernet_colora*_convnext_*.py'))
    + glob.glob(osp.join(ROOT, 'configs', 'coco', 'faster-rcnn_colora_convnext_*.py'))
    if 'per-stage' not in p)          # per-layer settings: beyond the paper's set-ups


def full_size(build_fn, *args):
    """A full-width backbone (a few seconds each for ConvNeXt-B on one CPU thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_fn(*args)
    finally:
        torch.set_num_threads(threads)


def test_grid_covers_every_convnext_colora_figure():
    keys = {k for k in param_flops.PAPER_PARAMS
            if k[0].startswith('convnext') and k[1] == 'colora'}
    assert len(keys) == 9
    covered = {(kind, 'colora', a['gamma'], a['share_ratio']) for kind, a in CONVNEXT_COLORA}
    assert covered == keys
    # the paper rule on ConvNeXt, the spec's default on ResNet-50; overridable
    assert all(a['spatial_gamma'] == 2 * a['gamma'] for _, a in CONVNEXT_COLORA)
    (_, r50), = param_flops.default_variants(['resnet50'], ['colora'], None, None, True)
    assert 'spatial_gamma' not in r50
    (_, same), = param_flops.default_variants(['convnext_s'], ['colora'], None, None,
                                              True, spatial_gamma='gamma')
    assert 'spatial_gamma' not in same
    (_, fixed), = param_flops.default_variants(['resnet50'], ['colora'], None, None,
                                               True, spatial_gamma=8)
    assert fixed['spatial_gamma'] == 8
    with pytest.raises(ValueError, match="spatial_gamma: 'half'; expected a positive "
                       "integer, 'gamma' or 'paper'"):
        param_flops.spatial_gamma_for('convnext_s', 16, 'half')


@pytest.mark.parametrize('kind,adapter', CONVNEXT_COLORA,
                         ids=[param_flops.variant_name(k, a) for k, a in CONVNEXT_COLORA])
def test_convnext_colora_rows_match_the_paper(kind, adapter):
    """Every ConvNeXt CoLoRA #Param of Tables 5-8, counted on the built backbone (the
    adapters' tensors + every bias + every norm), within 1.1% of the paper's."""
    model = full_size(param_flops.build_backbone, kind, adapter)
    row = param_flops.analyse(model, param_flops.variant_name(kind, adapter), kind,
                              adapter, flops=False)
    assert row.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert row.adapters == row.adapters_formula
    assert row.spatial_gamma == 2 * adapter['gamma']
    spatial = [layer for _, layer in iter_adapted_layers(model)
               if isinstance(layer.adapter_branch, SpatialLowRankBranch)]
    assert len(spatial) == {'convnext_s': 36, 'convnext_b': 36}[kind]
    for layer in spatial:      # the branch built at rank C // (2 gamma)
        assert layer.adapter_branch.rank == layer.in_channels // (2 * adapter['gamma'])
    assert row.paper_m is not None
    assert abs(row.paper_diff) <= PAPER_TOLERANCE, param_flops.format_row(row, True)


def test_spatial_rank_gamma_misses_the_paper():
    """The control: the spatial branch at rank C // gamma counts over 1.1% above."""
    kind, adapter = 'convnext_s', dict(method='colora', gamma=16, share_ratio=0.5)
    model = full_size(param_flops.build_backbone, kind, adapter)
    row = param_flops.analyse(model, 'x', kind, adapter, flops=False)
    assert row.spatial_gamma == 16
    assert row.paper_diff > PAPER_TOLERANCE


def test_convnext_colora_configs_match_the_paper():
    """The paper-reproduction configs, taken as they are (their adapter dict), count
    within 1.1% of the paper's figure for their backbone and (gamma, share_ratio)."""
    assert len(COLORA_CONVNEXT_CONFIGS) >= 10      # S (ADE20K, COCO), B, the Table 8 sweep
    for path in COLORA_CONVNEXT_CONFIGS:
        model, adapter, kind = full_size(param_flops.backbone_from_config, path)
        assert adapter['spatial_gamma'] == 2 * adapter['gamma'], path
        row = param_flops.analyse(model, osp.basename(path), kind, adapter, flops=False)
        assert row.paper_m is not None, path
        assert abs(row.paper_diff) <= PAPER_TOLERANCE, (path, row.paper_diff)


def test_config_path():
    """A shipped config's backbone builds without its pretrained checkpoint."""
    cfg = osp.join(osp.dirname(osp.dirname(TOOLS)), 'configs', 'ade20k',
                   'upernet_hira_r50_4xb4-160k_ade20k-512x512.py')
    model, adapter, kind = param_flops.backbone_from_config(cfg)
    assert kind == 'resnet50' and adapter['method'] == 'hira'
    assert all(isinstance(layer.adapter_branch, HiRA)
               for _, layer in iter_adapted_layers(model))


def test_per_stage_tables(capsys, tmp_path):
    """A config with overrides: per-stage rows, no paper #Param, the table printed."""
    cfg = osp.join(osp.dirname(osp.dirname(TOOLS)), 'configs', 'ade20k',
                   'upernet_colora-per-stage_convnext_b_4xb4-160k_ade20k-512x512.py')
    model, adapter, kind = param_flops.backbone_from_config(cfg)
    assert kind == 'convnext_b' and adapter['overrides']
    row = param_flops.analyse(model, 'per-stage', kind, adapter, SIZE)
    assert row.overrides and row.paper_m is None
    stages = {s['stage']: s for s in row.stages}
    assert stages['stages.0']['adapted'] == 0
    assert stages['stages.3']['adapters'] == {'pair g8 r=128 (rs=102, rl=26)': 3,
                                              'spatial r=64 +filter': 3}
    assert sum(s['params'] for s in row.stages) == row.adapters
    param_flops.print_stage_tables([row])
    out = capsys.readouterr().out
    assert 'per-stage: adapters per stage' in out and 'pair g8 r=128' in out
    # --per-stage on the built-in grid
    rows = param_flops.main(['--backbone', 'resnet50', '--method', 'lora', '--per-stage',
                             '--input-size', '32', '32', '--json',
                             str(tmp_path / 'rows.json')])
    out = capsys.readouterr().out
    assert 'resnet50 lora: adapters per stage' in out and 'layer4' in out
    assert out.startswith('Input 32x32, one image; FLOPs are multiply-accumulates')
    assert [s['stage'] for s in rows[0].stages] == ['layer1', 'layer2', 'layer3', 'layer4']


# ----------------------------------------------------------------- the command line
DEMO_CONFIGS = sorted(glob.glob(osp.join(ROOT, 'configs', 'demo', '*.py')))


def test_demo_configs_with_an_arch_dict(capsys):
    """The demo's ConvNeXt has its own depths and channels (an arch dict): a custom
    arch, counted like any other."""
    assert len(DEMO_CONFIGS) == 5
    assert param_flops.kind_of(dict(type='CoLoRAConvNeXt', arch=dict(
        depths=[1, 1, 2, 1], channels=[16, 32, 64, 128]))) == 'convnext_custom'
    assert param_flops.kind_of(dict(type='CoLoRAConvNeXt', arch='base')) == 'convnext_b'
    rows = param_flops.main(DEMO_CONFIGS + ['--params-only'])
    assert [r.backbone for r in rows] == ['convnext_custom'] * len(DEMO_CONFIGS)
    assert all(r.paper_m is None for r in rows)
    # the per-stage config's stage tables
    assert 'finetune_colora-per-stage_target: adapters per stage' in capsys.readouterr().out
    # and its FLOPs at the demo's 64x64 images
    lora = [p for p in DEMO_CONFIGS if p.endswith('finetune_lora_target.py')]
    row, = param_flops.main(lora + ['--input-size', '64', '64'])
    assert row.infer_plain > 0 and row.update_counted > 0


REPO_DIR = osp.dirname(osp.dirname(osp.abspath(__file__)))
README = osp.join(REPO_DIR, 'README.md')


@pytest.mark.parametrize('argv,message', [
    (['nothere.py', '--params-only'], 'config file nothere.py does not exist'),
    (['--backbone', 'resnet50', '--method', 'lora', '--input-size', '0', '0'],
     '--input-size 0 0: each side must be at least 32'),
    (['--backbone', 'resnet50', '--method', 'lora', '--input-size', '-8', '8'],
     '--input-size -8 8: each side must be at least 32'),
    (['CONFIG', '--input-size', '16', '64'],
     '--input-size 16 64: each side must be at least 32'),
    ([REPO_DIR, '--params-only'], f'config file {REPO_DIR} is a folder'),
    ([README, '--params-only'], f'{README} is not an mmseg/mmdet/mmpretrain model'),
    (['--backbone', 'resnet50', '--method', 'lora', '--gamma', '0', '--params-only'],
     'resnet50 lora'),
    (['--backbone', 'resnet50', '--method', 'lora', '--params-only', '--json',
      '/nonexistent_dir/rows.json'], '--json /nonexistent_dir/rows.json: its folder'),
    (['--backbone', 'resnet50', '--method', 'lora', '--params-only', '--json', REPO_DIR],
     f'--json {REPO_DIR} is a folder; name a file'),
    (['BAD_ADAPTER', '--params-only'], 'BAD_ADAPTER: model.backbone (')])
def test_user_errors_are_one_line(capsys, tmp_path, argv, message):
    bad = tmp_path / 'bad_adapter.py'    # a config whose adapter cannot be built
    bad.write_text(f"_base_ = [{DEMO_CONFIGS[0]!r}]\n"
                   "model = dict(backbone=dict(adapter=dict(gamma=0)))\n")
    argv = [str(bad) if a == 'BAD_ADAPTER' else a for a in argv]
    message = message.replace('BAD_ADAPTER', str(bad))
    argv = [DEMO_CONFIGS[0] if a == 'CONFIG' else a for a in argv]
    assert param_flops.cli(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ''
    line, = captured.err.strip().splitlines()
    assert line.startswith(f'error: {message}')


def test_the_table_8_sweep_comes_with_colora_only():
    names = [param_flops.variant_name(k, a) for k, a in param_flops.default_variants(
        ['convnext_b'], ['lora'], None, None, True, 'paper')]
    assert names == ['convnext_b lora']


def test_script_exit_status(tmp_path):
    import subprocess
    result = subprocess.run([sys.executable, osp.join(TOOLS, 'param_flops.py'),
                             str(tmp_path / 'missing.py'), '--params-only'],
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1'))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1] == f'error: config file {tmp_path / "missing.py"} does not exist'
    assert 'Traceback' not in result.stderr
