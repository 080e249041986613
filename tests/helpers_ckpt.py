"""Synthetic pretrained checkpoints in the layouts colora_mm loads: the real models' key
names and shapes, random values (seeded), so that tests can check that every tensor
lands where it belongs without downloading anything.

* :func:`convnext_original_checkpoint`: the original ConvNeXt release, ``{'model': sd}``
  (``downsample_layers.i.j``, ``stages.i.j.dwconv|norm|pwconv1|pwconv2|gamma``, ``norm``,
  ``head``): the files at the CoLoRA paper's ConvNeXt-S/B URLs.
* :func:`torchvision_resnet_state_dict`: torchvision's ResNet (``conv1``, ``bn1``,
  ``layer{s}.{b}.conv1..bn3``, ``downsample.0/1``, ``fc``): ResNet-50 v2 by default.
* :func:`mmpretrain_convnext_checkpoint`, :func:`openmmlab_resnet_checkpoint`:
  OpenMMLab checkpoints (``{'meta', 'state_dict'}``, keys behind ``backbone.``, a
  classifier ``head.fc``), built from the upstream modules themselves.

* :func:`trained_checkpoint`: a colora_mm config's model as training leaves it
  (adapters moved away from their initial values), saved as mmengine's runner does,
  with ``meta['dataset_meta']``.

* :func:`swin_original_checkpoint`: the original Swin Transformer release,
  ``{'model': sd}`` (``patch_embed.proj``, ``layers.i.blocks.j.norm1|attn|norm2|mlp``,
  stored ``attn_mask`` buffers of the shifted blocks, ``layers.i.downsample``, ``norm``,
  ``head``): the files mmdet's Swin configs point at.
* :func:`openmmlab_swin_checkpoint`: mmseg's/mmdet's ``SwinTransformer`` names, bare
  (as mmseg's converted Swin weights) or as a model checkpoint behind ``backbone.``.

Architectures: ``'tiny'``, ``'small'``, ``'base'`` (ConvNeXt's real ones) and
:data:`REDUCED_CONVNEXT`, a few-block narrow variant for fast tests; Swin-T
(:data:`SWIN_T`) and :data:`REDUCED_SWIN`.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Optional, Sequence, Union

import torch

CONVNEXT_ARCHS = {
    'tiny': dict(depths=[3, 3, 9, 3], channels=[96, 192, 384, 768]),
    'small': dict(depths=[3, 3, 27, 3], channels=[96, 192, 384, 768]),
    'base': dict(depths=[3, 3, 27, 3], channels=[128, 256, 512, 1024]),
}
#: Few blocks, narrow: gamma=16 still gives every layer a rank >= 2.
REDUCED_CONVNEXT = dict(depths=[1, 1, 3, 1], channels=[32, 64, 128, 256])
#: ResNet-50, and a narrow ResNet-50 (same 16 blocks, a quarter of the width) for fast
#: tests: ``ResNet(depth=50, base_channels=16, stem_channels=16)`` upstream.
RESNET50 = dict(stage_blocks=(3, 4, 6, 3), base_channels=64)
REDUCED_RESNET = dict(stage_blocks=(3, 4, 6, 3), base_channels=16)

ArchLike = Union[str, Dict]


def convnext_arch(arch: ArchLike) -> Dict:
    if isinstance(arch, str):
        return CONVNEXT_ARCHS[arch]
    return dict(arch)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randomize(shapes: Dict[str, Sequence[int]], seed: int = 0) -> 'OrderedDict':
    """Random tensors of the given shapes; BatchNorm statistics stay valid (positive
    variance, integer counters)."""
    g = _generator(seed)
    out = OrderedDict()
    for key, shape in shapes.items():
        if key.endswith('num_batches_tracked'):
            out[key] = torch.tensor(1000, dtype=torch.long)
        elif key.endswith('running_var'):
            out[key] = torch.rand(shape, generator=g) + 0.5
        else:
            out[key] = torch.randn(shape, generator=g) * 0.1
    return out


def randomize_like(state_dict: Dict[str, torch.Tensor], seed: int = 0) -> 'OrderedDict':
    return randomize({k: tuple(v.shape) for k, v in state_dict.items()}, seed)


# ---------------------------------------------------------------- ConvNeXt
def convnext_original_shapes(arch: ArchLike = 'small', num_classes: int = 1000,
                             in_channels: int = 3) -> 'OrderedDict':
    """Key -> shape of the original ConvNeXt release (facebookresearch/ConvNeXt)."""
    a = convnext_arch(arch)
    depths, dims = a['depths'], a['channels']
    s = OrderedDict()
    s['downsample_layers.0.0.weight'] = (dims[0], in_channels, 4, 4)
    s['downsample_layers.0.0.bias'] = (dims[0],)
    s['downsample_layers.0.1.weight'] = (dims[0],)
    s['downsample_layers.0.1.bias'] = (dims[0],)
    for i in range(1, len(dims)):
        s[f'downsample_layers.{i}.0.weight'] = (dims[i - 1],)
        s[f'downsample_layers.{i}.0.bias'] = (dims[i - 1],)
        s[f'downsample_layers.{i}.1.weight'] = (dims[i], dims[i - 1], 2, 2)
        s[f'downsample_layers.{i}.1.bias'] = (dims[i],)
    for i, (depth, c) in enumerate(zip(depths, dims)):
        for j in range(depth):
            p = f'stages.{i}.{j}'
            s[f'{p}.gamma'] = (c,)
            s[f'{p}.dwconv.weight'] = (c, 1, 7, 7)
            s[f'{p}.dwconv.bias'] = (c,)
            s[f'{p}.norm.weight'] = (c,)
            s[f'{p}.norm.bias'] = (c,)
            s[f'{p}.pwconv1.weight'] = (4 * c, c)
            s[f'{p}.pwconv1.bias'] = (4 * c,)
            s[f'{p}.pwconv2.weight'] = (c, 4 * c)
            s[f'{p}.pwconv2.bias'] = (c,)
    s['norm.weight'] = (dims[-1],)
    s['norm.bias'] = (dims[-1],)
    s['head.weight'] = (num_classes, dims[-1])
    s['head.bias'] = (num_classes,)
    return s


def convnext_original_checkpoint(arch: ArchLike = 'small', num_classes: int = 1000,
                                 seed: int = 0) -> Dict:
    """``{'model': state_dict}`` as in ``convnext_small_22k_1k_384.pth`` (1000 classes)
    or ``convnext_base_22k_224.pth`` (``num_classes=21841``)."""
    return {'model': randomize(convnext_original_shapes(arch, num_classes), seed)}


def mmpretrain_convnext_checkpoint(arch: ArchLike = 'small', num_classes: int = 1000,
                                   seed: int = 0, prefix: str = 'backbone.',
                                   wrap: bool = True) -> Dict:
    """An mmpretrain ImageClassifier checkpoint: ``{'meta', 'state_dict'}`` with the
    backbone under ``prefix`` (``norm3`` as the final norm) and ``head.fc``."""
    from mmpretrain.models.backbones import ConvNeXt
    backbone = ConvNeXt(arch=convnext_arch(arch) if not isinstance(arch, str) else arch)
    sd = randomize_like(backbone.state_dict(), seed)
    out = OrderedDict((prefix + k, v) for k, v in sd.items())
    c = convnext_arch(arch)['channels'][-1]
    head = randomize({'head.fc.weight': (num_classes, c), 'head.fc.bias': (num_classes,)},
                     seed + 1)
    out.update(head)
    if not wrap:
        return out
    return {'meta': dict(mmpretrain_version='1.2.0', epoch=300), 'state_dict': out}


# ---------------------------------------------------------------- ResNet
def torchvision_resnet_shapes(stage_blocks: Sequence[int] = (3, 4, 6, 3),
                              base_channels: int = 64, num_classes: int = 1000,
                              in_channels: int = 3,
                              with_num_batches_tracked: bool = False) -> 'OrderedDict':
    """Key -> shape of torchvision's Bottleneck ResNet (ResNet-50 by default)."""
    s = OrderedDict()

    def bn(name, c):
        s[f'{name}.weight'] = (c,)
        s[f'{name}.bias'] = (c,)
        s[f'{name}.running_mean'] = (c,)
        s[f'{name}.running_var'] = (c,)
        if with_num_batches_tracked:
            s[f'{name}.num_batches_tracked'] = ()

    s['conv1.weight'] = (base_channels, in_channels, 7, 7)
    bn('bn1', base_channels)
    inplanes = base_channels
    for i, blocks in enumerate(stage_blocks):
        planes = base_channels * 2 ** i
        for b in range(blocks):
            p = f'layer{i + 1}.{b}'
            s[f'{p}.conv1.weight'] = (planes, inplanes, 1, 1)
            bn(f'{p}.bn1', planes)
            s[f'{p}.conv2.weight'] = (planes, planes, 3, 3)
            bn(f'{p}.bn2', planes)
            s[f'{p}.conv3.weight'] = (planes * 4, planes, 1, 1)
            bn(f'{p}.bn3', planes * 4)
            if b == 0:
                s[f'{p}.downsample.0.weight'] = (planes * 4, inplanes, 1, 1)
                bn(f'{p}.downsample.1', planes * 4)
            inplanes = planes * 4
    s['fc.weight'] = (num_classes, inplanes)
    s['fc.bias'] = (num_classes,)
    return s


def torchvision_resnet_state_dict(stage_blocks: Sequence[int] = (3, 4, 6, 3),
                                  base_channels: int = 64, num_classes: int = 1000,
                                  seed: int = 0,
                                  with_num_batches_tracked: bool = False) -> 'OrderedDict':
    """A plain state dict, as ``resnet50-11ad3fa6.pth`` (IMAGENET1K_V2) is saved."""
    return randomize(torchvision_resnet_shapes(
        stage_blocks, base_channels, num_classes,
        with_num_batches_tracked=with_num_batches_tracked), seed)


def openmmlab_resnet_checkpoint(codebase: str = 'mmseg', seed: int = 0,
                                prefix: Optional[str] = 'backbone.', wrap: bool = True,
                                **resnet_kwargs) -> Dict:
    """A checkpoint of mmseg's or mmdet's ResNet (``depth=50`` unless given), keys
    behind ``prefix``, wrapped in ``{'meta', 'state_dict'}``."""
    if codebase == 'mmseg':
        from mmseg.models.backbones import ResNet
    else:
        from mmdet.models.backbones import ResNet
    resnet_kwargs.setdefault('depth', 50)
    sd = randomize_like(ResNet(**resnet_kwargs).state_dict(), seed)
    out = OrderedDict(((prefix or '') + k, v) for k, v in sd.items())
    if not wrap:
        return out
    return {'meta': dict(mmengine_version='0.10.7'), 'state_dict': out}


# ---------------------------------------------------------------- Swin
SWIN_T = dict(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
              window_size=7)
#: Two blocks a stage (plain and shifted window), narrow, window 4.
REDUCED_SWIN = dict(embed_dims=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
                    window_size=4)


def relative_position_index(window: int) -> torch.Tensor:
    """The Swin paper's relative position index of a ``window x window`` window:
    ``(dy + w - 1) * (2w - 1) + (dx + w - 1)`` for every pair of positions."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing='ij')
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + window - 1
    dx = xs[:, None] - xs[None, :] + window - 1
    return dy * (2 * window - 1) + dx


def swin_original_shapes(arch: Dict = SWIN_T, num_classes: int = 1000,
                         img_size: int = 224, in_channels: int = 3) -> 'OrderedDict':
    """Key -> shape of the original Swin Transformer release (microsoft/Swin-Transformer,
    patch size 4, MLP ratio 4). A stage whose resolution is at most the window uses one
    window without shift, as the release does (no stored attention mask)."""
    c0, window = arch['embed_dims'], arch['window_size']
    s = OrderedDict()
    s['patch_embed.proj.weight'] = (c0, in_channels, 4, 4)
    s['patch_embed.proj.bias'] = (c0,)
    s['patch_embed.norm.weight'] = (c0,)
    s['patch_embed.norm.bias'] = (c0,)
    res = img_size // 4
    last = len(arch['depths']) - 1
    for i, (depth, heads) in enumerate(zip(arch['depths'], arch['num_heads'])):
        c = c0 * 2 ** i
        ws = min(window, res)
        for j in range(depth):
            p = f'layers.{i}.blocks.{j}'
            s[f'{p}.norm1.weight'] = (c,)
            s[f'{p}.norm1.bias'] = (c,)
            s[f'{p}.attn.relative_position_bias_table'] = ((2 * ws - 1) ** 2, heads)
            s[f'{p}.attn.relative_position_index'] = (ws * ws, ws * ws)
            s[f'{p}.attn.qkv.weight'] = (3 * c, c)
            s[f'{p}.attn.qkv.bias'] = (3 * c,)
            s[f'{p}.attn.proj.weight'] = (c, c)
            s[f'{p}.attn.proj.bias'] = (c,)
            s[f'{p}.norm2.weight'] = (c,)
            s[f'{p}.norm2.bias'] = (c,)
            s[f'{p}.mlp.fc1.weight'] = (4 * c, c)
            s[f'{p}.mlp.fc1.bias'] = (4 * c,)
            s[f'{p}.mlp.fc2.weight'] = (c, 4 * c)
            s[f'{p}.mlp.fc2.bias'] = (c,)
            if j % 2 and res > window:
                s[f'{p}.attn_mask'] = ((res // ws) ** 2, ws * ws, ws * ws)
        if i < last:
            s[f'layers.{i}.downsample.reduction.weight'] = (2 * c, 4 * c)
            s[f'layers.{i}.downsample.norm.weight'] = (4 * c,)
            s[f'layers.{i}.downsample.norm.bias'] = (4 * c,)
            res //= 2
    c = c0 * 2 ** last
    s['norm.weight'] = (c,)
    s['norm.bias'] = (c,)
    s['head.weight'] = (num_classes, c)
    s['head.bias'] = (num_classes,)
    return s


def _swin_indices(sd: 'OrderedDict') -> 'OrderedDict':
    """Real (integer) relative position indices in place of random values."""
    for key, value in sd.items():
        if key.endswith('relative_position_index'):
            sd[key] = relative_position_index(int(round(value.shape[0] ** 0.5)))
    return sd


def swin_original_checkpoint(arch: Dict = SWIN_T, num_classes: int = 1000,
                             img_size: int = 224, seed: int = 0) -> Dict:
    """``{'model': state_dict}`` as ``swin_tiny_patch4_window7_224.pth``."""
    shapes = swin_original_shapes(arch, num_classes, img_size)
    return {'model': _swin_indices(randomize(shapes, seed))}


def openmmlab_swin_checkpoint(arch: Dict = SWIN_T, codebase: str = 'mmseg', seed: int = 0,
                              prefix: str = '', final_norm: bool = True,
                              wrap: bool = False) -> Dict:
    """mmseg's/mmdet's ``SwinTransformer`` names: bare with the classifier's final
    ``norm`` (mmseg's converted Swin weights, ``swin_tiny_patch4_window7_224_20220317-
    1cdeb081.pth``), or a model checkpoint (``prefix='backbone.'``, ``wrap=True``)."""
    if codebase == 'mmseg':
        from mmseg.models.backbones import SwinTransformer
    else:
        from mmdet.models.backbones import SwinTransformer
    model = SwinTransformer(**arch)
    own = model.state_dict()
    sd = randomize_like(own, seed)
    for key, value in own.items():
        if not value.is_floating_point():
            sd[key] = value.clone()
    if final_norm:
        sd = OrderedDict((k, v) for k, v in sd.items() if not k.startswith('norm'))
        c = arch['embed_dims'] * 2 ** (len(arch['depths']) - 1)
        sd.update(randomize({'norm.weight': (c,), 'norm.bias': (c,)}, seed + 1))
    out = OrderedDict((prefix + k, v) for k, v in sd.items())
    if not wrap:
        return out
    return {'meta': dict(mmengine_version='0.10.7'), 'state_dict': out}


def save(obj, path) -> str:
    """``torch.save`` and return the path as a string (for ``init_cfg``)."""
    torch.save(obj, str(path))
    return str(path)


# ---------------------------------------------------------------- trained models
def trained_checkpoint(config: str, path, seed: int = 0, dataset_meta: bool = True):
    """Build ``config``'s model, move its adapters and biases away from their initial
    values (a forward in training mode moves CoLoRA's partners), and save it as
    mmengine's runner does: ``{'meta': {'iter', 'dataset_meta'}, 'state_dict'}``, the
    class names taken from the config's training set (``dataset_meta=False``: none).
    Returns the model, in eval mode."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    from colora_mm.adapters import is_adapter_name
    cfg = Config.fromfile(config)
    init_default_scope(cfg.default_scope)
    if cfg.default_scope == 'mmseg':
        from mmseg.registry import DATASETS, MODELS
    else:
        from mmdet.registry import DATASETS, MODELS
    model = MODELS.build(cfg.model)
    model.init_weights()
    generator = _generator(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter_name(name) or name.endswith('.bias'):
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    model.train()
    model.extract_feat(torch.randn(2, 3, 64, 64, generator=generator))  # partners move
    meta = dict(iter=1)
    if dataset_meta:   # the config's classes, else its dataset class's
        dataset = cfg.train_dataloader.dataset
        classes = (dataset.get('metainfo') or {}).get('classes') or \
            DATASETS.get(dataset.type).METAINFO['classes']
        meta['dataset_meta'] = dict(classes=tuple(classes))
    torch.save(dict(meta=meta, state_dict=model.state_dict()), path)
    return model.eval()
