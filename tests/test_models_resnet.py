"""CoLoRAResNet (mmseg's and mmdet's): registration, injection, freezing, pretrained
loading from torchvision and OpenMMLab checkpoints."""
import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

pytest.importorskip('mmseg')
pytest.importorskip('mmdet')

import colora_mm  # noqa: E402,F401
from colora_mm.adapters import (AdaptedLayer, CoLoRAPairLayer,  # noqa: E402
                                SpatialLowRankBranch, is_adapter_name)
from colora_mm.models import DetCoLoRAResNet, SegCoLoRAResNet  # noqa: E402
from helpers_ckpt import (REDUCED_RESNET, openmmlab_resnet_checkpoint,  # noqa: E402
                          save, torchvision_resnet_shapes, torchvision_resnet_state_dict)

NARROW = dict(depth=50, base_channels=16, stem_channels=16)
CLASSES = {'mmseg': SegCoLoRAResNet, 'mmdet': DetCoLoRAResNet}


def upstream(codebase):
    if codebase == 'mmseg':
        from mmseg.models.backbones import ResNet
    else:
        from mmdet.models.backbones import ResNet
    return ResNet


def build(codebase='mmseg', adapter=dict(method='colora'), **kw):
    kwargs = dict(NARROW)
    kwargs.update(kw)
    return CLASSES[codebase](adapter=adapter, **kwargs)


def narrow_torchvision(seed=0):
    return torchvision_resnet_state_dict(REDUCED_RESNET['stage_blocks'],
                                         REDUCED_RESNET['base_channels'], seed=seed)


# ----------------------------------------------------------------- registry
@pytest.mark.parametrize('codebase', ['mmseg', 'mmdet'])
def test_registered_on_each_codebases_resnet(codebase):
    registry = __import__(f'{codebase}.registry', fromlist=['MODELS']).MODELS
    model = registry.build(dict(type='CoLoRAResNet', adapter=dict(method='colora'),
                                **NARROW))
    assert type(model) is CLASSES[codebase]
    assert isinstance(model, upstream(codebase))
    assert type(model).__name__ == 'CoLoRAResNet'
    assert SegCoLoRAResNet is not DetCoLoRAResNet


# ----------------------------------------------------------------- injection
@pytest.mark.parametrize('codebase', ['mmseg', 'mmdet'])
def test_pairs_and_spatial_on_every_bottleneck(codebase):
    model = build(codebase, frozen_stages=-1)
    names = [n for n, m in model.named_modules() if isinstance(m, AdaptedLayer)]
    assert len(names) == 3 * 16
    for s, blocks in enumerate((3, 4, 6, 3)):
        for b in range(blocks):
            blk = getattr(model, f'layer{s + 1}')[b]
            assert isinstance(blk.conv1.adapter_branch, CoLoRAPairLayer)
            assert blk.conv1.adapter_branch.get_pair() is \
                blk.conv3.adapter_branch.get_pair()
            branch = blk.conv2.adapter_branch
            assert isinstance(branch, SpatialLowRankBranch)
            assert branch.style == 'dense' and branch.scale == 0.5
            assert branch.up.stride == blk.conv2.stride


@pytest.mark.parametrize('codebase', ['mmseg', 'mmdet'])
@pytest.mark.parametrize('method', ['lora', 'pissa', 'hira'])
@pytest.mark.parametrize('avg_down', [False, True])
def test_pointwise_baselines_take_every_1x1_conv(codebase, method, avg_down):
    """"Applied to all 1 x 1 convolutional layers" (appendix F): conv1 and conv3 of
    every bottleneck and each stage's shortcut convolution (after the average pool
    with avg_down), which keeps its stride; the adapted model is the base model."""
    model = build(codebase, adapter=dict(method=method, gamma=4), frozen_stages=-1,
                  avg_down=avg_down).eval()
    conv = '1' if avg_down else '0'
    shortcuts = [f'layer{s}.0.downsample.{conv}' for s in range(1, 5)]
    assert model.adapted_layer_names == [
        f'layer{s + 1}.{b}.conv{k}' for s, blocks in enumerate((3, 4, 6, 3))
        for b in range(blocks) for k in (1, 3)] + shortcuts
    for name in shortcuts:
        layer = model.get_submodule(name)
        assert isinstance(layer, AdaptedLayer) and layer.adapter_branch.method == method
    assert tuple(model.layer2[0].downsample.get_submodule(conv).stride) == (
        (1, 1) if avg_down else (2, 2))
    plain = upstream(codebase)(avg_down=avg_down, **NARROW)
    plain.eval()                          # the upstream train() returns None
    plain.load_state_dict({k: v for k, v in model.state_dict().items()
                           if not is_adapter_name(k)})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for got, want in zip(model(x), plain(x)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_basic_block_depth_needs_full_finetuning():
    with pytest.raises(ValueError, match=r'layer1\.0 is a BasicBlock.*depth 50'):
        build(depth=18, base_channels=16, stem_channels=16)
    model = build(adapter=dict(method='full'), depth=18)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize('codebase', ['mmseg', 'mmdet'])
@pytest.mark.parametrize('depth', [18, 34])
def test_bitfit_and_full_work_on_basic_block_depths(codebase, depth):
    from colora_mm.adapters import norm_parameter_names
    model = build(codebase, adapter=dict(method='bitfit'), depth=depth)
    assert model.adapted_layer_names == []
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
    norms = norm_parameter_names(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable == {n for n, _ in model.named_parameters()
                                       if n in norms or n.endswith('.bias')}
    outs = model.eval()(torch.randn(1, 3, 64, 64))
    assert len(outs) == 4
    model = build(codebase, adapter=dict(method='full'), depth=depth)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize('method', ['colora', 'lora', 'conv_adapter'])
def test_adapter_methods_on_basic_blocks_point_to_bitfit_and_full(method):
    with pytest.raises(ValueError) as info:
        build(adapter=dict(method=method), depth=18)
    msg = str(info.value)
    for fragment in ('layer1.0 is a BasicBlock', f"adapter method '{method}'",
                     'depth 50', "method='bitfit'", "method='full'",
                     'work with BasicBlock ResNets'):
        assert fragment in msg, msg


def test_mmdet_defaults_freeze_stem_and_stage1_adapters_included():
    model = build('mmdet', frozen_stages=1)    # mmdet's default norm_eval=True
    model.train()
    for name, p in model.named_parameters():
        if name.startswith(('conv1.', 'bn1.', 'layer1.')):
            assert not p.requires_grad, name
    assert model.layer2[0].conv1.adapter_branch.pair.A1.requires_grad
    assert model.layer2[0].conv2.adapter_branch.down.weight.requires_grad
    assert model.layer2[0].bn1.weight.requires_grad
    assert not model.layer2[0].conv1.weight.requires_grad
    assert not model.layer1.training
    # norm_eval: every BatchNorm in eval mode, after every train()
    assert model.train() is model             # chains, unlike the upstream train()
    assert all(not m.training for m in model.modules() if isinstance(m, _BatchNorm))
    assert model.layer2[0].conv2.training     # the rest trains
    assert model.eval() is model and not model.layer2[0].conv2.training


def test_norm_cfg_requires_grad_false_is_honoured():
    model = build('mmdet', norm_cfg=dict(type='BN', requires_grad=False))
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            assert not any(p.requires_grad for p in m.parameters())
    assert model.layer3[0].conv1.bias is None
    assert model.layer3[0].conv1.adapter_branch.pair.As.requires_grad


def test_checkpointing_with_moving_partners_is_refused():
    with pytest.raises(ValueError, match='with_cp=True'):
        build('mmdet', with_cp=True)


def test_trainable_set_mmseg():
    model = build('mmseg')
    norms = {f'{mn}.{pn}' for mn, m in model.named_modules() if isinstance(m, _BatchNorm)
             for pn, _ in m.named_parameters(recurse=False)}
    expected = {n for n, _ in model.named_parameters()
                if is_adapter_name(n) or n.endswith('.bias') or n in norms}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected


@pytest.mark.parametrize('codebase', ['mmseg', 'mmdet'])
@pytest.mark.parametrize('method', ['colora', 'lora', 'pissa', 'hira', 'conv_adapter'])
def test_fresh_adapters_compute_the_upstream_model(codebase, method):
    sd = narrow_torchvision(seed=2)
    plain = upstream(codebase)(**NARROW)
    plain.load_state_dict({k: v for k, v in sd.items() if not k.startswith('fc.')},
                          strict=False)
    # the narrow ResNet's 16-wide blocks need gamma <= 16 for the baselines' ranks
    adapter = dict(method=method, gamma=8) if method in ('lora', 'pissa', 'hira') else \
        dict(method=method)
    model = build(codebase, adapter=adapter)
    model.init_cfg = dict(type='Pretrained', checkpoint=sd)
    model.init_weights()
    plain.eval()
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(plain(x), model(x)):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------- pretrained
def test_torchvision_shapes_helper_is_torchvision_resnet50():
    import torchvision
    ref = {k: tuple(v.shape) for k, v in torchvision.models.resnet50().state_dict().items()
           if not k.endswith('num_batches_tracked')}
    assert dict(torchvision_resnet_shapes()) == ref


@pytest.mark.parametrize('codebase', ['mmseg', 'mmdet'])
def test_torchvision_resnet50_real_shapes_land_everywhere(codebase, tmp_path):
    """resnet50-11ad3fa6.pth (IMAGENET1K_V2): plain state dict, torchvision names."""
    sd = torchvision_resnet_state_dict(seed=1)
    path = save(sd, tmp_path / 'resnet50.pth')
    model = CLASSES[codebase](depth=50, adapter=dict(method='colora'),
                              init_cfg=dict(type='Pretrained', checkpoint=path))
    model.init_weights()
    own = model.state_dict()
    for key, value in sd.items():
        if key.startswith('fc.'):
            continue
        torch.testing.assert_close(own[key], value, rtol=0, atol=0, msg=key)
    report = model.pretrained_report
    assert report.layout == 'torchvision'
    assert set(report.dropped) == {'fc.weight', 'fc.bias'}
    assert report.clean and len(report.loaded) == len(sd) - 2
    pair = model.layer3[5].conv1.adapter_branch.get_pair()
    torch.testing.assert_close(pair.partner_w1, sd['layer3.5.conv1.weight'].flatten(1).t())
    torch.testing.assert_close(pair.partner_w2, sd['layer3.5.conv3.weight'].flatten(1).t())


def test_torchvision_with_batch_counters():
    sd = torchvision_resnet_state_dict(REDUCED_RESNET['stage_blocks'],
                                       REDUCED_RESNET['base_channels'], seed=3,
                                       with_num_batches_tracked=True)
    model = build('mmdet')
    model.init_cfg = dict(type='Pretrained', checkpoint=sd)
    model.init_weights()
    assert model.pretrained_report.clean
    assert int(model.layer1[0].bn1.num_batches_tracked) == 1000


@pytest.mark.parametrize('codebase', ['mmseg', 'mmdet'])
@pytest.mark.parametrize('prefix', ['backbone.', None])
def test_openmmlab_layout(codebase, prefix, tmp_path):
    ckpt = openmmlab_resnet_checkpoint(codebase, seed=4, prefix=prefix, **NARROW)
    ckpt['state_dict']['decode_head.conv_seg.weight'] = torch.zeros(4, 8, 1, 1)
    path = save(ckpt, tmp_path / 'openmmlab.pth')
    model = build(codebase, init_cfg=dict(type='Pretrained', checkpoint=path))
    if prefix is None:      # a bare backbone checkpoint plus a stray head tensor
        model.init_weights()
        assert model.pretrained_report.unexpected == ['decode_head.conv_seg.weight']
        return
    model.init_weights()
    own = model.state_dict()
    for key, value in ckpt['state_dict'].items():
        if key.startswith('backbone.'):
            torch.testing.assert_close(own[key[len('backbone.'):]], value, rtol=0, atol=0)
    report = model.pretrained_report
    assert report.layout == 'openmmlab' and report.clean
    assert list(report.dropped) == ['decode_head.conv_seg.weight']


def test_deep_stem_openmmlab_checkpoint():
    """mmseg's ResNetV1c layout (deep stem) through CoLoRAResNet(deep_stem=True)."""
    kw = dict(NARROW, deep_stem=True)
    ckpt = openmmlab_resnet_checkpoint('mmseg', seed=5, **kw)
    model = build('mmseg', **kw)
    model.init_cfg = dict(type='Pretrained', checkpoint=ckpt)
    model.init_weights()
    assert model.pretrained_report.clean
    torch.testing.assert_close(model.stem[0].weight,
                               ckpt['state_dict']['backbone.stem.0.weight'])


@pytest.mark.parametrize('deep_stem', [True, False])
def test_stem_of_the_other_kind_names_deep_stem(deep_stem):
    """A V1c checkpoint (deep stem) in a plain-stem ResNet, and the reverse: the error
    names ``deep_stem`` as the fix."""
    ckpt = openmmlab_resnet_checkpoint('mmseg', seed=5, **dict(NARROW, deep_stem=deep_stem))
    model = build('mmseg', deep_stem=not deep_stem)
    model.init_cfg = dict(type='Pretrained', checkpoint=ckpt)
    with pytest.raises(ValueError, match=r'stem.*deep_stem=True for a checkpoint with '
                       r'stem\.\* tensors'):
        model.init_weights()


def test_width_mismatch_is_an_error():
    sd = torchvision_resnet_state_dict(seed=0)       # full width
    model = build('mmseg')                           # narrow
    model.init_cfg = dict(type='Pretrained', checkpoint=sd)
    with pytest.raises(ValueError, match=r'conv1\.weight: checkpoint \(64, 3, 7, 7\)'):
        model.init_weights()


def test_init_without_pretrained_keeps_adapters_neutral():
    model = build('mmseg')      # default init_cfg: Kaiming on every Conv2d
    model.init_weights()
    for _, m in model.named_modules():
        if isinstance(m, SpatialLowRankBranch):
            assert torch.count_nonzero(m.up.weight) == 0
    # Kaiming (fan_out, normal) reached the wrapped 3x3 convs: std ~ sqrt(2 / fan_out)
    w = model.layer4[0].conv2.weight
    expected = (2.0 / (w.shape[0] * 9)) ** 0.5
    assert abs(w.std().item() - expected) / expected < 0.1


def test_dilated_resnet_as_in_mmseg_pspnet_configs():
    """mmseg's dilated set-up (strides (1, 2, 1, 1), dilations (1, 1, 2, 4)): the branch
    parallel to a dilated conv2 keeps its output size; fresh, it changes nothing."""
    kw = dict(NARROW, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4),
              contract_dilation=True)
    sd = narrow_torchvision(seed=6)
    plain = upstream('mmseg')(**kw)
    plain.load_state_dict({k: v for k, v in sd.items() if not k.startswith('fc.')},
                          strict=False)
    model = build('mmseg', **kw)
    model.init_cfg = dict(type='Pretrained', checkpoint=sd)
    model.init_weights()
    plain.eval()
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outs = model(x)
        for a, b in zip(plain(x), outs):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert outs[-1].shape[-2:] == (8, 8)


@pytest.mark.parametrize('codebase', ['mmseg', 'mmdet'])
def test_checkpoint_of_another_depth_is_an_error(codebase):
    """ResNet-50 weights in a ResNet-101 (layer3: 6 blocks of 23), and the reverse."""
    sd = torchvision_resnet_state_dict((3, 4, 6, 3), REDUCED_RESNET['base_channels'], seed=6)
    model = build(codebase, depth=101)
    model.init_cfg = dict(type='Pretrained', checkpoint=sd)
    with pytest.raises(ValueError, match=r'CoLoRAResNet.*17 blocks/layers of the backbone '
                       r'are not in it.*layer3\.6, layer3\.7.*allow_partial=True'):
        model.init_weights()
    sd = torchvision_resnet_state_dict((3, 4, 23, 3), REDUCED_RESNET['base_channels'],
                                       seed=7)
    model = build(codebase)
    model.init_cfg = dict(type='Pretrained', checkpoint=sd)
    with pytest.raises(ValueError, match=r'17 blocks/layers the backbone lacks'):
        model.init_weights()
    model = build(codebase)
    model.init_cfg = dict(type='Pretrained', checkpoint=sd, allow_partial=True)
    model.init_weights()
    assert len(model.pretrained_report.unexpected_blocks) == 17
