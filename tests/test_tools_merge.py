"""tools/merge.py on tiny versions of the shipped configs: exact folding, the upstream
checkpoint it writes when everything folds (loaded without colora_mm), the structure
it keeps when something does not, and the inputs it refuses without writing."""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

pytest.importorskip('mmseg')
pytest.importorskip('mmdet')

from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402

import colora_mm  # noqa: E402,F401
from colora_mm.adapters import is_adapter_name, iter_adapted_layers  # noqa: E402
from data_gen import (make_ade20k,  # noqa: E402
                      write_tiny_config)
from helpers_ckpt import trained_checkpoint  # noqa: E402
from tools_loader import load_tool  # noqa: E402

pytestmark = pytest.mark.usefixtures('fast_config_loading', 'one_thread')

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


ADE = osp.join(ROOT, 'configs', 'ade20k')
COCO = osp.join(ROOT, 'configs', 'coco')


merge_tool = load_tool('merge')


def registry(scope):
    init_default_scope(scope)
    if scope == 'mmseg':
        from mmseg.registry import MODELS
    else:
        from mmdet.registry import MODELS
    return MODELS


def tiny(tmp_path, shipped, name='tiny.py', data_root=None, **extra):
    return write_tiny_config(shipped, str(tmp_path / name), data_root=data_root,
                             extra=extra)


test_tool = load_tool('test')


def features(model, x):
    with torch.no_grad():
        return [t.clone() for t in model.extract_feat(x)]


def run_merge(*argv):
    return merge_tool.main([str(a) for a in argv] + ['--shape', '64'])


NO_COLORA = r'''
import sys, torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
for case in sys.argv[1:]:
    cfg = Config.fromfile(f'{case}/merged.py')   # imports what custom_imports names
    init_default_scope(cfg.default_scope)
    if cfg.default_scope == 'mmseg':
        from mmseg.registry import MODELS
    else:
        from mmdet.registry import MODELS
    model = MODELS.build(cfg.model).eval()
    from mmengine.registry import HOOKS   # what a Runner builds from the config
    with HOOKS.switch_scope_and_registry(cfg.default_scope) as hooks:
        for hook in [*cfg.default_hooks.values(), *cfg.get('custom_hooks', [])]:
            assert hooks.get(hook['type']) is not None, (case, hook['type'])
    state = torch.load(f'{case}/merged.pth', map_location='cpu',
                       weights_only=True)['state_dict']
    model.load_state_dict(state, strict=True)
    x, expected = torch.load(f'{case}/ref.pt')
    with torch.no_grad():
        got = model.extract_feat(x)
    diff = max(float((a - b).abs().max()) for a, b in zip(got, expected))
    assert diff < 1e-4, (case, diff)
    print('plain', type(model.backbone).__module__, diff)
leaked = sorted(m for m in sys.modules if m.split('.')[0] == 'colora_mm')
assert not leaked, leaked
'''

FULL_FOLD_CASES = {
    'lora-convnext-seg': (f'{ADE}/upernet_lora_convnext_s_4xb4-160k_ade20k-512x512.py',
                          {}, 'mmpretrain.models.backbones.convnext'),
    'colora-nofilter-r50-det': (
        f'{COCO}/faster-rcnn_colora_r50_fpn_2xb8-1x_coco.py',
        dict(model=dict(backbone=dict(adapter=dict(use_filter=False)))),
        'mmdet.models.backbones.resnet'),
    'hira-r50-seg': (f'{ADE}/upernet_hira_r50_4xb4-160k_ade20k-512x512.py', {},
                     'mmseg.models.backbones.resnet'),
}


def test_full_fold_gives_an_upstream_checkpoint(tmp_path):
    ade = make_ade20k(str(tmp_path / 'ade'))
    for case, (shipped, overrides, _) in FULL_FOLD_CASES.items():
        folder = tmp_path / case
        folder.mkdir()
        seg = '/ade20k/' in shipped
        config = tiny(folder, shipped, data_root=ade if seg else None, **overrides)
        ckpt = folder / 'iter_1.pth'
        model = trained_checkpoint(config, ckpt)
        x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        torch.save((x, features(model, x)), folder / 'ref.pt')
        assert run_merge(config, ckpt, folder / 'merged.pth') == 0, case
        state = torch.load(folder / 'merged.pth', weights_only=True)['state_dict']
        assert not [k for k in state if is_adapter_name(k)], case
        assert 'colora' not in (folder / 'merged.py').read_text().lower(), case
        if seg:   # tools/test.py evaluates both to the same mIoU
            miou = []
            for name, cfg, weights in (('a', config, ckpt),
                                       ('b', folder / 'merged.py', folder / 'merged.pth')):
                work = folder / f'test_{name}'
                assert test_tool.main([str(cfg), str(weights), '--work-dir',
                                       str(work)]) == 0
                miou.append(json.loads((work / 'metrics.json').read_text())['mIoU'])
            assert miou[0] == miou[1], (case, miou)
    # Loaded with mmseg/mmdet/mmpretrain alone, by the written configs: same outputs.
    env = dict(os.environ, PYTHONPATH='', OMP_NUM_THREADS='1')
    result = subprocess.run(
        [sys.executable, '-c', NO_COLORA] + [str(tmp_path / c) for c in FULL_FOLD_CASES],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for _, _, plain_module in FULL_FOLD_CASES.values():
        assert f'plain {plain_module}' in result.stdout


def test_partial_fold_keeps_the_unfoldable_branches(tmp_path, capsys):
    config = tiny(tmp_path, f'{ADE}/colora_convnext_b.py')
    ckpt = tmp_path / 'iter_1.pth'
    model = trained_checkpoint(config, ckpt)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    reference = features(model, x)
    out = tmp_path / 'merged.pth'
    assert run_merge(config, ckpt, out) == 0
    printed = capsys.readouterr().out
    assert 'max |merged - unmerged| =' in printed
    # ConvNeXt's spatial branch is cross-channel beside a depthwise conv: never folds.
    for i in range(4):
        assert f'backbone.stages.{i}.0.depthwise_conv' in printed
    assert 'folded 8 of 12 adapted layers' in printed
    state = torch.load(out, weights_only=True)['state_dict']
    kept = {k.split('.adapter_')[0] for k in state if is_adapter_name(k)}
    assert kept == {f'backbone.stages.{i}.0.depthwise_conv' for i in range(4)}
    # The written config builds that structure by itself (adapter.merged=True); the
    # checkpoint loads into it exactly.
    cfg = Config.fromfile(str(tmp_path / 'merged.py'))
    assert cfg.model.backbone.adapter.merged is True
    rebuilt = registry(cfg.default_scope).build(cfg.model).eval()
    rebuilt.load_state_dict(state, strict=True)
    got = features(rebuilt, x)
    assert max(float((a - b).abs().max()) for a, b in zip(got, reference)) < 1e-4
    assert len(list(iter_adapted_layers(rebuilt.backbone))) == 4


def _nothing_written(tmp_path, before):
    assert set(os.listdir(tmp_path)) == before


def test_refuses_a_checkpoint_of_another_config(tmp_path, capsys):
    colora = tiny(tmp_path, f'{ADE}/colora_convnext_b.py', name='a.py')
    lora = tiny(tmp_path, f'{ADE}/upernet_lora_convnext_b_4xb4-160k_ade20k-512x512.py',
                name='b.py')
    ckpt = tmp_path / 'colora.pth'
    trained_checkpoint(colora, ckpt)
    capsys.readouterr()            # what building and initialising the model logged
    before = set(os.listdir(tmp_path))
    assert run_merge(lora, ckpt, tmp_path / 'out.pth') == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ')
    assert 'does not match config' in err[0] and 'missing' in err[0]
    _nothing_written(tmp_path, before)


def test_refuses_other_shapes(tmp_path, capsys):
    g16 = tiny(tmp_path, f'{ADE}/colora_convnext_b.py', name='a.py')
    g8 = tiny(tmp_path,
              f'{ADE}/upernet_colora-g8-sr0.5_convnext_b_4xb4-160k_ade20k-512x512.py',
              name='b.py')
    ckpt = tmp_path / 'g16.pth'
    trained_checkpoint(g16, ckpt)
    before = set(os.listdir(tmp_path))
    assert run_merge(g8, ckpt, tmp_path / 'out.pth') == 2
    err = capsys.readouterr().err
    assert 'other shapes' in err
    _nothing_written(tmp_path, before)


def _refused(tmp_path, capsys, config, ckpt, fragment):
    """merge.py refuses ``ckpt`` with one error line holding ``fragment`` and writes
    nothing."""
    capsys.readouterr()
    before = set(os.listdir(tmp_path))
    assert run_merge(config, ckpt, tmp_path / 'again.pth') == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    _nothing_written(tmp_path, before)


def test_refuses_a_checkpoint_without_adapters(tmp_path, capsys):
    config = tiny(tmp_path, f'{ADE}/upernet_lora_convnext_s_4xb4-160k_ade20k-512x512.py')
    ckpt = tmp_path / 'iter_1.pth'
    trained_checkpoint(config, ckpt)
    assert run_merge(config, ckpt, tmp_path / 'merged.pth') == 0
    # A merged (plain) checkpoint given back to merge: nothing to merge; merge.py's
    # record names where it came from and the config written beside it.
    _refused(tmp_path, capsys, config, tmp_path / 'merged.pth',
             f'was written by tools/merge.py from {ckpt} (its config: '
             f'{tmp_path / "merged.py"}): it is merged already')
    # the same tensors without merge.py's record: no adapter tensors
    bare = tmp_path / 'bare.pth'
    torch.save({'state_dict': torch.load(tmp_path / 'merged.pth',
                                         weights_only=True)['state_dict']}, bare)
    _refused(tmp_path, capsys, config, bare, 'holds no adapter tensors')


def test_a_checkpoint_without_a_settings_record_merges_with_a_warning(tmp_path, capsys):
    """A bare state dict records no adapter settings: the settings that change no
    tensor (here LoRA's scaling) cannot be compared, and merge says so on stderr
    (exit 0); a runner's checkpoint records them and gets no such line."""
    from colora_mm.engine.adapter_settings import META_KEY, config_adapter_settings
    config = tiny(tmp_path, f'{ADE}/upernet_lora_convnext_s_4xb4-160k_ade20k-512x512.py')
    ckpt = tmp_path / 'iter_1.pth'
    trained_checkpoint(config, ckpt)
    # the record AtomicCheckpointHook writes into a run's checkpoints
    recorded = torch.load(ckpt, weights_only=False)
    recorded['meta'][META_KEY] = config_adapter_settings(Config.fromfile(config))
    torch.save(recorded, ckpt)
    capsys.readouterr()
    assert run_merge(config, ckpt, tmp_path / 'a.pth') == 0
    assert 'records no adapter settings' not in capsys.readouterr().err
    bare = tmp_path / 'bare.pth'
    torch.save({'state_dict': torch.load(ckpt, weights_only=False)['state_dict']}, bare)
    assert run_merge(config, bare, tmp_path / 'b.pth') == 0
    err = capsys.readouterr().err
    assert f'warning: checkpoint {bare} records no adapter settings' in err, err
    assert 'scaling, filter_lambda' in err and osp.isfile(tmp_path / 'b.pth')


def test_refuses_a_partially_merged_checkpoint(tmp_path, capsys):
    config = tiny(tmp_path, f'{ADE}/colora_convnext_b.py')
    ckpt = tmp_path / 'iter_1.pth'
    trained_checkpoint(config, ckpt)
    assert run_merge(config, ckpt, tmp_path / 'merged.pth') == 0
    _refused(tmp_path, capsys, config, tmp_path / 'merged.pth', 'it is merged already')
    cut = tmp_path / 'cut.pth'                    # a copy cut short
    cut.write_bytes(ckpt.read_bytes()[:4096])
    _refused(tmp_path, capsys, config, cut, f'cannot read checkpoint {cut}: the file is '
             'truncated or corrupt')


def test_refuses_a_full_finetuning_config(tmp_path, capsys):
    config = tiny(tmp_path, f'{ADE}/upernet_full-ft_r50_4xb4-160k_ade20k-512x512.py')
    ckpt = tmp_path / 'iter_1.pth'
    trained_checkpoint(config, ckpt)
    before = set(os.listdir(tmp_path))
    assert run_merge(config, ckpt, tmp_path / 'merged.pth') == 2
    assert 'has no adapters' in capsys.readouterr().err
    _nothing_written(tmp_path, before)


def test_refuses_to_overwrite_its_input(tmp_path, capsys):
    config = tiny(tmp_path, f'{ADE}/colora_convnext_b.py')
    ckpt = tmp_path / 'iter_1.pth'
    trained_checkpoint(config, ckpt)
    stamp = (ckpt.stat().st_mtime_ns, ckpt.read_bytes())
    before = set(os.listdir(tmp_path))
    assert run_merge(config, ckpt, ckpt) == 2
    assert 'is the input checkpoint' in capsys.readouterr().err
    os.symlink(ckpt, tmp_path / 'link.pth')
    before.add('link.pth')
    assert run_merge(config, ckpt, tmp_path / 'link.pth') == 2   # same file, other name
    assert 'is the input checkpoint' in capsys.readouterr().err
    # OUT whose .py would be the config itself.
    assert run_merge(config, ckpt, osp.splitext(config)[0] + '.pth') == 2
    assert 'would overwrite the config' in capsys.readouterr().err
    assert (ckpt.stat().st_mtime_ns, ckpt.read_bytes()) == stamp
    _nothing_written(tmp_path, before)


def _merge_off_by(monkeypatch, where, delta=1e-2):
    """Make ``merge_adapters`` (as the tool imports it) fold and then put the first
    output channel of the backbone's first conv ``delta`` off (one channel: a shift of
    all channels alike would vanish in the LayerNorm after it): in the merged model
    itself (``where='model'``), or only in the state dict it hands out, which the
    written config's model loads (``'state_dict'``)."""
    import colora_mm.adapters as adapters
    fold = adapters.merge_adapters

    def merge_off(model, *args, **kwargs):
        unfolded = fold(model, *args, **kwargs)
        name, weight = next((n, p) for n, p in model.named_parameters()
                            if n.startswith('backbone.') and n.endswith('.weight')
                            and p.dim() == 4)
        if where == 'model':
            with torch.no_grad():
                weight[0].add_(delta)
        else:
            def off(module, state, prefix, local_metadata):
                state[prefix + name] = state[prefix + name].clone()
                state[prefix + name][0] += delta
            model._register_state_dict_hook(off)
        return unfolded

    monkeypatch.setattr(adapters, 'merge_adapters', merge_off)


@pytest.mark.parametrize('where,fragment', [
    ('model', 'the merged model differs from the unmerged one'),
    ('state_dict', 'the model of the written config, with OUT loaded, differs from '
                   'the merged model')], ids=['merged-vs-unmerged', 'written-config'])
def test_refuses_a_merge_that_changes_the_outputs(tmp_path, capsys, monkeypatch, where,
                                                  fragment):
    """A fold that moves the features beyond the tolerance (one weight off by 1e-2),
    or a written checkpoint that does not reproduce the merged model in the written
    config's model: exit status 2, one error line, nothing written."""
    config = tiny(tmp_path, f'{ADE}/upernet_lora_convnext_s_4xb4-160k_ade20k-512x512.py')
    ckpt = tmp_path / 'iter_1.pth'
    trained_checkpoint(config, ckpt)
    capsys.readouterr()            # what building and initialising the model logged
    before = set(os.listdir(tmp_path))
    _merge_off_by(monkeypatch, where)
    assert run_merge(config, ckpt, tmp_path / 'merged.pth') == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: '), err
    assert fragment in err[0] and err[0].endswith('; nothing written'), err[0]
    _nothing_written(tmp_path, before)


def test_cli_exit_status_and_single_line(tmp_path):
    config = tiny(tmp_path, f'{ADE}/colora_convnext_b.py')
    result = subprocess.run(
        [sys.executable, osp.join(ROOT, 'tools', 'merge.py'), config,
         str(tmp_path / 'missing.pth'), str(tmp_path / 'out.pth')],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f'error: checkpoint {tmp_path / "missing.pth"} does not exist']
    assert not (tmp_path / 'out.pth').exists()


# ----------------------------------------------------------------- beyond the paper
PER_STAGE = f'{ADE}/upernet_colora-per-stage_convnext_b_4xb4-160k_ade20k-512x512.py'
SWIN_OVERRIDES = dict(model=dict(backbone=dict(
    attn_adapter=dict(method='lora', gamma=8),
    adapter=dict(overrides=[dict(pattern='stages.3.*', gamma=4, share_ratio=0.75),
                            dict(pattern='stages.0.*', method='none')]))))


def test_mixed_settings_merge_equals_unmerged(tmp_path, capsys):
    """The per-stage config: no adapter in stage 0, gamma 8 / share 0.8 in stage 3."""
    config = tiny(tmp_path, PER_STAGE)
    ckpt = tmp_path / 'iter_1.pth'
    model = trained_checkpoint(config, ckpt)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    reference = features(model, x)
    assert run_merge(config, ckpt, tmp_path / 'merged.pth') == 0
    printed = capsys.readouterr().out
    assert 'folded 6 of 9 adapted layers' in printed
    state = torch.load(tmp_path / 'merged.pth', weights_only=True)['state_dict']
    kept = {k.split('.adapter_')[0] for k in state if is_adapter_name(k)}
    assert kept == {f'backbone.stages.{i}.0.depthwise_conv' for i in (1, 2, 3)}
    cfg = Config.fromfile(str(tmp_path / 'merged.py'))
    assert cfg.model.backbone.adapter.merged is True
    assert [o['pattern'] for o in cfg.model.backbone.adapter.overrides] == [
        'stages.3.*', 'stages.0.*']
    rebuilt = registry(cfg.default_scope).build(cfg.model).eval()
    rebuilt.load_state_dict(state, strict=True)
    got = features(rebuilt, x)
    assert max(float((a - b).abs().max()) for a, b in zip(got, reference)) < 1e-4


@pytest.mark.parametrize('shipped,extra,plain', [
    (f'{ADE}/upernet_lora_convnext_s_4xb4-160k_ade20k-512x512.py',
     dict(model=dict(backbone=dict(adapter=dict(overrides=[
         dict(pattern='stages.3.*', gamma=4), dict(pattern='stages.0.*',
                                                   method='none')])))),
     'mmpretrain.models.backbones.convnext'),
    (f'{ADE}/upernet_colora_swin-t_8xb2-160k_ade20k-512x512.py', SWIN_OVERRIDES,
     'mmseg.models.backbones.swin'),
    (f'{COCO}/faster-rcnn_colora_swin-t_fpn_2xb8-1x_coco.py', SWIN_OVERRIDES,
     'mmdet.models.backbones.swin'),
], ids=['lora-convnext-per-stage', 'colora-swin-seg', 'colora-swin-det'])
def test_mixed_settings_fold_to_an_upstream_checkpoint(tmp_path, shipped, extra, plain):
    config = tiny(tmp_path, shipped, **extra)
    ckpt = tmp_path / 'iter_1.pth'
    model = trained_checkpoint(config, ckpt)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    reference = features(model, x)
    assert run_merge(config, ckpt, tmp_path / 'merged.pth') == 0
    state = torch.load(tmp_path / 'merged.pth', weights_only=True)['state_dict']
    assert not [k for k in state if is_adapter_name(k)]
    text = (tmp_path / 'merged.py').read_text()
    assert 'colora' not in text.lower() and 'overrides' not in text
    cfg = Config.fromfile(str(tmp_path / 'merged.py'))
    rebuilt = registry(cfg.default_scope).build(cfg.model).eval()
    assert type(rebuilt.backbone).__module__ == plain
    rebuilt.load_state_dict(state, strict=True)
    got = features(rebuilt, x)
    assert max(float((a - b).abs().max()) for a, b in zip(got, reference)) < 1e-4
