"""The backbones inside upstream model configs: mmseg's UperNet-ConvNeXt base and mmdet's
Faster R-CNN R50-FPN base, with only the backbone type (and sizes) swapped, built from
the codebases' registries, initialised from synthetic paper-layout checkpoints, run, and
given their optimizers."""
import pytest
import torch

pytest.importorskip('mmseg')
pytest.importorskip('mmdet')

import colora_mm  # noqa: E402,F401
from colora_mm.adapters import is_adapter_name  # noqa: E402
from helpers_ckpt import (REDUCED_CONVNEXT, REDUCED_RESNET,  # noqa: E402
                          convnext_original_checkpoint, save,
                          torchvision_resnet_state_dict)
from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402


def upstream_config(package, path):
    """A config shipped with an installed codebase (what ``package::path`` names in a
    config's ``_base_``)."""
    import importlib
    import os.path as osp
    root = osp.dirname(importlib.import_module(package).__file__)
    return Config.fromfile(osp.join(root, '.mim', 'configs', path))


def test_upernet_convnext_with_colora_backbone(tmp_path):
    from mmseg.registry import MODELS, OPTIM_WRAPPER_CONSTRUCTORS
    init_default_scope('mmseg')
    cfg = upstream_config('mmseg', '_base_/models/upernet_convnext.py')
    path = save(convnext_original_checkpoint(REDUCED_CONVNEXT, seed=0),
                tmp_path / 'convnext_original.pth')
    ch = REDUCED_CONVNEXT['channels']
    cfg.model.backbone = dict(
        type='CoLoRAConvNeXt', arch=REDUCED_CONVNEXT, out_indices=[0, 1, 2, 3],
        drop_path_rate=0.1, layer_scale_init_value=1.0, gap_before_final_norm=False,
        adapter=dict(method='colora', gamma=16, share_ratio=0.5, use_filter=True,
                     partner_policy='effective'),
        init_cfg=dict(type='Pretrained', checkpoint=path))
    for head in (cfg.model.decode_head, cfg.model.auxiliary_head):
        head.norm_cfg = dict(type='BN', requires_grad=True)
        head.num_classes = 4
    cfg.model.decode_head.in_channels = ch
    cfg.model.decode_head.channels = 32
    cfg.model.auxiliary_head.in_channels = ch[2]
    cfg.model.auxiliary_head.channels = 16
    model = MODELS.build(cfg.model)
    model.init_weights()
    assert model.backbone.pretrained_report.clean
    backbone_trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert any(is_adapter_name(n) for n in backbone_trainable)
    assert 'stages.0.0.pointwise_conv1.weight' not in backbone_trainable
    assert all(p.requires_grad for p in model.decode_head.parameters())
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64), mode='tensor')
    assert out.shape == (1, 4, 16, 16)

    constructor = OPTIM_WRAPPER_CONSTRUCTORS.build(dict(
        type='LearningRateDecayOptimizerConstructor',
        optim_wrapper_cfg=dict(type='OptimWrapper', optimizer=dict(
            type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05)),
        paramwise_cfg=dict(decay_rate=0.9, decay_type='stage_wise', num_layers=12)))
    groups = constructor(model).optimizer.param_groups
    lrs = {n: g['lr'] for g in groups for n in g['param_names']}
    assert lrs['decode_head.conv_seg.weight'] == pytest.approx(1e-4)
    assert lrs['backbone.stages.3.0.pointwise_conv1.adapter_branch.pair.As'] == \
        pytest.approx(1e-4 * 0.9 ** 9)


def test_faster_rcnn_with_colora_resnet(tmp_path):
    from mmdet.registry import MODELS, OPTIM_WRAPPER_CONSTRUCTORS
    init_default_scope('mmdet')
    cfg = upstream_config('mmdet', '_base_/models/faster-rcnn_r50_fpn.py')
    sd = torchvision_resnet_state_dict(REDUCED_RESNET['stage_blocks'],
                                       REDUCED_RESNET['base_channels'], seed=0)
    path = save(sd, tmp_path / 'resnet50_narrow.pth')
    width = REDUCED_RESNET['base_channels']
    cfg.model.backbone.update(
        type='CoLoRAResNet', base_channels=width, adapter=dict(method='colora'),
        init_cfg=dict(type='Pretrained', checkpoint=path))
    cfg.model.neck.in_channels = [width * 4 * 2 ** i for i in range(4)]
    model = MODELS.build(cfg.model)
    model.init_weights()
    backbone = model.backbone
    assert type(backbone).__module__ == 'colora_mm.models.resnet_mmdet'
    assert backbone.pretrained_report.clean
    torch.testing.assert_close(backbone.layer2[1].conv3.weight, sd['layer2.1.conv3.weight'])
    # the config's frozen_stages=1 and norm_eval=True
    assert not backbone.layer1[0].conv1.adapter_branch.pair.A1.requires_grad
    assert backbone.layer2[0].conv1.adapter_branch.pair.A1.requires_grad
    model.train()
    assert not backbone.layer2[0].bn1.training
    model.eval()
    with torch.no_grad():
        feats = model.extract_feat(torch.randn(1, 3, 64, 64))
    assert len(feats) == 5 and feats[0].shape == (1, 256, 16, 16)

    constructor = OPTIM_WRAPPER_CONSTRUCTORS.build(dict(
        type='LayerDecayResNetOptimizerConstructor',
        optim_wrapper_cfg=dict(type='OptimWrapper', optimizer=dict(
            type='AdamW', lr=2e-4, weight_decay=0.05)),
        paramwise_cfg=dict(num_layers=16, decay_rate=0.99)))
    groups = constructor(model).optimizer.param_groups
    lrs = {n: g['lr'] for g in groups for n in g['param_names']}
    assert lrs['roi_head.bbox_head.fc_cls.weight'] == pytest.approx(2e-4)
    assert lrs['neck.fpn_convs.0.conv.weight'] == pytest.approx(2e-4)
    assert lrs['backbone.layer2.0.conv2.adapter_branch.down.weight'] == \
        pytest.approx(2e-4 * 0.99 ** (17 - 4))
