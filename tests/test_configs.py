"""Every shipped config: the paper's numbers (appendix F, Tables 2-4 and 8) read back
from the loaded config, and the model built at reduced width and run once. The configs
beyond the paper (per-stage settings, Swin Transformer) against the config they derive
from: the paper's ConvNeXt-B one, and upstream's Swin ones."""
import copy
import glob
import math
import os.path as osp
import re

import pytest
import torch

mmseg = pytest.importorskip('mmseg')
mmdet = pytest.importorskip('mmdet')

from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402

import colora_mm  # noqa: E402,F401
from colora_mm.adapters import (AdapterSpec, is_adapter_name,  # noqa: E402
                                iter_adapted_layers, norm_parameter_names,
                                reset_adapters_from_weights)
from data_gen import (TINY_CHANNELS,  # noqa: E402
                      tiny_model_overrides)

pytestmark = pytest.mark.usefixtures('fast_config_loading', 'one_thread')

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


#: Configs beyond the paper's set-ups, checked by their own tests below.
PER_STAGE = 'upernet_colora-per-stage_convnext_b_4xb4-160k_ade20k-512x512.py'
SWIN_ADE = {'colora': 'upernet_colora_swin-t_8xb2-160k_ade20k-512x512.py',
            'lora': 'upernet_lora_swin-t_8xb2-160k_ade20k-512x512.py'}
SWIN_COCO = {'colora': 'faster-rcnn_colora_swin-t_fpn_2xb8-1x_coco.py',
             'lora': 'faster-rcnn_lora_swin-t_fpn_2xb8-1x_coco.py'}
BEYOND = {PER_STAGE, *SWIN_ADE.values(), *SWIN_COCO.values()}
ADE = sorted(p for p in glob.glob(osp.join(ROOT, 'configs', 'ade20k', '*.py'))
             if osp.basename(p) not in BEYOND)
COCO = sorted(p for p in glob.glob(osp.join(ROOT, 'configs', 'coco', '*.py'))
              if osp.basename(p) not in BEYOND)
VTAB = sorted(glob.glob(osp.join(ROOT, 'configs', 'vtab1k', '*.py')))
ALIASES = {'colora_convnext_b.py': 'upernet_colora_convnext_b_4xb4-160k_ade20k-512x512.py'}

URLS = {
    'convnext_b': 'https://dl.fbaipublicfiles.com/convnext/convnext_base_22k_224.pth',
    'convnext_s': 'https://dl.fbaipublicfiles.com/convnext/convnext_small_22k_1k_384.pth',
    'r50': 'https://download.pytorch.org/models/resnet50-11ad3fa6.pth',
}
CHANNELS = {'convnext_b': [128, 256, 512, 1024], 'convnext_s': [96, 192, 384, 768],
            'r50': [256, 512, 1024, 2048]}
# Appendix Table 2, "Feature dim.": what the classifier sees after pooling.
FEATURE_DIM = {'r50': 2048, 'convnext_s': 768, 'convnext_b': 1024}
METHODS = {'colora': 'colora', 'full-ft': 'full', 'lora': 'lora', 'pissa': 'pissa',
           'hira': 'hira', 'conv-adapter': 'conv_adapter', 'bitfit': 'bitfit'}
GAMMA = {'colora': 16, 'lora': 20, 'pissa': 20, 'hira': 20, 'conv_adapter': 4}
TABLE8 = [(16, 0.5), (8, 0.8), (8, 0.5), (4, 0.8), (4, 0.5), (4, 0.4), (2, 0.9), (2, 0.8)]
# Adapted layers per residual block: CoLoRA a pair (2 layers) and the spatial conv;
# LoRA/PiSSA/HiRA both 1x1 layers; Conv-Adapter the spatial conv.
LAYERS_PER_BLOCK = {'colora': 3, 'lora': 2, 'pissa': 2, 'hira': 2, 'conv_adapter': 1,
                    'full': 0, 'bitfit': 0}

NAME = re.compile(r'^(?P<algo>upernet|faster-rcnn)_(?P<method>[a-z-]+?)'
                  r'(?:-g(?P<g>\d+)-sr(?P<sr>[\d.]+))?_(?P<bb>convnext_[bs]|r50)_'
                  r'(?:fpn_)?(?P<gpus>\d+)xb(?P<per_gpu>\d+)-')
VTAB_NAME = re.compile(r'^(?P<method>[a-z-]+?)_(?P<bb>convnext_[bs]|r50)_'
                       r'(?P<gpus>\d+)xb(?P<per_gpu>\d+)-(?P<epochs>\d+)e_vtab1k-'
                       r'(?P<size>\d+)x(?P=size)\.py$')


def parse_name(path):
    base = osp.basename(path)
    base = ALIASES.get(base, base)
    m = NAME.match(base) or VTAB_NAME.match(base)
    assert m, f'{base} does not follow the naming scheme'
    info = dict(m.groupdict())
    info.setdefault('algo', 'vtab1k')
    info.setdefault('g', None)
    info.setdefault('sr', None)
    info['method'] = METHODS[info['method']]
    return info


_LOADED = {}


def load(path):
    if path not in _LOADED:
        _LOADED[path] = Config.fromfile(path)
    return copy.deepcopy(_LOADED[path])


def test_the_set_of_configs_is_complete():
    ade = {osp.basename(p) for p in ADE}
    coco = {osp.basename(p) for p in COCO}
    for bb in ('convnext_b', 'convnext_s', 'r50'):
        for m in METHODS:
            assert f'upernet_{m}_{bb}_4xb4-160k_ade20k-512x512.py' in ade
    for g, sr in TABLE8:
        assert f'upernet_colora-g{g}-sr{sr}_convnext_b_4xb4-160k_ade20k-512x512.py' in ade
    assert 'colora_convnext_b.py' in ade
    for bb in ('convnext_s', 'r50'):
        for m in METHODS:
            assert f'faster-rcnn_{m}_{bb}_fpn_2xb8-1x_coco.py' in coco
    assert len(ade) == 3 * len(METHODS) + 8 + 1 and len(coco) == 2 * len(METHODS)
    shipped = {osp.basename(p) for sub in ('ade20k', 'coco')
               for p in glob.glob(osp.join(ROOT, 'configs', sub, '*.py'))}
    assert shipped == ade | coco | BEYOND
    vtab = {osp.basename(p) for p in VTAB}
    assert vtab == {f'{m}_{bb}_1xb32-100e_vtab1k-224x224.py' for m in METHODS
                    if m != 'bitfit' for bb in ('convnext_b', 'convnext_s', 'r50')}


def test_alias_is_the_main_convnext_b_config():
    alias = load(osp.join(ROOT, 'configs', 'ade20k', 'colora_convnext_b.py'))
    main = load(osp.join(ROOT, 'configs', 'ade20k', ALIASES['colora_convnext_b.py']))
    assert alias.model == main.model and alias.optim_wrapper == main.optim_wrapper


def _common(cfg):
    assert cfg.custom_imports == dict(imports=['colora_mm'], allow_failed_imports=False)
    assert [h.type for h in cfg.custom_hooks] == ['CoLoRAReportHook']
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
    assert cfg.optim_wrapper.loss_scale == 'dynamic'
    opt = cfg.optim_wrapper.optimizer
    assert opt.type == 'AdamW' and opt.weight_decay == 0.05


def _backbone(cfg, info):
    backbone = cfg.model.backbone
    bb = info['bb']
    assert backbone.init_cfg == dict(type='Pretrained', checkpoint=URLS[bb])
    if bb.startswith('convnext'):
        assert backbone.type == 'CoLoRAConvNeXt'
        assert backbone.arch == {'convnext_b': 'base', 'convnext_s': 'small'}[bb]
        assert tuple(backbone.out_indices) == (0, 1, 2, 3)
        assert backbone.layer_scale_init_value == 1.0
        assert backbone.gap_before_final_norm is False
        assert cfg.optim_wrapper.constructor == 'LearningRateDecayOptimizerConstructor'
        assert cfg.optim_wrapper.paramwise_cfg == dict(
            decay_rate=0.9, decay_type='stage_wise', num_layers=4)
    else:
        assert backbone.type == 'CoLoRAResNet'
        assert backbone.depth == 50 and backbone.get('deep_stem', False) is False
        assert backbone.get('stem_channels', 64) in (None, 64)
        assert backbone.style == 'pytorch'
        assert cfg.optim_wrapper.constructor == 'LayerDecayResNetOptimizerConstructor'
        assert cfg.optim_wrapper.paramwise_cfg == dict(num_layers=16, decay_rate=0.99)
    _adapter(backbone.adapter, info)


def _adapter(adapter, info):
    """The method's settings (appendix F): CoLoRA gamma 16 / share_ratio 0.5 (filter
    on, effective partners), PiSSA/HiRA/LoRA gamma 20, Conv-Adapter gamma 4."""
    method = info['method']
    assert adapter.method == method
    if method not in ('full', 'bitfit'):
        assert adapter.gamma == (int(info['g']) if info['g'] else GAMMA[method])
    if method == 'colora':
        assert adapter.share_ratio == (float(info['sr']) if info['sr'] else 0.5)
        assert adapter.use_filter is True
        assert adapter.partner_policy == 'effective'
        # ConvNeXt: spatial rank C // (2 gamma), the paper's #Param (appendix
        # Table 8's settings); ResNet: C // gamma
        if info['bb'].startswith('convnext'):
            assert adapter.spatial_gamma == 2 * adapter.gamma
        else:
            assert adapter.get('spatial_gamma') is None
        assert set(adapter) <= {'method', 'gamma', 'share_ratio', 'use_filter',
                                'partner_policy', 'spatial_gamma'}, adapter
    else:
        assert set(adapter) <= {'method', 'gamma'}, adapter
    AdapterSpec.from_dict(dict(adapter))   # valid spec


@pytest.mark.parametrize('path', ADE, ids=osp.basename)
def test_ade20k_config_numbers(path):
    cfg = load(path)
    info = parse_name(path)
    assert info['algo'] == 'upernet'
    assert cfg.default_scope == 'mmseg'
    _common(cfg)
    _backbone(cfg, info)
    # 160k iterations, evaluation and checkpoint every 16k.
    assert cfg.train_cfg.type == 'IterBasedTrainLoop'
    assert cfg.train_cfg.max_iters == 160000 and cfg.train_cfg.val_interval == 16000
    assert cfg.default_hooks.checkpoint.interval == 16000
    assert cfg.default_hooks.checkpoint.by_epoch is False
    # 16 images per iteration, as the name says (4 GPUs x 4).
    assert (info['gpus'], info['per_gpu']) == ('4', '4')
    assert cfg.train_dataloader.batch_size * int(info['gpus']) == 16
    # lr 1e-4, warmup 1500 iterations from 1e-6, then poly (power 1) to 0.
    assert cfg.optim_wrapper.optimizer.lr == 1e-4
    warmup, poly = cfg.param_scheduler
    assert (warmup.type, warmup.start_factor, warmup.begin, warmup.end,
            warmup.by_epoch) == ('LinearLR', 1e-6, 0, 1500, False)
    assert (poly.type, poly.power, poly.eta_min, poly.begin, poly.end,
            poly.by_epoch) == ('PolyLR', 1.0, 0.0, 1500, 160000, False)
    # UperNet on the four stages (CE 1.0), FCN on stage 3 (CE 0.4), 150 classes.
    model = cfg.model
    channels = CHANNELS[info['bb']]
    head, aux = model.decode_head, model.auxiliary_head
    assert head.type == 'UPerHead' and list(head.in_index) == [0, 1, 2, 3]
    assert list(head.in_channels) == channels
    assert (head.loss_decode.type, head.loss_decode.loss_weight,
            head.loss_decode.use_sigmoid) == ('CrossEntropyLoss', 1.0, False)
    assert aux.type == 'FCNHead' and aux.in_index == 2
    assert aux.in_channels == channels[2]
    assert (aux.loss_decode.type, aux.loss_decode.loss_weight) == ('CrossEntropyLoss', 0.4)
    assert head.num_classes == aux.num_classes == 150
    assert head.norm_cfg.type == aux.norm_cfg.type == 'SyncBN'
    if info['bb'] == 'r50':
        assert model.backbone.norm_cfg.type == 'SyncBN'
        assert model.get('pretrained') is None
    # ADE20K at 512x512 crops, reduce_zero_label.
    train = cfg.train_dataloader.dataset
    assert train.type == 'ADE20KDataset'
    crop = [t for t in train.pipeline if t.type == 'RandomCrop']
    assert crop and tuple(crop[0].crop_size) == (512, 512)
    assert tuple(model.data_preprocessor.size) == (512, 512)
    loads = [t for t in train.pipeline if t.type == 'LoadAnnotations']
    assert loads and loads[0].reduce_zero_label is True


@pytest.mark.parametrize('path', COCO, ids=osp.basename)
def test_coco_config_numbers(path):
    cfg = load(path)
    info = parse_name(path)
    assert info['algo'] == 'faster-rcnn'
    assert cfg.default_scope == 'mmdet'
    _common(cfg)
    _backbone(cfg, info)
    # 1x: 12 epochs, lr x0.1 after epochs 8 and 11, 500-iteration warmup.
    assert cfg.train_cfg.type == 'EpochBasedTrainLoop' and cfg.train_cfg.max_epochs == 12
    warmup, steps = cfg.param_scheduler
    assert (warmup.type, warmup.begin, warmup.end, warmup.by_epoch) == (
        'LinearLR', 0, 500, False)
    assert warmup.start_factor == 0.001
    assert (steps.type, list(steps.milestones), steps.gamma, steps.by_epoch,
            steps.end) == ('MultiStepLR', [8, 11], 0.1, True, 12)
    assert cfg.optim_wrapper.optimizer.lr == 2e-4
    # 16 images per iteration as 2 GPUs x 8.
    assert (info['gpus'], info['per_gpu']) == ('2', '8')
    assert cfg.train_dataloader.batch_size == 8
    assert cfg.auto_scale_lr.base_batch_size == 16
    model = cfg.model
    assert model.type == 'FasterRCNN' and model.neck.type == 'FPN'
    assert list(model.neck.in_channels) == CHANNELS[info['bb']]
    assert model.roi_head.bbox_head.num_classes == 80
    assert cfg.train_dataloader.dataset.type == 'CocoDataset'
    if info['bb'] == 'r50':   # upstream detection ResNet, but no stage frozen; BN eval
        assert model.backbone.frozen_stages == -1 and model.backbone.norm_eval is True


IMAGENET_MEAN = [123.675, 116.28, 103.53]
IMAGENET_STD = [58.395, 57.12, 57.375]


@pytest.mark.parametrize('path', VTAB, ids=osp.basename)
def test_vtab1k_config_numbers(path):
    """Appendix F ("Training configuration on VTAB-1k"), Tables 2-4."""
    cfg = load(path)
    info = parse_name(path)
    assert cfg.default_scope == 'mmpretrain'
    _common(cfg)
    model, backbone = cfg.model, cfg.model.backbone
    bb = info['bb']
    assert backbone.init_cfg == dict(type='Pretrained', checkpoint=URLS[bb])
    _adapter(backbone.adapter, info)
    AdapterSpec.from_dict(dict(backbone.adapter))
    # GAP, a normalisation, a linear classifier, cross-entropy.
    assert model.type == 'ImageClassifier'
    head = model.head
    assert head.type == 'LinearClsHead' and head.in_channels == FEATURE_DIM[bb]
    assert (head.loss.type, head.loss.loss_weight, head.loss.get('use_sigmoid', False)) \
        == ('CrossEntropyLoss', 1.0, False)
    assert tuple(backbone.out_indices) == (3, )
    if bb.startswith('convnext'):
        assert backbone.type == 'CoLoRAConvNeXt'
        assert backbone.arch == {'convnext_b': 'base', 'convnext_s': 'small'}[bb]
        # pooled first, then ConvNeXt's final LayerNorm: GAP -> norm inside the backbone
        assert backbone.gap_before_final_norm is True and model.neck is None
        assert backbone.drop_path_rate == 0.0
        # stage-wise decay, 4 stages x 0.9 (Table 4), mmseg's constructor
        assert cfg.optim_wrapper.constructor == \
            'mmseg.LearningRateDecayOptimizerConstructor'
        assert cfg.optim_wrapper.paramwise_cfg == dict(
            decay_rate=0.9, decay_type='stage_wise', num_layers=4)
    else:
        assert backbone.type == 'CoLoRAResNet' and backbone.depth == 50
        assert backbone.deep_stem is False and backbone.stem_channels == 64
        assert backbone.style == 'pytorch' and backbone.frozen_stages == -1
        assert backbone.norm_eval is False
        assert model.neck == dict(type='GAPNormNeck', in_channels=2048,
                                  norm_cfg=dict(type='LN'))
        # layer-wise decay, 16 blocks x 0.99 (Table 3)
        assert cfg.optim_wrapper.constructor == 'LayerDecayResNetOptimizerConstructor'
        assert cfg.optim_wrapper.paramwise_cfg == dict(num_layers=16, decay_rate=0.99)
    # batch 32 (one GPU x 32), 100 epochs, lr 1e-4
    assert (info['gpus'], info['per_gpu'], info['epochs'], info['size']) == (
        '1', '32', '100', '224')
    assert cfg.train_dataloader.batch_size == 32
    assert cfg.train_cfg == dict(by_epoch=True, max_epochs=100)
    assert cfg.optim_wrapper.optimizer.lr == 1e-4
    # warmup: 1500 iterations from 1e-6 x lr; then cosine to 1e-6 until the last of
    # the 100 epochs x ceil(1000 / 32) iterations
    warmup, cosine = cfg.param_scheduler
    assert (warmup.type, warmup.start_factor, warmup.begin, warmup.end,
            warmup.by_epoch) == ('LinearLR', 1e-6, 0, 1500, False)
    assert (cosine.type, cosine.eta_min, cosine.begin, cosine.end, cosine.by_epoch) == (
        'CosineAnnealingLR', 1e-6, 1500, 100 * math.ceil(1000 / 32), False)
    # VTAB-1k: train800val200 to train, test to report top-1; the default task
    # (Caltech101, 102 classes) in both loaders and the head; no validation loop.
    train, test = cfg.train_dataloader.dataset, cfg.test_dataloader.dataset
    assert (train.type, train.split, test.type, test.split) == (
        'VTAB1k', 'train800val200', 'VTAB1k', 'test')
    assert train.task == test.task == 'caltech101' and head.num_classes == 102
    assert train.data_root == test.data_root == 'data/vtab-1k'
    assert cfg.train_dataloader.sampler.shuffle is True
    assert cfg.test_evaluator == dict(type='Accuracy', topk=(1, ))
    assert cfg.get('val_cfg') is None and cfg.get('val_dataloader') is None
    # 224x224: resize and normalise, no augmentation
    for pipeline in (train.pipeline, test.pipeline):
        assert [t.type for t in pipeline] == ['LoadImageFromFile', 'Resize', 'PackInputs']
        resize = pipeline[1]
        assert tuple(resize.scale) == (224, 224) and resize.keep_ratio is False
    pre = model.data_preprocessor
    assert (pre.mean, pre.std, pre.to_rgb) == (IMAGENET_MEAN, IMAGENET_STD, True)
    # checkpoints every 10 epochs (what a stopped run resumes from)
    ckpt = cfg.default_hooks.checkpoint
    assert (ckpt.type, ckpt.by_epoch, ckpt.interval) == ('AtomicCheckpointHook', True, 10)


def _build_tiny(cfg):
    cfg.merge_from_dict(dict(model=tiny_model_overrides(cfg.model)))
    if cfg.default_scope == 'mmpretrain':   # the classifier at the backbone's width
        width = TINY_CHANNELS['convnext' if 'ConvNeXt' in cfg.model.backbone.type
                              else 'resnet'][-1]
        cfg.model.head.in_channels = width
        if cfg.model.get('neck'):
            cfg.model.neck.in_channels = width
    init_default_scope(cfg.default_scope)
    if cfg.default_scope == 'mmseg':
        from mmseg.registry import MODELS
    elif cfg.default_scope == 'mmpretrain':
        from mmpretrain.registry import MODELS
    else:
        from mmdet.registry import MODELS
    return MODELS.build(cfg.model)


@pytest.mark.parametrize('path', [p for p in ADE + COCO + VTAB
                                  if osp.basename(p) not in ALIASES], ids=osp.basename)
def test_config_builds_at_reduced_width(path):
    info = parse_name(path)
    cfg = load(path)
    model = _build_tiny(cfg)
    backbone = model.backbone
    method = info['method']
    # The right adapters, in every block.
    layers = dict(iter_adapted_layers(backbone))
    blocks = (4 if info['bb'].startswith('convnext') else 16)
    shortcuts = [n for n in layers if '.downsample.' in n]
    if info['bb'] == 'r50' and method in ('lora', 'pissa', 'hira'):
        # every 1x1 conv: the four stages' shortcut convolutions too
        assert sorted(shortcuts) == [f'layer{i}.0.downsample.0' for i in range(1, 5)]
    else:
        assert not shortcuts
    assert len(layers) == LAYERS_PER_BLOCK[method] * blocks + len(shortcuts)
    # The trainable set: everything for full fine-tuning, otherwise adapters, biases
    # and norms only (minus what a frozen stage freezes).
    frozen_prefixes = ()
    if cfg.model.backbone.get('frozen_stages', -1) >= 1:
        frozen_prefixes = ('conv1.', 'bn1.', 'norm1.', 'stem.', 'layer1.')
    norms = norm_parameter_names(backbone)
    for name, p in backbone.named_parameters():
        if name.startswith(frozen_prefixes):
            assert not p.requires_grad, name
            continue
        if method == 'full':
            assert p.requires_grad, name
        else:
            expected = (is_adapter_name(name) or name.endswith('.bias')
                        or name in norms)
            assert p.requires_grad == expected, name
    if method not in ('full', 'bitfit'):
        assert any(is_adapter_name(n) for n, _ in backbone.named_parameters())
    if method == 'bitfit':
        assert not any(is_adapter_name(n) for n, _ in backbone.named_parameters())
        assert any(p.requires_grad for p in backbone.parameters())
    if cfg.default_scope == 'mmpretrain':
        # The classifier: the neck's norm (ResNet) and the linear head train whole;
        # ConvNeXt's post-pooling norm is a backbone norm, trainable in every method.
        for name, p in model.named_parameters():
            if not name.startswith('backbone.'):
                assert p.requires_grad, name
        if info['bb'].startswith('convnext'):
            assert all(p.requires_grad for p in backbone.norm3.parameters())
        else:
            assert [n for n, _ in model.neck.named_parameters()] == [
                'norm.weight', 'norm.bias']
    # One forward pass at 32x32, in the state loading weights leaves the adapters in.
    reset_adapters_from_weights(backbone)
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        if cfg.default_scope == 'mmseg':
            out = model(x, mode='tensor')
            assert out.shape == (1, cfg.model.decode_head.num_classes, 8, 8)
            assert torch.isfinite(out).all()
        elif cfg.default_scope == 'mmpretrain':
            out = model(x, mode='tensor')
            assert out.shape == (1, cfg.model.head.num_classes)
            assert torch.isfinite(out).all()
        else:
            feats = model.extract_feat(x)
            assert len(feats) == 5 and all(torch.isfinite(f).all() for f in feats)


# ----------------------------------------------------------------- beyond the paper
def _ade(name):
    return osp.join(ROOT, 'configs', 'ade20k', name)


def _coco(name):
    return osp.join(ROOT, 'configs', 'coco', name)


def test_per_stage_config_is_the_main_one_with_overrides():
    cfg = load(_ade(PER_STAGE))
    main = load(_ade(ALIASES['colora_convnext_b.py']))
    overrides = cfg.model.backbone.adapter.pop('overrides')
    assert [dict(o) for o in overrides] == [
        dict(pattern='stages.3.*', gamma=8, spatial_gamma=16, share_ratio=0.8),
        dict(pattern='stages.0.*', method='none')]
    assert cfg.model == main.model
    assert cfg.optim_wrapper == main.optim_wrapper
    assert cfg.param_scheduler == main.param_scheduler
    assert cfg.train_cfg == main.train_cfg and cfg.custom_hooks == main.custom_hooks


def test_per_stage_config_builds_its_stages():
    """At reduced width (32-256 channels): no adapter in stage 0, gamma 16 in stages
    1-2, gamma 8 / share 0.8 in stage 3."""
    model = _build_tiny(load(_ade(PER_STAGE)))
    layers = dict(iter_adapted_layers(model.backbone))
    assert not any(n.startswith('stages.0.') for n in layers)
    assert len(layers) == 3 * 3
    for i, c in ((1, 64), (2, 128), (3, 256)):
        pair = layers[f'stages.{i}.0.pointwise_conv1'].adapter_branch.get_pair()
        gamma, share, spatial_gamma = (8, 0.8, 16) if i == 3 else (16, 0.5, 32)
        assert (pair.r, pair.rs) == (c // gamma, int(c // gamma * share)), i
        assert layers[f'stages.{i}.0.depthwise_conv'].adapter_branch.rank == \
            c // spatial_gamma


def _upstream_cfg(tmp_path, base):
    """The upstream config ``base`` (``mmseg::...``/``mmdet::...``) loaded as it is."""
    path = tmp_path / 'upstream.py'
    path.write_text(f'_base_ = {base!r}\n')
    return Config.fromfile(str(path))


@pytest.mark.parametrize('method', ['colora', 'lora'])
def test_swin_ade20k_configs_follow_upstream(tmp_path, method):
    cfg = load(_ade(SWIN_ADE[method]))
    up = _upstream_cfg(tmp_path, 'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_'
                                 'upernet_8xb2-160k_ade20k-512x512.py')
    assert cfg.default_scope == 'mmseg'
    assert cfg.custom_imports == dict(imports=['colora_mm'], allow_failed_imports=False)
    assert [h.type for h in cfg.custom_hooks] == ['CoLoRAReportHook']
    backbone = cfg.model.backbone.to_dict()
    adapter = backbone.pop('adapter')
    assert backbone.pop('type') == 'CoLoRASwin'
    expected = up.model.backbone.to_dict()
    expected.pop('type')
    assert backbone == expected      # Swin-T, upstream's checkpoint, drop-path 0.3
    assert 'swin_tiny_patch4_window7_224' in backbone['init_cfg']['checkpoint']
    if method == 'colora':
        assert adapter == dict(method='colora', gamma=16, share_ratio=0.5,
                               partner_policy='effective')
    else:
        assert adapter == dict(method='lora', gamma=20)
    # everything else is upstream's: heads, data, AdamW 6e-5 / 0.01 with no decay on
    # position tables and norms, warmup + poly, 160k iterations, 8 GPUs x 2 images
    for key in ('optim_wrapper', 'param_scheduler', 'train_cfg', 'train_dataloader',
                'val_dataloader'):
        assert cfg[key] == up[key], key
    # upstream's hooks, the checkpoint written atomically with upstream's settings
    hooks, up_hooks = copy.deepcopy(cfg.default_hooks), copy.deepcopy(up.default_hooks)
    assert hooks.checkpoint.pop('type') == 'AtomicCheckpointHook'
    assert up_hooks.checkpoint.pop('type') == 'CheckpointHook'
    assert hooks == up_hooks
    for key in ('decode_head', 'auxiliary_head', 'data_preprocessor', 'test_cfg'):
        assert cfg.model[key] == up.model[key], key
    assert cfg.optim_wrapper.optimizer.lr == 6e-5
    assert set(cfg.optim_wrapper.paramwise_cfg.custom_keys) == {
        'absolute_pos_embed', 'relative_position_bias_table', 'norm'}
    assert cfg.train_cfg.max_iters == 160000 and cfg.train_dataloader.batch_size == 2


@pytest.mark.parametrize('method', ['colora', 'lora'])
def test_swin_coco_configs(method):
    cfg = load(_coco(SWIN_COCO[method]))
    paper = load(_coco('faster-rcnn_colora_convnext_s_fpn_2xb8-1x_coco.py'))
    assert cfg.default_scope == 'mmdet'
    backbone = cfg.model.backbone
    assert backbone.type == 'CoLoRASwin'
    assert (backbone.embed_dims, list(backbone.depths), list(backbone.num_heads),
            backbone.window_size, backbone.drop_path_rate) == (
        96, [2, 2, 6, 2], [3, 6, 12, 24], 7, 0.2)
    assert tuple(backbone.out_indices) == (0, 1, 2, 3)
    assert backbone.init_cfg.checkpoint == (
        'https://github.com/SwinTransformer/storage/releases/download/v1.0.0/'
        'swin_tiny_patch4_window7_224.pth')
    assert list(cfg.model.neck.in_channels) == [96, 192, 384, 768]
    assert backbone.adapter.method == method
    # mmdet's Swin-T detection optimiser: AdamW 1e-4, weight decay 0.05, no decay on
    # position tables and norms, no layer-wise decay; 1000-iteration warmup
    opt = cfg.optim_wrapper
    assert opt.type == 'AmpOptimWrapper' and 'constructor' not in opt
    assert (opt.optimizer.type, opt.optimizer.lr, opt.optimizer.weight_decay) == (
        'AdamW', 1e-4, 0.05)
    assert opt.paramwise_cfg.custom_keys == {
        'absolute_pos_embed': dict(decay_mult=0.),
        'relative_position_bias_table': dict(decay_mult=0.),
        'norm': dict(decay_mult=0.)}
    warmup, steps = cfg.param_scheduler
    assert (warmup.type, warmup.start_factor, warmup.end) == ('LinearLR', 0.001, 1000)
    assert list(steps.milestones) == [8, 11] and cfg.train_cfg.max_epochs == 12
    # the detector, data and batch are the paper set-up's
    for key in ('rpn_head', 'roi_head', 'train_cfg', 'test_cfg', 'data_preprocessor'):
        assert cfg.model[key] == paper.model[key], key
    assert cfg.train_dataloader == paper.train_dataloader


@pytest.mark.parametrize('path', [_ade(PER_STAGE), *map(_ade, SWIN_ADE.values()),
                                  *map(_coco, SWIN_COCO.values())], ids=osp.basename)
def test_beyond_configs_build_and_run_at_reduced_width(path):
    cfg = load(path)
    model = _build_tiny(cfg)
    backbone = model.backbone
    layers = dict(iter_adapted_layers(backbone))
    assert layers
    norms = norm_parameter_names(backbone)
    for name, p in backbone.named_parameters():
        assert p.requires_grad == (is_adapter_name(name) or name.endswith('.bias')
                                   or name in norms), name
    reset_adapters_from_weights(backbone)
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        if cfg.default_scope == 'mmseg':
            out = model(x, mode='tensor')
            assert out.shape == (1, cfg.model.decode_head.num_classes, 16, 16)
            assert torch.isfinite(out).all()
        else:
            feats = model.extract_feat(x)
            assert len(feats) == 5 and all(torch.isfinite(f).all() for f in feats)
