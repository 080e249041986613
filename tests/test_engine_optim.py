"""Learning rates of the built param groups: the layer-wise ResNet constructor, and the
upstream stage-wise ConvNeXt constructor on CoLoRAConvNeXt."""
import pytest
import torch.nn as nn

pytest.importorskip('mmseg')
pytest.importorskip('mmdet')

import colora_mm  # noqa: E402,F401
from colora_mm.models import CoLoRAConvNeXt, DetCoLoRAResNet, SegCoLoRAResNet  # noqa: E402
from helpers_ckpt import REDUCED_CONVNEXT  # noqa: E402

BASE_LR = 1e-4
OPTIM = dict(type='OptimWrapper',
             optimizer=dict(type='AdamW', lr=BASE_LR, weight_decay=0.05))


class Detector(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.neck = nn.Conv2d(8, 8, 1)
        self.rpn_head = nn.Conv2d(8, 4, 3)


def lr_by_name(optim_wrapper):
    out = {}
    for group in optim_wrapper.optimizer.param_groups:
        for name in group['param_names']:
            out[name] = (group['lr'], group['weight_decay'])
    return out


def build_resnet_optim(codebase='mmdet', frozen_stages=-1, num_layers=16, rate=0.99):
    cls = DetCoLoRAResNet if codebase == 'mmdet' else SegCoLoRAResNet
    model = Detector(cls(depth=50, base_channels=16, stem_channels=16,
                         frozen_stages=frozen_stages, adapter=dict(method='colora')))
    registry = __import__(f'{codebase}.registry',
                          fromlist=['OPTIM_WRAPPER_CONSTRUCTORS']).OPTIM_WRAPPER_CONSTRUCTORS
    constructor = registry.build(dict(
        type='LayerDecayResNetOptimizerConstructor', optim_wrapper_cfg=OPTIM,
        paramwise_cfg=dict(num_layers=num_layers, decay_rate=rate)))
    return model, constructor(model)


@pytest.mark.parametrize('codebase', ['mmseg', 'mmdet'])
def test_resnet_layer_wise_decay(codebase):
    model, optim = build_resnet_optim(codebase)
    lrs = lr_by_name(optim)
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert set(lrs) == trainable
    block = 0
    expected = {}
    for s, blocks in enumerate((3, 4, 6, 3)):
        for b in range(blocks):
            block += 1
            expected[f'backbone.layer{s + 1}.{b}.'] = BASE_LR * 0.99 ** (17 - block)
    for name, (lr, wd) in lrs.items():
        if name.startswith(('backbone.conv1', 'backbone.bn1')):
            want = BASE_LR * 0.99 ** 17                    # stem: deepest decay
        elif name.startswith('backbone.'):
            want = next(v for k, v in expected.items() if name.startswith(k))
        else:
            want = BASE_LR                                  # neck and heads
        assert lr == pytest.approx(want, rel=1e-12), name
        want_wd = 0.0 if params[name].ndim == 1 or name.endswith('.bias') else 0.05
        assert wd == want_wd, name
    # the adapters of block k share its rate
    assert lrs['backbone.layer4.2.conv1.adapter_branch.pair.A1'][0] == \
        pytest.approx(BASE_LR * 0.99)
    assert lrs['backbone.layer1.0.conv2.adapter_branch.down.weight'][0] == \
        pytest.approx(BASE_LR * 0.99 ** 16)


def test_resnet_frozen_parameters_stay_out():
    model, optim = build_resnet_optim('mmdet', frozen_stages=1)
    names = set(lr_by_name(optim))
    assert not any(n.startswith(('backbone.layer1.', 'backbone.conv1', 'backbone.bn1'))
                   for n in names)
    assert 'backbone.layer2.0.conv1.adapter_branch.pair.A1' in names


def test_resnet_block_count_is_checked():
    with pytest.raises(ValueError, match='num_layers=12 but .* 16 residual blocks'):
        build_resnet_optim(num_layers=12)


def test_resnet_constructor_refuses_keys_it_would_ignore():
    from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS
    with pytest.raises(ValueError, match=r"\['norm_decay_mult'\] are not supported"):
        OPTIM_WRAPPER_CONSTRUCTORS.build(dict(
            type='LayerDecayResNetOptimizerConstructor', optim_wrapper_cfg=OPTIM,
            paramwise_cfg=dict(num_layers=16, decay_rate=0.99, norm_decay_mult=0.0)))


@pytest.mark.parametrize('paramwise_cfg', [None, {}, dict(num_layers=16)])
def test_resnet_constructor_refuses_a_missing_paramwise_cfg(paramwise_cfg):
    """mmengine calls add_params only for a non-empty paramwise_cfg: without one the
    constructor would give one undecayed group silently."""
    from mmengine.optim import build_optim_wrapper
    model = Detector(DetCoLoRAResNet(depth=50, base_channels=16, stem_channels=16,
                                     adapter=dict(method='lora', gamma=8)))
    cfg = dict(OPTIM, constructor='LayerDecayResNetOptimizerConstructor')
    if paramwise_cfg is not None:
        cfg['paramwise_cfg'] = paramwise_cfg
    with pytest.raises(ValueError, match='paramwise_cfg needs num_layers and decay_rate'):
        build_optim_wrapper(model, cfg)


def test_resnet_constructor_without_weight_decay_keeps_the_optimizers_default():
    import torch
    from mmengine.optim import build_optim_wrapper
    model = Detector(DetCoLoRAResNet(depth=50, base_channels=16, stem_channels=16,
                                     adapter=dict(method='lora', gamma=8)))
    optim = build_optim_wrapper(model, dict(
        type='OptimWrapper', optimizer=dict(type='AdamW', lr=BASE_LR),
        constructor='LayerDecayResNetOptimizerConstructor',
        paramwise_cfg=dict(num_layers=16, decay_rate=0.99)))
    decays = {g['group_name']: g['weight_decay'] for g in optim.optimizer.param_groups}
    default = torch.optim.AdamW([nn.Parameter(torch.zeros(1))]).defaults['weight_decay']
    assert all(wd == (0.0 if name.endswith('no_decay') else default)
               for name, wd in decays.items()), decays


def test_resnet_constructor_through_mmengine_builder():
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DefaultScope
    model = Detector(DetCoLoRAResNet(depth=50, base_channels=16, stem_channels=16,
                                     adapter=dict(method='lora', gamma=8)))
    with DefaultScope.overwrite_default_scope('mmdet'):
        optim = build_optim_wrapper(model, dict(
            OPTIM, constructor='LayerDecayResNetOptimizerConstructor',
            paramwise_cfg=dict(num_layers=16, decay_rate=0.99)))
    lrs = lr_by_name(optim)
    assert lrs['rpn_head.weight'][0] == pytest.approx(BASE_LR)
    assert lrs['backbone.layer1.0.conv1.adapter_branch.A'][0] == \
        pytest.approx(BASE_LR * 0.99 ** 16)


@pytest.mark.parametrize('codebase', ['mmseg', 'mmdet'])
def test_upstream_stage_wise_decay_on_colora_convnext(codebase):
    """mmseg/mmdet's LearningRateDecayOptimizerConstructor as the upstream ConvNeXt
    configs use it (stage_wise, decay 0.9, num_layers 12)."""
    backbone = CoLoRAConvNeXt(arch=REDUCED_CONVNEXT, out_indices=[0, 1, 2, 3],
                              gap_before_final_norm=False, adapter=dict(method='colora'))
    model = Detector(backbone)
    registry = __import__(f'{codebase}.registry',
                          fromlist=['OPTIM_WRAPPER_CONSTRUCTORS']).OPTIM_WRAPPER_CONSTRUCTORS
    constructor = registry.build(dict(
        type='LearningRateDecayOptimizerConstructor', optim_wrapper_cfg=OPTIM,
        paramwise_cfg=dict(decay_rate=0.9, decay_type='stage_wise', num_layers=12)))
    lrs = lr_by_name(constructor(model))
    # upstream: num_layers + 2 = 14 ids; downsample -> 0, stages.i -> i + 1, rest -> 13;
    # scale = 0.9 ** (14 - id - 1)
    for name, (lr, _) in lrs.items():
        if name.startswith('backbone.downsample_layers'):
            layer_id = 0
        elif name.startswith('backbone.stages'):
            layer_id = int(name.split('.')[2]) + 1
        else:
            layer_id = 13
        assert lr == pytest.approx(BASE_LR * 0.9 ** (13 - layer_id)), name
    assert lrs['backbone.stages.2.1.pointwise_conv1.adapter_branch.pair.As'][0] == \
        pytest.approx(BASE_LR * 0.9 ** 10)
    assert lrs['backbone.norm3.weight'][0] == pytest.approx(BASE_LR)
    assert 'backbone.stages.0.0.gamma' not in lrs          # layer scale: frozen


def test_upstream_layer_wise_decay_on_colora_convnext():
    """mmdet's ConvNeXt configs use decay_type='layer_wise' (stage 2 split in groups of
    three blocks): the adapters follow the block they sit in."""
    from mmdet.registry import OPTIM_WRAPPER_CONSTRUCTORS
    arch = dict(depths=[1, 1, 6, 1], channels=REDUCED_CONVNEXT['channels'])
    model = Detector(CoLoRAConvNeXt(arch=arch, out_indices=[0, 1, 2, 3],
                                    gap_before_final_norm=False,
                                    adapter=dict(method='colora')))
    constructor = OPTIM_WRAPPER_CONSTRUCTORS.build(dict(
        type='LearningRateDecayOptimizerConstructor', optim_wrapper_cfg=OPTIM,
        paramwise_cfg=dict(decay_rate=0.7, decay_type='layer_wise', num_layers=6)))
    lrs = lr_by_name(constructor(model))
    # num_layers + 2 = 8 ids, scale 0.7 ** (8 - id - 1); stages.2.j -> 3 + j // 3
    for j, layer_id in ((0, 3), (2, 3), (3, 4), (5, 4)):
        name = f'backbone.stages.2.{j}.depthwise_conv.adapter_branch.down.weight'
        assert lrs[name][0] == pytest.approx(BASE_LR * 0.7 ** (7 - layer_id)), name
    assert lrs['backbone.stages.3.0.pointwise_conv1.adapter_branch.pair.A1'][0] == \
        pytest.approx(BASE_LR * 0.7 ** (7 - 6))
