"""CoLoRASwin (mmseg and mmdet): registration, targets, trainable set, bad input,
pretrained checkpoints in their published layouts, and merging to a plain Swin."""
import pytest
import torch
import torch.nn as nn

pytest.importorskip('mmseg')
pytest.importorskip('mmdet')

import colora_mm  # noqa: E402,F401
from colora_mm.adapters import (AdaptedLayer, CoLoRAPairLayer, LoRA,  # noqa: E402
                                is_adapter_name, iter_adapted_layers, merge_adapters)
from colora_mm.models import DetCoLoRASwin, SegCoLoRASwin  # noqa: E402
from helpers_ckpt import (REDUCED_SWIN, SWIN_T, openmmlab_swin_checkpoint,  # noqa: E402
                          relative_position_index, save, swin_original_checkpoint)

CLASSES = {'mmseg': SegCoLoRASwin, 'mmdet': DetCoLoRASwin}


def upstream(codebase):
    if codebase == 'mmseg':
        from mmseg.models.backbones import SwinTransformer
    else:
        from mmdet.models.backbones import SwinTransformer
    return SwinTransformer


def build(codebase='mmseg', adapter=dict(method='colora'), arch=REDUCED_SWIN, **kw):
    return CLASSES[codebase](adapter=adapter, **dict(arch), **kw)


def blocks(arch=REDUCED_SWIN):
    return [f'stages.{i}.blocks.{j}' for i, d in enumerate(arch['depths'])
            for j in range(d)]


def adapters_moved(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter_name(name):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------- registry
@pytest.mark.parametrize('codebase', ['mmseg', 'mmdet'])
def test_registered_in_both_codebases(codebase):
    registry = __import__(f'{codebase}.registry', fromlist=['MODELS']).MODELS
    model = registry.build(dict(type='CoLoRASwin', adapter=dict(method='colora'),
                                **REDUCED_SWIN))
    assert type(model) is CLASSES[codebase]
    assert isinstance(model, upstream(codebase))


# ----------------------------------------------------------------- targets
@pytest.mark.parametrize('codebase', ['mmseg', 'mmdet'])
def test_every_mlp_is_a_correlated_pair_and_nothing_else(codebase):
    model = build(codebase)
    layers = dict(iter_adapted_layers(model))
    assert len(layers) == 2 * len(blocks()) == len(model.adapted_layer_names)
    for i, c in enumerate(REDUCED_SWIN['embed_dims'] * 2 ** k for k in range(4)):
        for j in range(REDUCED_SWIN['depths'][i]):
            b = f'stages.{i}.blocks.{j}.ffn'
            a1 = layers[f'{b}.layers.0.0'].adapter_branch
            a2 = layers[f'{b}.layers.1'].adapter_branch
            assert isinstance(a1, CoLoRAPairLayer) and a1.get_pair() is a2.get_pair()
            pair = a1.get_pair()
            assert (pair.d, pair.d_mid, pair.d_out) == (c, 4 * c, c)
            assert pair.r == c // 16
    # no spatial branch, no attention adapter by default
    assert type(model.stages[0].blocks[0].attn.w_msa.qkv) is nn.Linear
    assert type(model.patch_embed.projection) is nn.Conv2d


def test_attention_projections_take_lora_as_an_option():
    model = build(attn_adapter=dict(method='lora', gamma=8))
    for b in blocks():
        qkv = model.get_submodule(f'{b}.attn.w_msa.qkv')
        proj = model.get_submodule(f'{b}.attn.w_msa.proj')
        assert isinstance(qkv.adapter_branch, LoRA) and isinstance(proj.adapter_branch, LoRA)
        c = proj.in_channels
        assert qkv.adapter_branch.rank == c // 8 and qkv.out_channels == 3 * c
        assert isinstance(model.get_submodule(f'{b}.ffn.layers.0.0').adapter_branch,
                          CoLoRAPairLayer)
    assert len(model.adapted_layer_names) == 4 * len(blocks())


def test_the_attention_adapter_is_recorded_and_compared():
    """A checkpoint's record says which attention adapter it was trained with: LoRA
    and HiRA there have the same tensors, and only the record tells them apart."""
    from colora_mm.engine.adapter_settings import adapter_settings, settings_differences
    lora = adapter_settings(build(attn_adapter=dict(method='lora', gamma=8)), 'backbone')
    hira = adapter_settings(build(attn_adapter=dict(method='hira', gamma=8)), 'backbone')
    plain = adapter_settings(build(), 'backbone')
    assert lora['backbone (attention)']['method'] == 'lora'
    assert 'backbone (attention)' not in plain
    assert settings_differences(lora, lora) == []
    assert any('backbone (attention).adapter.method' in d
               for d in settings_differences(lora, hira))
    assert any(d.startswith('backbone (attention): adapted in the checkpoint')
               for d in settings_differences(lora, plain))


def test_lora_adapts_the_mlp_layers():
    model = build(adapter=dict(method='lora', gamma=8))
    names = {n for n, _ in iter_adapted_layers(model)}
    assert names == {f'{b}.ffn.layers.{k}' for b in blocks() for k in ('0.0', '1')}


def test_trainable_set_is_adapters_biases_and_norms():
    model = build(attn_adapter=dict(method='lora'))
    norms = {f'{mn}.{pn}' for mn, m in model.named_modules()
             if isinstance(m, nn.LayerNorm) for pn, _ in m.named_parameters(recurse=False)}
    expected = {n for n, _ in model.named_parameters()
                if is_adapter_name(n) or n.endswith('.bias') or n in norms}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected
    b = 'stages.1.blocks.1'
    assert f'{b}.attn.w_msa.relative_position_bias_table' not in trainable
    assert f'{b}.attn.w_msa.qkv.weight' not in trainable
    assert f'{b}.attn.w_msa.qkv.bias' in trainable
    assert f'{b}.attn.w_msa.qkv.adapter_branch.A' in trainable
    assert f'{b}.ffn.layers.0.0.adapter_branch.pair.As' in trainable
    assert 'stages.0.downsample.norm.weight' in trainable
    assert 'norm3.weight' in trainable and 'patch_embed.projection.weight' not in trainable


def test_frozen_stages_freeze_adapters_too():
    model = build(frozen_stages=2)
    assert model.train() is model and model.eval() is model   # they chain
    model.train()
    for name, p in model.named_parameters():
        if name.startswith(('stages.0.', 'stages.1.', 'patch_embed.', 'norm0', 'norm1')):
            assert not p.requires_grad, name
    assert model.stages[2].blocks[0].ffn.layers[0][0].adapter_branch.pair.A1.requires_grad


@pytest.mark.parametrize('codebase', ['mmseg', 'mmdet'])
@pytest.mark.parametrize('adapter,attn', [
    (dict(method='colora'), None), (dict(method='lora'), dict(method='lora')),
    (dict(method='pissa', gamma=8), dict(method='hira', gamma=8))])
def test_fresh_adapters_compute_the_upstream_model(codebase, adapter, attn):
    torch.manual_seed(0)
    plain = upstream(codebase)(**REDUCED_SWIN)
    plain.init_weights()
    plain.eval()         # upstream's train() returns None: no chaining
    model = build(codebase, adapter=adapter, attn_adapter=attn,
                  init_cfg=dict(type='Pretrained', checkpoint=dict(
                      state_dict=plain.state_dict())))
    model.init_weights()
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(plain(x), model(x)):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_overrides_on_swin_stages():
    model = build(adapter=dict(method='colora', gamma=16, overrides=[
        dict(pattern='stages.3.*', gamma=4, share_ratio=0.75),
        dict(pattern='stages.0.*', method='none')]))
    names = [n for n, _ in iter_adapted_layers(model)]
    assert not any(n.startswith('stages.0.') for n in names)
    pair = model.stages[3].blocks[1].ffn.layers[0][0].adapter_branch.get_pair()
    assert (pair.r, pair.rs) == (256 // 4, 48)
    assert model.stages[1].blocks[0].ffn.layers[0][0].adapter_branch.get_pair().r == 4


# ----------------------------------------------------------------- bad input
def _raises(fn, *fragments):
    with pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    for fragment in fragments:
        assert fragment in msg, f'{fragment!r} not in: {msg}'


def test_spatial_target_that_is_not_a_conv():
    _raises(lambda: build(adapter_spatial=['stages.0.blocks.0.ffn.layers.1']),
            'adapter_spatial names stages.0.blocks.0.ffn.layers.1', 'Linear (128 -> 32)',
            'a Swin block has none', 'drop adapter_spatial')
    _raises(lambda: build(adapter_spatial=['stages.0.blocks.0.attn']),
            'ShiftWindowMSA', 'no convolution')
    _raises(lambda: build(adapter_spatial=['stages.9.conv']), "'stages.9.conv' matches no")


def test_attention_adapter_must_be_pointwise():
    _raises(lambda: build(attn_adapter=dict(method='colora')),
            "attn_adapter method='colora'", "('lora', 'pissa', 'hira')")
    _raises(lambda: build(adapter=None, attn_adapter=dict(method='lora')),
            "adapter method 'full'", 'drop attn_adapter')


def test_gamma_too_large_for_the_first_stage():
    _raises(lambda: build(adapter=dict(method='colora', gamma=64)),
            'stages.0.blocks.0.ffn.layers.0.0', '32 -> 128 -> 32', '32 // 64 = 0',
            'gamma <= 32', "dict(pattern='stages.0.*', gamma=32)")
    build(adapter=dict(method='colora', gamma=64, overrides=[
        dict(pattern='stages.0.*', gamma=32)]))


def test_checkpointing_with_moving_partners_is_refused():
    _raises(lambda: build(with_cp=True), 'with_cp=True', "partner_policy='frozen'")
    build(with_cp=True, adapter=dict(method='colora', partner_policy='frozen'))


# ----------------------------------------------------------------- pretrained
def _non_adapter(model):
    return {k: v for k, v in model.state_dict().items() if not is_adapter_name(k)}


def test_original_release_loads_as_mmdet_loads_it(tmp_path):
    """The release's layout: our loading equals mmdet's SwinTransformer(convert_weights=
    True) reading the same file, tensor for tensor."""
    path = save(swin_original_checkpoint(REDUCED_SWIN, img_size=128, seed=1),
                tmp_path / 'swin_original.pth')
    from mmengine.config import ConfigDict
    init_cfg = dict(type='Pretrained', checkpoint=path)
    reference = upstream('mmdet')(**REDUCED_SWIN, convert_weights=True,   # as in configs
                                  init_cfg=ConfigDict(init_cfg))
    reference.init_weights()
    for codebase in ('mmseg', 'mmdet'):
        model = build(codebase, init_cfg=init_cfg)
        model.init_weights()
        own = _non_adapter(model)
        expected = reference.state_dict()
        assert set(own) == set(expected)
        for key, value in expected.items():
            torch.testing.assert_close(own[key], value, rtol=0, atol=0, msg=key)
        report = model.pretrained_report
        assert report.layout == 'swin_original' and report.clean
        assert report.renamed['layers.1.blocks.0.mlp.fc1.weight'] == \
            'stages.1.blocks.0.ffn.layers.0.0.weight'
        assert report.dropped['head.weight'] == 'classifier head'
        assert "classifier's final norm" in report.dropped['norm.weight']
        assert 'attention mask' in report.dropped['layers.0.blocks.1.attn_mask']
        assert sorted({k.split('.')[0] for k in report.missing_expected}) == \
            ['norm0', 'norm1', 'norm2', 'norm3']


def test_original_release_tensors_land_where_they_belong():
    sd = swin_original_checkpoint(REDUCED_SWIN, img_size=128, seed=2)['model']
    model = build(init_cfg=dict(type='Pretrained', checkpoint={'model': sd}))
    model.init_weights()
    own = model.state_dict()
    for k in ('mlp.fc1.weight', 'mlp.fc2.bias', 'attn.qkv.weight', 'attn.proj.bias',
              'norm1.weight', 'attn.relative_position_bias_table'):
        new = k.replace('mlp.fc1', 'ffn.layers.0.0').replace('mlp.fc2', 'ffn.layers.1') \
               .replace('attn.', 'attn.w_msa.')
        torch.testing.assert_close(own[f'stages.2.blocks.1.{new}'],
                                   sd[f'layers.2.blocks.1.{k}'], rtol=0, atol=0)
    torch.testing.assert_close(own['patch_embed.projection.weight'],
                               sd['patch_embed.proj.weight'], rtol=0, atol=0)
    # patch merging: the release concatenates the 2x2 neighbours as (0,0) (1,0) (0,1)
    # (1,1), mmcv's unfold as (0,0) (0,1) (1,0) (1,1): the middle two blocks swap.
    c = REDUCED_SWIN['embed_dims']
    w, v = sd['layers.0.downsample.reduction.weight'], \
        own['stages.0.downsample.reduction.weight']
    blocks_release = w.reshape(2 * c, 4, c)
    # mmcv's unfold interleaves: index channel * 4 + position
    blocks_unfold = v.reshape(2 * c, c, 4).permute(0, 2, 1)
    for pos_unfold, pos_release in enumerate((0, 2, 1, 3)):
        torch.testing.assert_close(blocks_unfold[:, pos_unfold],
                                   blocks_release[:, pos_release], rtol=0, atol=0)
    # partners come from the loaded MLP weights
    pair = model.stages[2].blocks[1].ffn.layers[0][0].adapter_branch.get_pair()
    torch.testing.assert_close(pair.partner_w1, sd['layers.2.blocks.1.mlp.fc1.weight'].t())
    torch.testing.assert_close(pair.partner_w2, sd['layers.2.blocks.1.mlp.fc2.weight'].t())


@pytest.mark.parametrize('prefix,wrap', [('', False), ('backbone.', True)])
def test_openmmlab_layout_loads_as_mmseg_loads_it(tmp_path, prefix, wrap):
    ckpt = openmmlab_swin_checkpoint(REDUCED_SWIN, seed=3, prefix=prefix, wrap=wrap)
    path = save(ckpt, tmp_path / 'openmmlab.pth')
    init_cfg = dict(type='Pretrained', checkpoint=path)
    reference = upstream('mmseg')(**REDUCED_SWIN, init_cfg=init_cfg)
    reference.init_weights()
    model = build('mmseg', init_cfg=init_cfg)
    model.init_weights()
    own = _non_adapter(model)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(own[key], value, rtol=0, atol=0, msg=key)
    report = model.pretrained_report
    assert report.layout == 'openmmlab' and report.clean and not report.renamed
    assert set(report.dropped) == {'norm.weight', 'norm.bias'}


def test_other_window_size_resizes_the_bias_tables_as_upstream(tmp_path):
    """A window-7 checkpoint into a window-4 model: the tables are resized bicubically,
    as mmseg's own init_weights does."""
    arch7 = dict(REDUCED_SWIN, window_size=7)
    ckpt = openmmlab_swin_checkpoint(arch7, seed=4, final_norm=False)
    model = build('mmseg', init_cfg=dict(type='Pretrained', checkpoint=save(
        ckpt, tmp_path / 'w7.pth')))
    model.init_weights()
    dropped = model.pretrained_report.dropped
    assert set(dropped) == {k for k in ckpt if k.endswith('relative_position_index')}
    assert all('another window size' in why for why in dropped.values())
    resized = [n for n in model.pretrained_report.notes
               if 'resized bicubically from window 7 to 4' in n]   # in the report
    assert len(resized) == sum(k.endswith('relative_position_bias_table') for k in ckpt)
    # upstream cannot load the window-7 index buffers at all (a size mismatch): it gets
    # the checkpoint without them
    path = save({k: v for k, v in ckpt.items() if k not in dropped}, tmp_path / 'up.pth')
    reference = upstream('mmseg')(**REDUCED_SWIN,
                                  init_cfg=dict(type='Pretrained', checkpoint=path))
    reference.init_weights()
    key = 'stages.1.blocks.0.attn.w_msa.relative_position_bias_table'
    assert model.state_dict()[key].shape == (7 * 7, 2)
    torch.testing.assert_close(model.state_dict()[key], reference.state_dict()[key],
                               rtol=1e-6, atol=1e-6)
    index = 'stages.1.blocks.0.attn.w_msa.relative_position_index'
    torch.testing.assert_close(model.state_dict()[index], relative_position_index(4))


def test_swin_t_release_real_shapes():
    """swin_tiny_patch4_window7_224.pth, key for key."""
    ckpt = swin_original_checkpoint(SWIN_T, seed=5)
    model = CLASSES['mmdet'](adapter=dict(method='colora'), **SWIN_T,
                             init_cfg=dict(type='Pretrained', checkpoint=ckpt))
    model.init_weights()
    report = model.pretrained_report
    assert report.clean
    assert len(report.loaded) + len(report.dropped) == len(ckpt['model'])


def test_convnext_checkpoint_is_refused():
    from helpers_ckpt import REDUCED_CONVNEXT, convnext_original_checkpoint
    model = build(init_cfg=dict(type='Pretrained',
                                checkpoint=convnext_original_checkpoint(REDUCED_CONVNEXT)))
    with pytest.raises(ValueError, match="'convnext_original' checkpoint is not a Swin"):
        model.init_weights()


# ----------------------------------------------------------------- merge
@pytest.mark.parametrize('codebase', ['mmseg', 'mmdet'])
def test_merge_gives_a_plain_upstream_swin(codebase):
    model = build(codebase, attn_adapter=dict(method='lora', gamma=8), adapter=dict(
        method='colora', overrides=[dict(pattern='stages.3.*', gamma=4)]))
    adapters_moved(model)
    model.train()
    model(torch.randn(2, 3, 64, 64))         # the effective partners move
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
        assert merge_adapters(model) == []
        merged = model(x)
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
    plain = upstream(codebase)(**REDUCED_SWIN)
    plain.eval()
    plain.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        for a, b, c in zip(reference, merged, plain(x)):
            assert (a - b).abs().max() < 1e-5 and (a - c).abs().max() < 1e-5


def test_merged_flag_builds_the_plain_structure():
    deploy = build(adapter=dict(method='colora', merged=True),
                   attn_adapter=dict(method='lora'))
    assert not any(isinstance(m, AdaptedLayer) for m in deploy.modules())
    plain = upstream('mmseg')(**REDUCED_SWIN)
    assert set(deploy.state_dict()) == set(plain.state_dict())


def test_other_window_size_index_buffers_are_expected_missing(tmp_path):
    """The window-7 index buffers are dropped on purpose; the model's own window-4 ones
    are explained as expected, and the load is clean."""
    ckpt = openmmlab_swin_checkpoint(dict(REDUCED_SWIN, window_size=7), seed=6,
                                     final_norm=False)
    model = build('mmseg', init_cfg=dict(type='Pretrained', checkpoint=ckpt))
    model.init_weights()
    report = model.pretrained_report
    index = {k for k in model.state_dict() if k.endswith('relative_position_index')}
    assert index and set(report.missing_expected) >= index
    assert report.missing_other == [] and report.clean
    assert 'MISSING' not in report.summary('CoLoRASwin')


@pytest.mark.parametrize('codebase', ['mmseg', 'mmdet'])
@pytest.mark.parametrize('window', [0, -2])
def test_window_size_below_one(codebase, window):
    _raises(lambda: build(codebase, arch=dict(REDUCED_SWIN, window_size=window)),
            f'CoLoRASwin: window_size={window}', 'integer >= 1',
            'set window_size to a positive integer')


@pytest.mark.parametrize('codebase', ['mmseg', 'mmdet'])
def test_num_heads_per_stage(codebase):
    _raises(lambda: build(codebase, arch=dict(REDUCED_SWIN, num_heads=(1, 2, 4))),
            'num_heads=(1, 2, 4) has 3 entries', 'depths=(2, 2, 2, 2) has 4 stages',
            'one number of heads per stage')


@pytest.mark.parametrize('codebase', ['mmseg', 'mmdet'])
def test_stage_width_divisible_by_heads(codebase):
    _raises(lambda: build(codebase, arch=dict(REDUCED_SWIN, num_heads=(1, 2, 3, 8))),
            'stage 2 is embed_dims * 2**2 = 32 * 4 = 128 wide',
            'num_heads[2]=3 does not divide', 'divisors of 128')


def test_checkpoint_of_another_depth_is_an_error():
    """Swin-S weights (18 blocks in stage 2) in a Swin-T (6): here 4 blocks in 2."""
    ckpt = swin_original_checkpoint(dict(REDUCED_SWIN, depths=(2, 2, 4, 2)), seed=7)
    _raises(lambda: build('mmdet', init_cfg=dict(type='Pretrained',
                                                 checkpoint=ckpt)).init_weights(),
            'CoLoRASwin', '2 blocks/layers the backbone lacks',
            'stages.2.blocks.2, stages.2.blocks.3', 'allow_partial=True')


@pytest.mark.parametrize('codebase', ['mmseg', 'mmdet'])
def test_absolute_position_embedding_loads(codebase, tmp_path):
    """``use_abs_pos_embed=True``: upstream's parameter is ``(1, L, C)`` as in the
    checkpoints; it loads as it is."""
    ckpt = openmmlab_swin_checkpoint(REDUCED_SWIN, seed=3, prefix='', wrap=False)
    pos = torch.randn(1, 56 * 56, REDUCED_SWIN['embed_dims'])
    ckpt['absolute_pos_embed'] = pos
    model = build(codebase, use_abs_pos_embed=True,
                  init_cfg=dict(type='Pretrained', checkpoint=save(ckpt, tmp_path / 'a.pth')))
    model.init_weights()
    torch.testing.assert_close(model.absolute_pos_embed.detach(), pos, rtol=0, atol=0)
    assert model.pretrained_report.clean


@pytest.mark.parametrize('codebase', ['mmseg', 'mmdet'])
def test_pissa_from_scratch_decomposes_the_initialised_weights(codebase):
    """Without a checkpoint the adapted Linear layers get upstream's truncated-normal
    initialisation first, then PiSSA's SVD of those weights: ``s B A`` is the top-r
    part of the effective weight, which has upstream's std."""
    model = build(codebase, adapter=dict(method='pissa'))
    model.init_weights()
    layers = list(iter_adapted_layers(model))
    assert layers
    for name, layer in layers:
        pissa = layer.adapter_branch
        low = (pissa.scaling * pissa.B.double() @ pissa.A.double()).detach()
        effective = (layer.weight_matrix().double() + low).detach()
        u, s, vh = torch.linalg.svd(effective, full_matrices=False)
        r = pissa.rank
        torch.testing.assert_close(low, (u[:, :r] * s[:r]) @ vh[:r], rtol=0, atol=1e-6,
                                   msg=name)
        assert 0.015 < float(effective.std()) < 0.025, name


def test_pretrained_load_leaves_out_upstreams_from_scratch_notice(tmp_path, capsys):
    """Upstream announces training from scratch whenever its init_cfg is empty, which
    it is while it initialises before the checkpoint loads: not printed (mmseg) nor
    logged (mmdet) then; printed when there is no checkpoint."""
    import logging

    from mmengine.logging import MMLogger
    ckpt = save(openmmlab_swin_checkpoint(REDUCED_SWIN, seed=3, prefix='', wrap=False),
                tmp_path / 'swin.pth')
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = MMLogger.get_current_instance()
    keep = Keep()
    logger.addHandler(keep)
    try:
        for codebase in ('mmseg', 'mmdet'):
            build(codebase, init_cfg=dict(type='Pretrained', checkpoint=ckpt)).init_weights()
        assert 'No pre-trained weights' not in capsys.readouterr().out
        assert not [r for r in records if 'No pre-trained weights' in r]
        assert [r for r in records if 'loaded' in r]        # the load report still is
        build('mmseg').init_weights()
        assert 'No pre-trained weights for CoLoRASwin' in capsys.readouterr().out
    finally:
        logger.removeHandler(keep)
