"""Synthetic datasets in the real ADE20K and COCO folder layouts, and tiny overrides
that make the shipped configs run on them in seconds on a CPU.

Reusable outside the test-suite::

    from data_gen import make_ade20k, make_coco, write_tiny_config
    root = make_ade20k('/tmp/ade')            # images/ + annotations/, ADE conventions
    cfg = write_tiny_config('configs/ade20k/colora_convnext_b.py', '/tmp/tiny.py',
                            data_root=root)
    # python tools/train.py /tmp/tiny.py --work-dir /tmp/wd

Images are drawn from their labels (every class has its own colour, plus noise), so a
model can learn something in a few iterations and the metrics are not all zero.
"""
from __future__ import annotations

import contextlib
import json
import os
import os.path as osp
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

#: The ADE20K classes used by the tiny segmentation set-up: the first four of
#: ADE20KDataset's 150, so that ``metainfo=dict(classes=...)`` is a valid subset.
ADE_CLASSES = ('wall', 'building', 'sky', 'floor')
#: COCO category names (and ids) of the tiny detection set-up, as in COCO itself.
COCO_CATEGORIES = ((1, 'person'), (3, 'car'), (18, 'dog'))

_PALETTE = np.array([[40, 40, 40], [200, 60, 60], [60, 200, 60], [60, 60, 200],
                     [200, 200, 60], [60, 200, 200], [200, 60, 200]], dtype=np.float32)


def _image_from_labels(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    img = _PALETTE[labels % len(_PALETTE)]
    img = img + rng.normal(0.0, 12.0, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _random_label_map(height: int, width: int, num_labels: int,
                      rng: np.random.Generator) -> np.ndarray:
    """Axis-aligned rectangles of labels 0..num_labels-1 on a label-0 background."""
    labels = np.zeros((height, width), dtype=np.uint8)
    for value in range(1, num_labels):
        for _ in range(2):
            h = int(rng.integers(height // 4, height // 2 + 1))
            w = int(rng.integers(width // 4, width // 2 + 1))
            y = int(rng.integers(0, height - h + 1))
            x = int(rng.integers(0, width - w + 1))
            labels[y:y + h, x:x + w] = value
    return labels


def make_ade20k(root: str, num_train: int = 4, num_val: int = 2,
                size: Tuple[int, int] = (64, 64), num_classes: int = len(ADE_CLASSES),
                seed: int = 0) -> str:
    """Write an ADE20K-layout dataset (``ADEChallengeData2016``) under ``root``.

    Layout and conventions as mmseg's ``ADE20KDataset`` expects them:
    ``images/{training,validation}/ADE_{train,val}_%08d.jpg`` and
    ``annotations/{training,validation}/ADE_{train,val}_%08d.png``, single-channel
    label maps where 0 is "other" (``reduce_zero_label=True`` maps it to 255, ignored)
    and ``k`` is class ``k - 1``.

    Args:
        root (str): Output folder (created).
        num_train (int): Training images. Defaults to 4.
        num_val (int): Validation images. Defaults to 2.
        size (tuple[int, int]): ``(height, width)``. Defaults to (64, 64).
        num_classes (int): Classes present besides "other". Defaults to 4.
        seed (int): Random seed. Defaults to 0.

    Returns:
        str: ``root``.
    """
    rng = np.random.default_rng(seed)
    height, width = size
    for split, tag, count in (('training', 'train', num_train),
                              ('validation', 'val', num_val)):
        img_dir = osp.join(root, 'images', split)
        ann_dir = osp.join(root, 'annotations', split)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(ann_dir, exist_ok=True)
        for i in range(1, count + 1):
            labels = _random_label_map(height, width, num_classes + 1, rng)
            name = f'ADE_{tag}_{i:08d}'
            Image.fromarray(_image_from_labels(labels, rng)).save(
                osp.join(img_dir, name + '.jpg'), quality=95)
            Image.fromarray(labels).save(osp.join(ann_dir, name + '.png'))
    return root


def make_coco(root: str, num_train: int = 4, num_val: int = 2,
              size: Tuple[int, int] = (64, 96),
              categories: Sequence[Tuple[int, str]] = COCO_CATEGORIES,
              boxes_per_image: int = 3, seed: int = 0) -> str:
    """Write a COCO-layout detection dataset under ``root``.

    ``annotations/instances_{train,val}2017.json`` (COCO json: ``images``,
    ``annotations`` with ``bbox`` as ``[x, y, w, h]``, ``area``, ``iscrowd``,
    ``categories``) and ``{train,val}2017/%012d.jpg``. Every box is a filled
    rectangle of its category's colour.

    Args:
        root (str): Output folder (created).
        num_train (int): Training images. Defaults to 4.
        num_val (int): Validation images. Defaults to 2.
        size (tuple[int, int]): ``(height, width)``; keep both >= 32, mmdet's COCO
            configs drop smaller images. Defaults to (64, 96).
        categories (sequence): ``(id, name)`` pairs. Defaults to person, car, dog.
        boxes_per_image (int): Objects per image. Defaults to 3.
        seed (int): Random seed. Defaults to 0.

    Returns:
        str: ``root``.
    """
    rng = np.random.default_rng(seed)
    height, width = size
    os.makedirs(osp.join(root, 'annotations'), exist_ok=True)
    next_image_id, next_ann_id = 1, 1
    for split, count in (('train2017', num_train), ('val2017', num_val)):
        img_dir = osp.join(root, split)
        os.makedirs(img_dir, exist_ok=True)
        images: List[Dict] = []
        annotations: List[Dict] = []
        for _ in range(count):
            image_id = next_image_id
            next_image_id += 1
            labels = np.zeros((height, width), dtype=np.uint8)
            for k in range(boxes_per_image):
                index = k % len(categories)
                h = int(rng.integers(max(8, height // 4), height // 2 + 1))
                w = int(rng.integers(max(8, width // 4), width // 2 + 1))
                y = int(rng.integers(0, height - h + 1))
                x = int(rng.integers(0, width - w + 1))
                labels[y:y + h, x:x + w] = index + 1
                annotations.append(dict(
                    id=next_ann_id, image_id=image_id,
                    category_id=int(categories[index][0]),
                    bbox=[float(x), float(y), float(w), float(h)],
                    area=float(w * h), iscrowd=0, segmentation=[]))
                next_ann_id += 1
            file_name = f'{image_id:012d}.jpg'
            Image.fromarray(_image_from_labels(labels, rng)).save(
                osp.join(img_dir, file_name), quality=95)
            images.append(dict(id=image_id, file_name=file_name, height=height,
                               width=width))
        coco = dict(images=images, annotations=annotations,
                    categories=[dict(id=int(i), name=n, supercategory='thing')
                                for i, n in categories])
        with open(osp.join(root, 'annotations', f'instances_{split}.json'), 'w') as f:
            json.dump(coco, f)
    return root


# ---------------------------------------------------------------- tiny configs
@contextlib.contextmanager
def memoized_upstream_lookup():
    """Within the block, resolve each ``mmseg::``/``mmdet::`` base once.

    mmengine 0.10.7 answers every such reference by reading all of the package's
    metafiles (about 0.5 s, several times per config load); the answer cannot change
    within a test session."""
    import mmengine.config.config as config_module
    original = config_module._get_external_cfg_path
    cache = {}

    def memoized(package_path, cfg_file):
        key = (package_path, cfg_file)
        if key not in cache:
            try:
                cache[key] = (original(package_path, cfg_file), None)
            except ValueError as err:
                cache[key] = (None, err)
        result, err = cache[key]
        if err is not None:
            raise err
        return result

    config_module._get_external_cfg_path = memoized
    try:
        yield
    finally:
        config_module._get_external_cfg_path = original



#: ConvNeXt shrunk to one block per stage.
TINY_CONVNEXT_ARCH = dict(depths=[1, 1, 1, 1], channels=[32, 64, 128, 256])
#: ResNet-50 (all 16 bottlenecks, so layer-wise decay keeps its meaning) at half
#: width: the narrowest whose 1x1 layers still give LoRA/PiSSA/HiRA (gamma 20) rank 1.
TINY_RESNET = dict(stem_channels=32, base_channels=32)
#: Swin with two blocks per stage (one plain, one shifted window) at a third of
#: Swin-T's width, window 4 (64x64 crops give 16x16 tokens in the first stage).
TINY_SWIN = dict(embed_dims=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8],
                 window_size=4)
TINY_CHANNELS = {'convnext': [32, 64, 128, 256], 'resnet': [128, 256, 512, 1024],
                 'swin': [32, 64, 128, 256]}


def tiny_model_overrides(model: dict) -> dict:
    """Overrides (to merge into ``cfg.model``) shrinking a shipped config's model:
    tiny backbone without pretrained weights, BN instead of SyncBN, narrow heads.
    ``model`` is the loaded config's model dict (used to tell the cases apart)."""
    bn = dict(type='BN', requires_grad=True)
    backbone = dict(init_cfg=None)
    if 'ConvNeXt' in model['backbone']['type']:
        backbone.update(arch=dict(_delete_=True, **TINY_CONVNEXT_ARCH),
                        drop_path_rate=0.0)
        channels = TINY_CHANNELS['convnext']
    elif 'Swin' in model['backbone']['type']:
        backbone.update(TINY_SWIN, drop_path_rate=0.0)
        channels = TINY_CHANNELS['swin']
    else:
        channels = TINY_CHANNELS['resnet']
        backbone.update(TINY_RESNET)
        if model['backbone'].get('norm_cfg', {}).get('type') == 'SyncBN':
            backbone.update(norm_cfg=bn)
    out = dict(backbone=backbone)
    if 'pretrained' in model:
        out['pretrained'] = None
    if 'decode_head' in model:   # UperNet
        out['decode_head'] = dict(in_channels=list(channels), channels=32,
                                  num_classes=len(ADE_CLASSES), norm_cfg=bn)
        out['auxiliary_head'] = dict(in_channels=channels[2], channels=16,
                                     num_classes=len(ADE_CLASSES), norm_cfg=bn)
    if 'roi_head' in model:      # Faster R-CNN
        out['neck'] = dict(in_channels=list(channels), out_channels=32)
        out['rpn_head'] = dict(in_channels=32, feat_channels=32)
        out['roi_head'] = dict(
            bbox_roi_extractor=dict(out_channels=32),
            bbox_head=dict(in_channels=32, fc_out_channels=64,
                           num_classes=len(COCO_CATEGORIES)))
    return out


def _seg_overrides(cfg, data_root: str, crop: int) -> dict:
    crop_size = (crop, crop)
    train_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='LoadAnnotations', reduce_zero_label=True),
        dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
        dict(type='RandomFlip', prob=0.5),
        dict(type='PackSegInputs'),
    ]
    test_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='Resize', scale=crop_size, keep_ratio=True),
        dict(type='LoadAnnotations', reduce_zero_label=True),
        dict(type='PackSegInputs'),
    ]
    meta = dict(classes=ADE_CLASSES)
    loader = dict(num_workers=0, persistent_workers=False)
    return dict(
        model=dict(data_preprocessor=dict(size=crop_size),
                   test_cfg=dict(_delete_=True, mode='whole')),
        train_dataloader=dict(batch_size=2, **loader, dataset=dict(
            data_root=data_root, metainfo=meta, pipeline=train_pipeline)),
        val_dataloader=dict(batch_size=1, **loader, dataset=dict(
            data_root=data_root, metainfo=meta, pipeline=test_pipeline)),
        test_dataloader=dict(batch_size=1, **loader, dataset=dict(
            data_root=data_root, metainfo=meta, pipeline=test_pipeline)),
    )


def _det_overrides(cfg, data_root: str, scale: Tuple[int, int]) -> dict:
    root = data_root.rstrip('/') + '/'
    train_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='LoadAnnotations', with_bbox=True),
        dict(type='Resize', scale=scale, keep_ratio=True),
        dict(type='RandomFlip', prob=0.5),
        dict(type='PackDetInputs'),
    ]
    test_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='Resize', scale=scale, keep_ratio=True),
        dict(type='LoadAnnotations', with_bbox=True),
        dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape',
                                              'img_shape', 'scale_factor')),
    ]
    meta = dict(classes=tuple(n for _, n in COCO_CATEGORIES))
    loader = dict(num_workers=0, persistent_workers=False)
    evaluator = dict(ann_file=root + 'annotations/instances_val2017.json')
    return dict(
        # An untrained detector scores below upstream's 0.05: keep every box, so that
        # the metric (and a comparison of detections) has something to work on.
        model=dict(test_cfg=dict(rcnn=dict(score_thr=0.0))),
        train_dataloader=dict(batch_size=2, **loader, dataset=dict(
            data_root=root, metainfo=meta, pipeline=train_pipeline)),
        val_dataloader=dict(batch_size=1, **loader, dataset=dict(
            data_root=root, metainfo=meta, pipeline=test_pipeline)),
        test_dataloader=dict(batch_size=1, **loader, dataset=dict(
            data_root=root, metainfo=meta, pipeline=test_pipeline)),
        val_evaluator=evaluator,
        test_evaluator=evaluator,
    )


def _plain(value):
    """ConfigDicts and tuples as plain Python literals (what a config file holds)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def tiny_overrides(cfg, data_root: Optional[str] = None, max_iters: int = 4,
                   interval: int = 2, crop: int = 64,
                   det_scale: Tuple[int, int] = (96, 64), lr: float = 2e-3,
                   seed: int = 0) -> dict:
    """Every override that turns a shipped config into a seconds-long CPU run.

    Tiny model (:func:`tiny_model_overrides`), data from :func:`make_ade20k` /
    :func:`make_coco` at ``data_root``, plain ``OptimWrapper`` instead of AMP (same
    optimizer and lr decay, constant ``lr``), ``max_iters`` training iterations (an
    iteration-based loop also for detection) with validation and a checkpoint every
    ``interval``, logging every iteration, a fixed seed.

    Args:
        cfg (mmengine.Config): The loaded shipped config.
        data_root (str, optional): Dataset root; None keeps the config's.
    """
    over = dict(model=tiny_model_overrides(cfg.model))
    if data_root is not None:
        task = (_seg_overrides(cfg, data_root, crop) if 'decode_head' in cfg.model
                else _det_overrides(cfg, data_root, det_scale))
        model_extra = task.pop('model', {})
        for key, value in model_extra.items():
            over['model'][key] = value
        over.update(task)
    wrapper = {k: v for k, v in _plain(cfg.optim_wrapper).items()
               if k not in ('type', 'loss_scale')}
    # A few iterations at the real warmup's lr (1e-6 x 1e-4) would leave the adapters
    # at zero; a constant, larger lr makes them move, so merging has work to do.
    wrapper['optimizer']['lr'] = lr
    over['optim_wrapper'] = dict(_delete_=True, type='OptimWrapper', **wrapper)
    over['param_scheduler'] = [dict(type='ConstantLR', factor=1.0, by_epoch=False,
                                    begin=0, end=1)]
    over['train_cfg'] = dict(_delete_=True, type='IterBasedTrainLoop',
                             max_iters=max_iters, val_interval=interval)
    over['default_hooks'] = dict(
        logger=dict(type='LoggerHook', interval=1, log_metric_by_epoch=False),
        checkpoint=dict(type='AtomicCheckpointHook', by_epoch=False, interval=interval))
    over['log_processor'] = dict(by_epoch=False)
    over['custom_hooks'] = [dict(type='CoLoRAReportHook', input_size=(crop, crop))]
    over['randomness'] = dict(seed=seed)
    over['env_cfg'] = dict(cudnn_benchmark=False)
    return over


def _merged(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def write_tiny_config(config: str, out: str, data_root: Optional[str] = None,
                      extra: Optional[dict] = None, **kwargs) -> str:
    """Write ``out``, a config inheriting the shipped ``config`` (``_base_``) with
    :func:`tiny_overrides` on top (and ``extra``, merged into them), and return its
    path."""
    from mmengine.config import Config
    cfg = Config.fromfile(config)
    over = _merged(tiny_overrides(cfg, data_root=data_root, **kwargs), extra or {})
    lines = [f'_base_ = {osp.abspath(config)!r}']
    lines += [f'{key} = {_plain(value)!r}' for key, value in over.items()]
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    with open(out, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return out


def single_error(output: str) -> str:
    """The tools' contract for bad input: exactly one ``error: ...`` line, last in the
    output, and no traceback (library warnings printed before it are allowed).
    Returns that line."""
    lines = [line for line in output.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith('error: ')]
    assert len(errors) == 1, output[-3000:]
    assert lines[-1] == errors[0], output[-3000:]
    assert 'Traceback' not in output, output[-3000:]
    return errors[0]
