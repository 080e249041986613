"""CoLoRAReportHook (counts against closed forms) and MergeReinitHook (outputs unchanged
at the moment of merging, optimizer state reset)."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

pytest.importorskip('mmseg')
pytest.importorskip('mmdet')

import colora_mm  # noqa: E402,F401
from colora_mm.adapters import (CoLoRAPairLayer, is_adapter_name,  # noqa: E402
                                iter_adapted_layers)
from colora_mm.engine import (CoLoRAReportHook, MergeReinitHook,  # noqa: E402
                              measure_flops, parameter_parts)
from colora_mm.engine.complexity import total_stride  # noqa: E402
from colora_mm.models import CoLoRAConvNeXt, SegCoLoRAResNet  # noqa: E402
from helpers_ckpt import REDUCED_CONVNEXT, convnext_original_checkpoint  # noqa: E402


class Segmentor(nn.Module):
    def __init__(self, backbone, channels):
        super().__init__()
        self.backbone = backbone
        self.neck = nn.Conv2d(channels, 16, 1)
        self.decode_head = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        return self.decode_head(self.neck(self.backbone(x)[-1]))


#: One block per stage: the merge tests train, and the machines running them are small.
ONE_BLOCK_CONVNEXT = dict(depths=[1, 1, 1, 1], channels=REDUCED_CONVNEXT['channels'])


def convnext(method='colora', arch=REDUCED_CONVNEXT, **adapter):
    backbone = CoLoRAConvNeXt(arch=arch, out_indices=[0, 1, 2, 3],
                              gap_before_final_norm=False, layer_scale_init_value=1.0,
                              adapter=dict(method=method, **adapter))
    backbone.init_cfg = dict(type='Pretrained', checkpoint=convnext_original_checkpoint(
        arch, seed=0))
    backbone.init_weights()
    return Segmentor(backbone, arch['channels'][-1])


def fake_runner(model, optim_wrapper=None, iteration=0):
    from mmengine.logging import MessageHub
    return SimpleNamespace(model=model, optim_wrapper=optim_wrapper, iter=iteration,
                           message_hub=MessageHub.get_instance('colora_test_hooks'))


# ----------------------------------------------------------------- report
def test_parameter_parts_add_up():
    model = convnext()
    parts = parameter_parts(model)
    assert sum(c['total'] for c in parts.values()) == \
        sum(p.numel() for p in model.parameters())
    adapters = sum(p.numel() for n, p in model.named_parameters()
                   if is_adapter_name(n))
    assert parts['backbone adapters'] == dict(trainable=adapters, total=adapters)
    assert parts['backbone other']['trainable'] == 0
    neck = sum(p.numel() for p in model.neck.parameters())
    heads = sum(p.numel() for p in model.decode_head.parameters())
    assert parts['neck'] == dict(trainable=neck, total=neck)
    assert parts['heads'] == dict(trainable=heads, total=heads)
    # the closed form of appendix Table 1 for the pairs: r (d + d'') + 2 rl d'
    pairs = 0
    for c, depth in zip(REDUCED_CONVNEXT['channels'], REDUCED_CONVNEXT['depths']):
        r = c // 16
        rl = r - int(math.floor(r * 0.5))
        pairs += depth * (r * (c + c) + 2 * rl * 4 * c)
    spatial = sum(depth * (c * (c // 16) + 9 * c) for c, depth in
                  zip(REDUCED_CONVNEXT['channels'], REDUCED_CONVNEXT['depths']))
    assert adapters == pairs + spatial


def convnext_closed_form(size=64, gamma=16, share_ratio=0.5, window=11):
    """Backbone MACs, branch MACs per image and weight-update MACs per step, from the
    architecture alone."""
    channels, depths = REDUCED_CONVNEXT['channels'], REDUCED_CONVNEXT['depths']
    backbone = branches = updates = 0
    prev = 3
    for i, (c, depth) in enumerate(zip(channels, depths)):
        hw = (size // 4 // 2 ** i) ** 2
        backbone += hw * c * prev * (16 if i == 0 else 4)          # stem 4x4 / down 2x2
        prev = c
        r = c // gamma
        rs = int(math.floor(r * share_ratio))
        for _ in range(depth):
            backbone += hw * c * 49 + 2 * hw * c * 4 * c             # dw 7x7, pw1, pw2
            # A 1x1 C -> r, the filter's four separable blurs of r maps, B 3x3 r -> C
            branches += hw * c * r + 4 * r * hw * 2 * window + hw * c * 9
            updates += (r + rs + 2) * 4 * c * (c + c)               # Table 1, CoLoRA
    return backbone, branches, updates


def test_flops_match_closed_form():
    model = convnext()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flops = measure_flops(model.backbone, (64, 64))
    backbone, branches, updates = convnext_closed_form()
    assert flops['backbone'] == backbone
    assert flops['branches'] == branches
    assert flops['weight_updates'] == updates
    # measuring changed nothing: no partner update, modes restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.backbone.training


def test_lora_and_hira_weight_updates_per_table1():
    for method, extra in (('lora', 1), ('hira', 2)):
        flops = measure_flops(convnext(method).backbone, (32, 32))
        want = 0
        for c, depth in zip(REDUCED_CONVNEXT['channels'], REDUCED_CONVNEXT['depths']):
            r = c // 20
            want += depth * 2 * (r + extra) * c * 4 * c
        assert flops['weight_updates'] == want, method
        assert flops['branches'] == 0


def test_report_hook_logs_a_table():
    model = convnext()
    hook = CoLoRAReportHook(input_size=(64, 64))
    runner = fake_runner(model)
    hook.before_train(runner)
    assert hook.report['parts'] == parameter_parts(model)
    out = hook.report['table']
    for part in ('backbone adapters', 'backbone biases/norms', 'backbone other', 'neck',
                 'heads', 'adapter branches', 'weight updates'):
        assert part in out
    assert runner.message_hub.get_info('colora/trainable_params') == \
        sum(p.numel() for p in model.parameters() if p.requires_grad)
    # the logged FLOPs are the report's own: branches per image, updates per step
    flops = hook.report['flops']
    assert flops['branches'] > 0 and flops['weight_updates'] > 0
    assert flops['branches'] != flops['weight_updates']
    assert runner.message_hub.get_info('colora/adapter_branch_flops') == flops['branches']
    assert runner.message_hub.get_info('colora/adapter_update_flops') == \
        flops['weight_updates']


def test_report_hook_logs_the_training_path_of_each_stage(caplog):
    model = convnext()
    hook = CoLoRAReportHook(count_flops=False)
    runner = fake_runner(model)
    hook.before_train(runner)
    assert hook.paths is None
    model.train()
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    hook.after_train_iter(runner, 0)
    blocks = REDUCED_CONVNEXT['depths']
    # the pointwise pairs (LayerNorm and GELU inputs) take the activation path
    assert hook.paths == {f'stages.{i}': {'activation': 2 * n} for i, n in enumerate(blocks)}
    first = dict(hook.paths)
    model(torch.randn(1, 3, 32, 32))
    hook.after_train_iter(runner, 1)            # reported once
    assert hook.paths == first


def test_report_hook_checks_input_size():
    """An int is a square; a side below the backbone's total stride (32), or a value
    that is not one or two ints, is refused when the hook is built."""
    assert CoLoRAReportHook(input_size=64).input_size == (64, 64)
    assert CoLoRAReportHook(input_size=[64, 96]).input_size == (64, 96)
    for bad, message in (((16, 16), 'at least 32'), (0, 'at least 32'),
                         ((-8, 64), 'at least 32'), ('64', 'not an image size'),
                         ((64,), 'not an image size'), ((64, 64, 3), 'not an image size'),
                         ((64.0, 64), 'not an image size'), (True, 'not an image size')):
        with pytest.raises(ValueError, match=message) as info:
            CoLoRAReportHook(input_size=bad)
        assert str(info.value).startswith(f'CoLoRAReportHook: input_size={bad!r}')
        assert 'e.g. input_size=(512, 512)' in str(info.value)


def test_report_hook_checks_input_size_against_the_backbone():
    """A five-stage ConvNeXt halves once more: 64, not 32, is its smallest side."""
    arch = dict(depths=[1, 1, 1, 1, 1], channels=[32, 32, 32, 64, 64])
    backbone = CoLoRAConvNeXt(arch=arch, out_indices=[0, 1, 2, 3, 4],
                              gap_before_final_norm=False, adapter=dict(method='lora'))
    assert total_stride(backbone) == 64
    assert total_stride(dict(type='CoLoRAConvNeXt', arch=arch)) == 64
    assert total_stride(dict(type='CoLoRAConvNeXt', arch='base')) == 32
    assert total_stride(dict(type='CoLoRAResNet', depth=50)) == 32
    model = Segmentor(backbone, 64)
    hook = CoLoRAReportHook(input_size=(32, 32))
    with pytest.raises(ValueError, match=r'input_size=\(32, 32\): each side must be at '
                       'least 64'):
        hook.before_train(fake_runner(model))
    CoLoRAReportHook(input_size=(64, 64)).before_train(fake_runner(model))
    CoLoRAReportHook(input_size=(32, 32), count_flops=False).before_train(
        fake_runner(model))


def test_report_hook_on_resnet_without_flops():
    model = Segmentor(SegCoLoRAResNet(depth=50, base_channels=16, stem_channels=16,
                                      adapter=dict(method='colora')), 512)
    hook = CoLoRAReportHook(count_flops=False)
    hook.before_train(fake_runner(model))
    assert hook.report['flops'] is None
    assert hook.report['parts']['backbone adapters']['trainable'] > 0


# ----------------------------------------------------------------- merge & reinit
def train_steps(model, optim_wrapper, steps=2, size=32):
    torch.manual_seed(1)
    model.train()
    for _ in range(steps):
        loss = model(torch.randn(1, 3, size, size)).pow(2).mean()
        optim_wrapper.update_params(loss)


@pytest.mark.parametrize('method,adapter', [
    ('colora', {}), ('colora', dict(partner_policy='frozen')), ('colora',
                                                               dict(share_ratio=1.0)),
    ('lora', {}), ('pissa', {}), ('hira', {})])
def test_merge_reinit_leaves_outputs_unchanged(method, adapter):
    from mmengine.optim import OptimWrapper
    model = convnext(method, ONE_BLOCK_CONVNEXT, **adapter)
    optim = OptimWrapper(torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2))
    train_steps(model, optim)
    x = torch.randn(1, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        before = model(x)
    adapters = [p for n, p in model.named_parameters() if is_adapter_name(n) and p.numel()]
    assert all(p in optim.optimizer.state for p in adapters)

    hook = MergeReinitHook(interval=3)
    hook.after_train_iter(fake_runner(model, optim, iteration=1), 1)   # not yet
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    hook.after_train_iter(fake_runner(model, optim, iteration=2), 2)   # iter 3: merge
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)

    state = optim.optimizer.state
    for _, layer in iter_adapted_layers(model):
        a = layer.adapter_branch
        if method == 'colora':
            if not isinstance(a, CoLoRAPairLayer) or a.index != 0 or a.get_pair().rl == 0:
                continue
            pair = a.get_pair()
            for p in (pair.A1, pair.B1, pair.A2, pair.B2):
                assert p not in state
            assert torch.count_nonzero(pair.B1) == 0 and torch.count_nonzero(pair.B2) == 0
            if pair.rs:
                assert pair.As in state and pair.Bs in state   # shared part untouched
        elif method in ('lora', 'hira'):
            assert a.A not in state and a.B not in state
            assert torch.count_nonzero(a.B) == 0
        else:   # PiSSA re-initialises from the SVD of the new base weight
            assert a.A not in state and a.B not in state
    # training continues from the merged model
    train_steps(model, optim, steps=1)


@pytest.mark.parametrize('method', ['colora', 'lora', 'pissa'])
def test_merge_reinit_leaves_a_frozen_stage_as_it_is(method):
    """Adapters that do not train (a frozen stage's) are neither folded nor
    re-initialised: their tensors, and the base weights under them, stay the same."""
    model = SegCoLoRAResNet(depth=50, base_channels=16, stem_channels=16,
                            frozen_stages=1, adapter=dict(method=method, gamma=4))
    model.init_weights()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from colora_mm.engine.hooks import fold_independent_parts
    params = fold_independent_parts(model)
    assert params and all(p.requires_grad for p in params)
    after = model.state_dict()
    frozen = [k for k in before if k.startswith(('conv1.', 'bn1.', 'layer1.'))]
    assert frozen
    for key in frozen:
        assert torch.equal(after[key], before[key]), key
    assert any(not torch.equal(after[k], before[k]) for k in before
               if k.startswith('layer2.') and is_adapter_name(k))


def test_merge_reinit_drops_the_gradients_accumulated_for_the_old_factors():
    """With gradient accumulation a merge can fall between two updates: the
    re-initialised factors must not take the gradients of the factors they replace."""
    from mmengine.optim import OptimWrapper
    model = convnext('lora', ONE_BLOCK_CONVNEXT)
    optim = OptimWrapper(torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2),
        accumulative_counts=2)
    optim.initialize_count_status(model, 0, 10)
    train_steps(model, optim, steps=3)             # the third backward is not applied
    adapters = [p for n, p in model.named_parameters() if is_adapter_name(n)]
    assert all(p.grad is not None for p in adapters)
    MergeReinitHook(interval=3).after_train_iter(fake_runner(model, optim, iteration=2), 2)
    for _, layer in iter_adapted_layers(model):
        a = layer.adapter_branch
        assert a.A.grad is None and a.B.grad is None
        assert torch.count_nonzero(a.B) == 0
    train_steps(model, optim, steps=1)             # the update after the merge


def test_merge_reinit_interval_validation():
    with pytest.raises(ValueError, match='interval=0'):
        MergeReinitHook(interval=0)
    for bad in ('10', 10.0, True, None):
        with pytest.raises(TypeError, match=f'interval={bad!r} .* must be an int'):
            MergeReinitHook(interval=bad)


@pytest.mark.parametrize('method,adapter', [
    ('full', {}), ('conv_adapter', {}), ('colora', dict(share_ratio=1.0))])
def test_merge_reinit_refuses_a_model_with_nothing_to_fold(method, adapter):
    model = convnext(method, ONE_BLOCK_CONVNEXT, **adapter)
    with pytest.raises(ValueError, match='nothing to fold') as info:
        MergeReinitHook(interval=5).before_train(fake_runner(model))
    message = str(info.value)
    assert 'Remove MergeReinitHook from custom_hooks' in message
    if method == 'full':
        assert 'no adapters (full fine-tuning)' in message
    else:
        assert 'layer-independent' in message


@pytest.mark.parametrize('method,adapter', [
    ('colora', {}), ('lora', {}), ('pissa', {}), ('hira', {}),
    ('colora', dict(share_ratio=1.0, overrides=[dict(pattern='stages.3.*',
                                                     share_ratio=0.5)]))])
def test_merge_reinit_accepts_a_model_with_independent_parts(method, adapter):
    model = convnext(method, ONE_BLOCK_CONVNEXT, **adapter)
    MergeReinitHook(interval=5).before_train(fake_runner(model))


def test_hooks_are_registered_in_every_scope():
    from mmengine.registry import HOOKS
    for scope in ('mmseg', 'mmdet'):
        registry = __import__(f'{scope}.registry', fromlist=['HOOKS']).HOOKS
        assert isinstance(registry.build(dict(type='MergeReinitHook', interval=5)),
                          MergeReinitHook)
        assert isinstance(registry.build(dict(type='CoLoRAReportHook')), CoLoRAReportHook)
    assert HOOKS.get('CoLoRAReportHook') is CoLoRAReportHook


@pytest.mark.parametrize('kind', ['convnext', 'resnet'])
def test_backbone_flops_match_torch_flop_counter_on_the_plain_model(kind):
    """The base count (adapters excluded) against torch's own counter on the upstream
    backbone (torch counts a multiply-accumulate as two FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode
    if kind == 'convnext':
        from mmpretrain.models.backbones import ConvNeXt as Plain
        kw = dict(arch=REDUCED_CONVNEXT, out_indices=[0, 1, 2, 3],
                  gap_before_final_norm=False)
        adapted = CoLoRAConvNeXt(adapter=dict(method='colora'), **kw)
    else:
        from mmseg.models.backbones import ResNet as Plain
        kw = dict(depth=50, base_channels=16, stem_channels=16)
        adapted = SegCoLoRAResNet(adapter=dict(method='colora'), **kw)
    plain = Plain(**kw)
    plain.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        plain(torch.zeros(1, 3, 64, 64))
    assert measure_flops(adapted, (64, 64))['backbone'] * 2 == counter.get_total_flops()


def test_adapter_flops_match_torch_flop_counter():
    """Branches and weight updates against torch's counter on the adapted backbone. The
    counter sees matmuls and convolutions only, so the update term is Table 1's without
    its ``2 d'(d + d'')`` element-wise additions: ``(rl + 2 rs) d'(d + d'')`` a pair.
    Without the range filter: its count is appendix D's (above), not its kernels'. On
    the weight path, whose updates Table 1 counts (the activation path forms none)."""
    from torch.utils.flop_counter import FlopCounterMode
    model = convnext(use_filter=False, train_path='weight').backbone
    flops = measure_flops(model, (64, 64))
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, 64, 64))
    adds = sum(2 * 4 * c * (c + c) * depth for c, depth in
               zip(REDUCED_CONVNEXT['channels'], REDUCED_CONVNEXT['depths']))
    assert counter.get_total_flops() == 2 * (
        flops['backbone'] + flops['branches'] + flops['weight_updates'] - adds)


def test_report_hook_shows_each_stage_with_mixed_settings():
    """Per stage: adapted layers, ranks and adapter parameters, against closed forms."""
    model = convnext(overrides=[dict(pattern='stages.3.*', gamma=8, share_ratio=0.75),
                                dict(pattern='stages.0.*', method='none')])
    hook = CoLoRAReportHook(count_flops=False)
    hook.before_train(fake_runner(model))
    rows = {row['stage']: row for row in hook.report['stages']}
    assert list(rows) == ['stages.0', 'stages.1', 'stages.2', 'stages.3']
    for i, (c, depth) in enumerate(zip(REDUCED_CONVNEXT['channels'],
                                       REDUCED_CONVNEXT['depths'])):
        row = rows[f'stages.{i}']
        assert row['layers'] == 3 * depth
        if i == 0:
            assert row['adapted'] == 0 and row['params'] == 0 and not row['adapters']
            continue
        gamma, share = (8, 0.75) if i == 3 else (16, 0.5)
        r = c // gamma
        rs = int(math.floor(r * share))
        assert row['adapted'] == 3 * depth
        assert row['adapters'] == {f'pair g{gamma} r={r} (rs={rs}, rl={r - rs})': depth,
                                   f'spatial r={r} +filter': depth}
        pair = r * 2 * c + 2 * (r - rs) * 4 * c
        spatial = c * r + 9 * c
        assert row['params'] == depth * (pair + spatial)
    assert sum(row['params'] for row in rows.values()) == \
        hook.report['parts']['backbone adapters']['total']
    table = hook.report['table']
    assert 'Adapters per stage' in table
    assert 'stages.0' in table and ' none ' in table
    assert 'pair g8 r=32 (rs=24, rl=8)' in table
