"""CoLoRAConvNeXt: registration, injection, freezing and pretrained loading."""
import logging

import pytest
import torch

pytest.importorskip('mmpretrain')
pytest.importorskip('mmseg')
pytest.importorskip('mmdet')

import colora_mm  # noqa: E402,F401
from colora_mm.adapters import (AdaptedLayer, CoLoRAPairLayer, ConvAdapter,  # noqa: E402
                                SpatialLowRankBranch, is_adapter_name)
from colora_mm.models import CoLoRAConvNeXt  # noqa: E402
from helpers_ckpt import (REDUCED_CONVNEXT, convnext_original_checkpoint,  # noqa: E402
                          convnext_original_shapes, mmpretrain_convnext_checkpoint, save)

SEG_KW = dict(out_indices=[0, 1, 2, 3], gap_before_final_norm=False,
              layer_scale_init_value=1.0)


def build(adapter=dict(method='colora'), arch=REDUCED_CONVNEXT, **kw):
    kwargs = dict(SEG_KW)
    kwargs.update(kw)
    return CoLoRAConvNeXt(arch=arch, adapter=adapter, **kwargs)


def original_to_mmpretrain(key):
    """The renaming the original ConvNeXt release needs, spelled out for the test."""
    if key.startswith('norm.'):
        return 'norm3.' + key[len('norm.'):]
    return (key.replace('.dwconv.', '.depthwise_conv.')
            .replace('.pwconv1.', '.pointwise_conv1.')
            .replace('.pwconv2.', '.pointwise_conv2.'))


# ----------------------------------------------------------------- registry
@pytest.mark.parametrize('scope', ['mmseg', 'mmdet', 'mmpretrain'])
def test_registered_in_every_codebase(scope):
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    model = registry.build(dict(type='CoLoRAConvNeXt', arch=REDUCED_CONVNEXT,
                                adapter=dict(method='colora'), **SEG_KW))
    assert type(model) is CoLoRAConvNeXt
    assert 'ConvNeXt' in type(model).__name__   # what LearningRateDecay... keys on


def test_subclass_of_mmpretrain_convnext():
    from mmpretrain.models.backbones import ConvNeXt
    assert issubclass(CoLoRAConvNeXt, ConvNeXt)


# ----------------------------------------------------------------- injection
def test_colora_targets_every_block():
    model = build()
    blocks = sum(REDUCED_CONVNEXT['depths'])
    layers = dict((n, m) for n, m in model.named_modules() if isinstance(m, AdaptedLayer))
    assert len(layers) == 3 * blocks == len(model.adapted_layer_names)
    for i, depth in enumerate(REDUCED_CONVNEXT['depths']):
        for j in range(depth):
            p = f'stages.{i}.{j}'
            a1 = layers[f'{p}.pointwise_conv1'].adapter_branch
            a2 = layers[f'{p}.pointwise_conv2'].adapter_branch
            assert isinstance(a1, CoLoRAPairLayer) and isinstance(a2, CoLoRAPairLayer)
            assert a1.get_pair() is a2.get_pair()
            assert isinstance(layers[f'{p}.depthwise_conv'].adapter_branch,
                              SpatialLowRankBranch)


def test_trainable_set_peft():
    model = build()
    norms = {f'{mn}.{pn}' for mn, m in model.named_modules()
             if isinstance(m, torch.nn.LayerNorm) for pn, _ in m.named_parameters(
                 recurse=False)}
    expected = {n for n, _ in model.named_parameters()
                if is_adapter_name(n) or n.endswith('.bias') or n in norms}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert 'stages.0.0.gamma' not in trainable            # layer scale stays frozen
    assert 'stages.0.0.pointwise_conv1.weight' not in trainable
    assert 'stages.0.0.pointwise_conv1.bias' in trainable
    assert 'stages.0.0.norm.weight' in trainable
    assert 'norm3.weight' in trainable
    assert 'stages.0.0.pointwise_conv1.adapter_branch.pair.A1' in trainable
    assert 'stages.0.0.depthwise_conv.adapter_branch.down.weight' in trainable


def test_checkpointing_with_moving_partners_is_refused():
    with pytest.raises(ValueError, match="with_cp=True.*partner_policy='frozen'"):
        build(with_cp=True)
    build(with_cp=True, adapter=dict(method='colora', partner_policy='frozen'))
    # an override that moves the partners of one stage
    with pytest.raises(ValueError, match="with_cp=True.*partner_policy='frozen'"):
        build(with_cp=True, adapter=dict(method='colora', partner_policy='frozen',
                                         overrides=[dict(pattern='stages.3.*',
                                                         partner_policy='effective')]))


@pytest.mark.parametrize('share_ratio', [0.0, 1.0])
def test_empty_pair_parts_are_not_trainable(share_ratio):
    """They never get a gradient; DDP would stop on them as unused parameters."""
    model = build(adapter=dict(method='colora', share_ratio=share_ratio))
    assert not any(p.requires_grad for p in model.parameters() if p.numel() == 0)
    sum(out.sum() for out in model(torch.randn(1, 3, 32, 32))).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name


@pytest.mark.parametrize('adapter', [None, dict(method='full')])
def test_full_finetuning_trains_everything(adapter):
    model = build(adapter=adapter)
    assert model.adapted_layer_names == []
    assert all(p.requires_grad for p in model.parameters())


def test_conv_adapter_uses_gelu_in_convnext():
    model = build(adapter=dict(method='conv_adapter'))
    branch = model.stages[0][0].depthwise_conv.adapter_branch
    assert isinstance(branch, ConvAdapter)
    assert isinstance(branch.act, torch.nn.GELU)


def test_frozen_stages_freeze_adapters_and_survive_train():
    model = build(frozen_stages=1)
    model.train()
    for name, p in model.named_parameters():
        if name.startswith(('stages.0.', 'downsample_layers.0.')):
            assert not p.requires_grad, name
    assert model.stages[1][0].pointwise_conv1.adapter_branch.pair.A1.requires_grad
    assert not model.stages[0].training and model.stages[1].training


def test_train_and_eval_return_the_module_and_keep_the_freezing():
    """Unlike the upstream ConvNeXt's, ``train()``/``eval()`` return the module (they
    chain, as for any nn.Module) and still apply ``frozen_stages``."""
    model = build(frozen_stages=1)
    assert model.eval() is model and not model.training
    assert model.train() is model and model.stages[1].training
    assert not model.stages[0].training


@pytest.mark.parametrize('method', ['colora', 'lora', 'pissa', 'hira', 'conv_adapter'])
def test_fresh_adapters_compute_the_upstream_model(method):
    from mmpretrain.models.backbones import ConvNeXt
    torch.manual_seed(0)
    plain = ConvNeXt(arch=REDUCED_CONVNEXT, **SEG_KW)
    plain.eval()         # mmpretrain's train() returns None: no chaining
    model = build(adapter=dict(method=method))
    model.init_cfg = dict(type='Pretrained',
                          checkpoint={'state_dict': plain.state_dict()})
    model.init_weights()
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(plain(x), model(x)):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------- pretrained
def _assert_original_landed(model, sd):
    own = model.state_dict()
    for key, value in sd.items():
        if key.startswith('head.'):
            continue
        target = original_to_mmpretrain(key)
        assert target in own, f'{key} -> {target} missing in the model'
        torch.testing.assert_close(own[target], value.reshape(own[target].shape),
                                   rtol=0, atol=0, msg=f'{key} -> {target}')


def test_original_layout_from_file_lands_everywhere(tmp_path):
    ckpt = convnext_original_checkpoint(REDUCED_CONVNEXT, seed=3)
    path = save(ckpt, tmp_path / 'convnext_original.pth')
    model = build(init_cfg=dict(type='Pretrained', checkpoint=path))
    model.init_weights()
    _assert_original_landed(model, ckpt['model'])
    report = model.pretrained_report
    assert report.layout == 'convnext_original'
    assert set(report.dropped) == {'head.weight', 'head.bias'}
    assert report.unexpected == [] and report.missing_other == []
    assert sorted({k.split('.')[0] for k in report.missing_expected}) == \
        ['norm0', 'norm1', 'norm2']
    n_adapter = sum(1 for k in model.state_dict() if is_adapter_name(k))
    assert len(report.missing_adapter) == n_adapter
    # every backbone tensor of the checkpoint was used
    assert len(report.loaded) == len(ckpt['model']) - 2


def test_partners_are_set_from_the_loaded_weights():
    ckpt = convnext_original_checkpoint(REDUCED_CONVNEXT, seed=4)
    model = build()
    model.init_cfg = dict(type='Pretrained', checkpoint=ckpt)
    model.init_weights()
    sd = ckpt['model']
    pair = model.stages[2][1].pointwise_conv1.adapter_branch.get_pair()
    torch.testing.assert_close(pair.partner_w1, sd['stages.2.1.pwconv1.weight'].t())
    torch.testing.assert_close(pair.partner_w2, sd['stages.2.1.pwconv2.weight'].t())


def test_pissa_svd_runs_after_loading():
    ckpt = convnext_original_checkpoint(REDUCED_CONVNEXT, seed=5)
    model = build(adapter=dict(method='pissa'))
    model.init_cfg = dict(type='Pretrained', checkpoint=ckpt)
    model.init_weights()
    layer = model.stages[1][0].pointwise_conv2
    assert bool(layer.adapter_branch.svd_initialized)
    effective = layer.weight + layer.adapter_branch.delta_weight(layer)
    torch.testing.assert_close(effective, ckpt['model']['stages.1.0.pwconv2.weight'],
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('arch,num_classes', [('small', 1000), ('base', 21841)])
def test_original_release_real_shapes(arch, num_classes):
    """The files at the paper's URLs: convnext_small_22k_1k_384 / convnext_base_22k_224."""
    ckpt = convnext_original_checkpoint(arch, num_classes=num_classes, seed=1)
    model = build(arch=arch)
    model.init_cfg = dict(type='Pretrained', checkpoint=ckpt)
    model.init_weights()
    _assert_original_landed(model, ckpt['model'])
    report = model.pretrained_report
    assert report.clean
    assert len(report.loaded) == len(ckpt['model']) - 2


def test_original_layout_under_an_openmmlab_prefix(tmp_path):
    """A config copied from mmseg's ConvNeXt ones keeps prefix='backbone.' while
    pointing at the paper's URL: the bare checkpoint still loads, and the report says
    the prefix was not found."""
    ckpt = convnext_original_checkpoint(REDUCED_CONVNEXT, seed=10)
    path = save(ckpt, tmp_path / 'convnext_original.pth')
    model = build(init_cfg=dict(type='Pretrained', checkpoint=path, prefix='backbone.'))
    model.init_weights()
    _assert_original_landed(model, ckpt['model'])
    report = model.pretrained_report
    assert report.clean and report.notes
    assert "prefix 'backbone.'" in report.summary('CoLoRAConvNeXt')


def test_original_final_norm_dropped_without_last_out_index():
    ckpt = convnext_original_checkpoint(REDUCED_CONVNEXT, seed=6)
    model = build(out_indices=[0, 1, 2])
    model.init_cfg = dict(type='Pretrained', checkpoint=ckpt)
    model.init_weights()
    assert 'norm.weight' in model.pretrained_report.dropped


@pytest.mark.parametrize('wrap,prefix,cfg_prefix', [
    (True, 'backbone.', None),          # classifier checkpoint, prefix detected
    (True, 'backbone.', 'backbone.'),   # as mmseg's convnext configs write it
    (False, '', None),                  # a bare backbone state dict
])
def test_mmpretrain_layout(tmp_path, wrap, prefix, cfg_prefix):
    ckpt = mmpretrain_convnext_checkpoint(REDUCED_CONVNEXT, seed=7, prefix=prefix,
                                          wrap=wrap)
    if not prefix:
        ckpt = {k: v for k, v in ckpt.items() if not k.startswith('head.')}
    path = save(ckpt, tmp_path / 'mmpretrain.pth')
    init_cfg = dict(type='Pretrained', checkpoint=path)
    if cfg_prefix:
        init_cfg['prefix'] = cfg_prefix
    model = build(init_cfg=init_cfg)
    model.init_weights()
    sd = ckpt['state_dict'] if wrap else ckpt
    own = model.state_dict()
    for key, value in sd.items():
        if key.startswith('head.'):
            continue
        torch.testing.assert_close(own[key[len(prefix):]], value, rtol=0, atol=0)
    report = model.pretrained_report
    assert report.layout == 'openmmlab' and report.clean
    assert all(k.startswith('head.') for k in report.dropped)


def test_shape_mismatch_names_the_tensor_and_the_fix():
    ckpt = convnext_original_checkpoint('tiny', seed=0)
    model = build()
    model.init_cfg = dict(type='Pretrained', checkpoint=ckpt)
    with pytest.raises(ValueError, match=r'downsample_layers\.0\.0\.weight.*arch'):
        model.init_weights()


def test_missing_and_unexpected_tensors_are_reported():
    ckpt = convnext_original_checkpoint(REDUCED_CONVNEXT, seed=8)
    del ckpt['model']['stages.3.0.dwconv.weight']
    ckpt['model']['stages.3.0.extra.weight'] = torch.zeros(3)
    model = build()
    model.init_cfg = dict(type='Pretrained', checkpoint=ckpt)
    model.init_weights()
    report = model.pretrained_report
    assert report.missing_other == ['stages.3.0.depthwise_conv.weight']
    assert report.unexpected == ['stages.3.0.extra.weight']
    assert not report.clean
    text = report.summary('CoLoRAConvNeXt')
    assert 'MISSING' in text and 'stages.3.0.depthwise_conv.weight' in text
    assert 'UNEXPECTED' in text and 'stages.3.0.extra.weight' in text


def test_unrelated_checkpoint_is_an_error():
    model = build()
    model.init_cfg = dict(type='Pretrained', checkpoint={'state_dict': {
        'encoder.weight': torch.zeros(2)}})
    with pytest.raises(ValueError, match='nothing of the pretrained checkpoint'):
        model.init_weights()


def test_init_weights_without_pretrained_keeps_adapters_neutral():
    """Upstream init rules (TruncNormal on every Conv2d/Linear) must not reach the
    adapters' zero-initialised B, but must reach the wrapped base layers."""
    model = build()   # mmpretrain's default init_cfg: TruncNormal(std=.02) + Constant
    model.init_weights()
    layer = model.stages[0][0].depthwise_conv
    assert torch.count_nonzero(layer.adapter_branch.up.weight) == 0
    pw = model.stages[0][0].pointwise_conv1
    assert torch.count_nonzero(pw.bias) == 0       # TruncNormal(bias=0) reached it
    assert abs(pw.weight.std().item() - 0.02) < 0.002   # std .02, not PyTorch's ~0.1


def test_shapes_helper_matches_mmpretrain_names():
    from mmpretrain.models.backbones import ConvNeXt
    plain = ConvNeXt(arch=REDUCED_CONVNEXT, out_indices=[3])
    own = {k: tuple(v.shape) for k, v in plain.state_dict().items()}
    for key, shape in convnext_original_shapes(REDUCED_CONVNEXT).items():
        if key.startswith('head.'):
            continue
        assert own[original_to_mmpretrain(key)] == shape, key


def test_summary_is_logged():
    from mmengine.logging import MMLogger
    logger = MMLogger.get_instance('colora_test_models_convnext')
    ckpt = convnext_original_checkpoint(REDUCED_CONVNEXT, seed=9)
    model = build()
    from colora_mm.models import load_pretrained
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger.addHandler(handler)
    try:
        load_pretrained(model, ckpt, model.convert_pretrained, logger=logger,
                        expected_missing=model.expected_missing)
    finally:
        logger.removeHandler(handler)
    assert any("layout 'convnext_original'" in m and 'classifier head' in m
               for m in messages)


def test_merged_structure_matches_a_merged_model():
    """adapter.merged=True builds what merge_adapters leaves: plain pointwise layers,
    the (unfoldable) spatial branches kept; a merged state dict loads into it exactly."""
    from colora_mm.adapters import AdaptedLayer, iter_adapted_layers, merge_adapters
    model = build(adapter=dict(method='colora'))
    for name, p in model.named_parameters():
        if '.adapter_' in name:
            torch.nn.init.normal_(p, std=0.05)
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
    merge_adapters(model)
    deploy = build(adapter=dict(method='colora', merged=True))
    deploy.eval()
    assert not isinstance(deploy.stages[0][0].pointwise_conv1, AdaptedLayer)
    assert [n for n, _ in iter_adapted_layers(deploy)] == \
        [n for n, _ in iter_adapted_layers(model)]
    deploy.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        for a, b in zip(deploy(x), reference):
            assert torch.allclose(a, b, atol=1e-5)


# ----------------------------------------------------------------- precision
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize('value', [0.0, 0.3])
def test_half_autocast_on_a_constant_image_is_finite(dtype, value):
    """A spatially constant input (a padded border, a blank image) makes every channel
    the spatial branch compresses constant: the range filter must not overflow
    ``gamma_c`` under float16 autocast. Forward and backward stay finite and close to
    float32."""
    torch.manual_seed(0)
    model = build(adapter=dict(method='colora', gamma=8), drop_path_rate=0.0)
    model.init_weights()
    with torch.no_grad():                      # a trained-looking adapter (B != 0)
        for name, p in model.named_parameters():
            if is_adapter_name(name):
                p.normal_(0, 0.05)
    x = torch.full((2, 3, 64, 64), value)
    model.train()
    with torch.autocast('cpu', dtype=dtype):
        outs = model(x)
    assert all(torch.isfinite(o).all() for o in outs)
    sum(o.float().square().mean() for o in outs).backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    model.eval()
    with torch.no_grad():
        want = model(x)
        with torch.autocast('cpu', dtype=dtype):
            got = model(x)
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    for g, w in zip(got, want):
        assert (g.float() - w).abs().max() <= tol * max(w.abs().max().item(), 1.0)


def _read_error(path_or_url):
    from colora_mm.models.pretrained import PretrainedCheckpointError
    model = build(init_cfg=dict(type='Pretrained', checkpoint=str(path_or_url)))
    with pytest.raises(PretrainedCheckpointError) as info:
        model.init_weights()
    text = str(info.value)
    assert 'CoLoRAConvNeXt' in text and str(path_or_url) in text
    assert '--cfg-options model.backbone.init_cfg.checkpoint=LOCAL_PATH' in text
    assert '\n' not in text
    return info.value


def test_empty_checkpoint_file_names_the_backbone_and_the_fix(tmp_path):
    path = tmp_path / 'empty.pth'
    path.write_bytes(b'')
    err = _read_error(path)
    assert 'empty' in str(err) and isinstance(err.__cause__, EOFError)


def test_truncated_checkpoint_file_names_the_backbone_and_the_fix(tmp_path):
    path = save(convnext_original_checkpoint(REDUCED_CONVNEXT, seed=11),
                tmp_path / 'whole.pth')
    data = open(path, 'rb').read()
    cut = tmp_path / 'cut.pth'
    cut.write_bytes(data[:len(data) // 2])
    err = _read_error(cut)
    assert 'truncated' in str(err) and isinstance(err.__cause__, RuntimeError)


def test_unreachable_url_names_the_backbone_and_the_fix(tmp_path, monkeypatch):
    from urllib.error import URLError
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    # port 9 (discard) on the loopback: refused at once, online or not
    err = _read_error('http://127.0.0.1:9/colora_missing_checkpoint.pth')
    assert 'could not be downloaded' in str(err)
    assert isinstance(err.__cause__, URLError)


def _other_depth(depths):
    return dict(REDUCED_CONVNEXT, depths=depths)


def test_checkpoint_with_fewer_blocks_is_an_error():
    """A ConvNeXt-T checkpoint in a ConvNeXt-S config: same widths, fewer blocks."""
    ckpt = convnext_original_checkpoint(_other_depth([1, 1, 2, 1]), seed=12)
    model = build(init_cfg=dict(type='Pretrained', checkpoint=ckpt))
    with pytest.raises(ValueError, match=r'CoLoRAConvNeXt.*1 blocks/layers of the backbone '
                       r'are not in it.*stages\.2\.2.*allow_partial=True'):
        model.init_weights()


def test_checkpoint_with_more_blocks_is_an_error():
    ckpt = convnext_original_checkpoint(_other_depth([1, 1, 5, 1]), seed=13)
    model = build(init_cfg=dict(type='Pretrained', checkpoint=ckpt))
    with pytest.raises(ValueError, match=r'2 blocks/layers the backbone lacks.*'
                       r'stages\.2\.3, stages\.2\.4.*allow_partial=True'):
        model.init_weights()


def test_allow_partial_loads_a_checkpoint_of_another_depth():
    ckpt = convnext_original_checkpoint(_other_depth([1, 1, 2, 1]), seed=14)
    model = build(init_cfg=dict(type='Pretrained', checkpoint=ckpt, allow_partial=True))
    model.init_weights()
    report = model.pretrained_report
    assert report.missing_blocks == ['stages.2.2'] and not report.clean
    assert any('allow_partial' in note for note in report.notes)
    torch.testing.assert_close(model.stages[2][1].depthwise_conv.weight,
                               ckpt['model']['stages.2.1.dwconv.weight'])


def test_training_forward_forms_the_factors_of_equal_pairs_together(monkeypatch):
    """Where the CPU's pair node does not apply (as on a GPU), a training forward pass
    forms the factors of stage 3's three equal pairs together (both sides), an
    evaluation pass does not; either way every stack is gone afterwards."""
    from colora_mm.adapters import CoLoRAPair
    from colora_mm.adapters import pair_batch
    monkeypatch.setenv('COLORA_MM_UP3X3', 'conv')
    calls = []
    stacked = pair_batch.stacked_factors

    def spy(pairs, index):
        calls.append((len(pairs), index))
        return stacked(pairs, index)
    monkeypatch.setattr(pair_batch, 'stacked_factors', spy)
    model = build().train()
    x = torch.randn(1, 3, 32, 32)
    model(x)
    assert calls == [(3, 0), (3, 1)]
    model.eval()
    with torch.no_grad():
        model(x)
    assert len(calls) == 2
    assert all(m._stacked == [None, None] for m in model.modules()
               if isinstance(m, CoLoRAPair))


@pytest.mark.parametrize('factors', ['as run', 'python'])
@pytest.mark.parametrize('adapter', [dict(method='colora', partner_policy='frozen'),
                                     dict(method='lora')])
def test_checkpointed_blocks_train_like_plain_ones(adapter, factors, monkeypatch):
    """``with_cp=True`` recomputes each block in backward (the pairs' C++ node on the
    CPU, or their Python formulation with the equal pairs' factors formed together, as
    on a GPU; the activation path's recomputed inputs): the same gradients as
    without."""
    from colora_mm.adapters import reset_adapters_from_weights
    if factors == 'python':
        monkeypatch.setenv('COLORA_MM_UP3X3', 'conv')
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 64, 64, generator=g)
    grads = []
    for with_cp in (False, True):
        torch.manual_seed(0)
        model = build(with_cp=with_cp, adapter=adapter)
        reset_adapters_from_weights(model)
        torch.manual_seed(2)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if 'adapter_' in name:
                    p.normal_(0, 0.1)
        model.train()
        outs = model(x)
        # a random projection of every output (a sum of squares of a LayerNorm output
        # has no gradient)
        proj = torch.Generator().manual_seed(3)
        sum((o * torch.randn(o.shape, generator=proj)).sum() for o in outs).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    plain, ckpt = grads
    assert plain.keys() == ckpt.keys() and plain
    for name, want in plain.items():
        assert (ckpt[name] - want).abs().max() <= 1e-5 * max(want.abs().max().item(), 1e-6), name


def test_layer_scale_of_another_kind_is_an_error():
    """A checkpoint with layer scale (``gamma`` in every block) into a backbone
    without it, and the reverse, are other variants of the architecture: refused with
    the setting that fixes it (the blocks would compute another function)."""
    with_scale = convnext_original_checkpoint(REDUCED_CONVNEXT, seed=8)
    model = build(layer_scale_init_value=0.)
    model.init_cfg = dict(type='Pretrained', checkpoint=with_scale)
    with pytest.raises(ValueError, match=r'it has stages\.\*\.\*\.gamma \(6 tensors\).*'
                       r'layer_scale_init_value > 0.*allow_partial=True'):
        model.init_weights()
    without = {'model': {k: v for k, v in with_scale['model'].items()
                         if not k.endswith('.gamma')}}
    model = build()
    model.init_cfg = dict(type='Pretrained', checkpoint=without)
    with pytest.raises(ValueError, match=r'every stages\.\*\.\*\.gamma of the backbone '
                       r'\(6 tensors\) is missing'):
        model.init_weights()
    model = build()
    model.init_cfg = dict(type='Pretrained', checkpoint=without, allow_partial=True)
    model.init_weights()
    assert 'kinds of tensor' in model.pretrained_report.notes[-1]


def test_convnext_v2_checkpoint_is_an_error():
    ckpt = convnext_original_checkpoint(REDUCED_CONVNEXT, seed=8)
    sd = {k: v for k, v in ckpt['model'].items() if not k.endswith('.gamma')}
    for key in [k for k in sd if k.endswith('.pwconv1.weight')]:
        block = key[:-len('pwconv1.weight')]
        width = sd[key].shape[0]
        sd[block + 'grn.gamma'] = torch.zeros(1, 1, 1, width)
        sd[block + 'grn.beta'] = torch.zeros(1, 1, 1, width)
    model = build()
    model.init_cfg = dict(type='Pretrained', checkpoint={'model': sd})
    with pytest.raises(ValueError, match=r'stages\.\*\.\*\.grn\.beta.*ConvNeXt-V2'):
        model.init_weights()


@pytest.mark.parametrize('linear_pw_conv', [True, False])
def test_mmpretrain_checkpoint_of_the_other_pointwise_form(tmp_path, linear_pw_conv):
    """Pointwise weights saved as Linear ``(out, in)`` load into 1x1 convs ``(out, in,
    1, 1)`` and the reverse: the same numbers."""
    source = build(linear_pw_conv=not linear_pw_conv)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    state = {k: v for k, v in source.state_dict().items() if not is_adapter_name(k)}
    path = save({'state_dict': {f'backbone.{k}': v for k, v in state.items()}},
                tmp_path / 'mmpretrain.pth')
    model = build(linear_pw_conv=linear_pw_conv,
                  init_cfg=dict(type='Pretrained', checkpoint=path))
    model.init_weights()
    own = model.state_dict()
    for key, value in state.items():
        torch.testing.assert_close(own[key].reshape(value.shape), value, rtol=0, atol=0)
    assert model.pretrained_report.clean
    assert own['stages.0.0.pointwise_conv1.weight'].dim() == (2 if linear_pw_conv else 4)
