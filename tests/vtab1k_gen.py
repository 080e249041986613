"""A synthetic VTAB-1k root (the real folder and split-file layout, a few small images
per task) and a shrunk version of any configs/vtab1k config that runs on it in seconds
on a CPU.

    from vtab1k_gen import make_vtab1k, write_tiny_vtab1k_config
    root = make_vtab1k('/tmp/vtab-1k', tasks=('patch_camelyon', 'kitti'))
    cfg = write_tiny_vtab1k_config(
        'configs/vtab1k/colora_convnext_s_1xb32-100e_vtab1k-224x224.py', '/tmp/tiny.py',
        data_root=root)
    # python tools/vtab1k.py /tmp/tiny.py --tasks patch_camelyon kitti --seeds 0

Every image is a flat colour of its class plus noise, so a model learns something in a
few iterations.
"""
from __future__ import annotations

import os
import os.path as osp
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from data_gen import TINY_CHANNELS, _merged, _plain, tiny_model_overrides

SPLIT_FILES = ('train800val200', 'train800', 'val200', 'test')


def make_vtab1k(root: str, tasks: Sequence[str] = ('patch_camelyon', 'kitti'),
                num_train: int = 8, num_val: int = 2, num_test: int = 4, size: int = 32,
                seed: int = 0) -> str:
    """Write task folders under ``root``: ``images/{train,test}/*.jpg`` and the four
    split files (``train800`` the first ``num_train - num_val`` training images,
    ``val200`` the rest, ``train800val200`` all of them, ``test`` the test images),
    labels cycling through the task's classes.

    Returns:
        str: ``root``.
    """
    from colora_mm.datasets import get_task
    rng = np.random.default_rng(seed)
    for name in tasks:
        task = get_task(name)
        folder = osp.join(root, task.name)
        colours = rng.integers(0, 256, size=(task.num_classes, 3))
        lines = {}
        for split, count in (('train', num_train), ('test', num_test)):
            os.makedirs(osp.join(folder, 'images', split), exist_ok=True)
            lines[split] = []
            for i in range(count):
                label = i % task.num_classes
                img = colours[label] + rng.normal(0, 10, size=(size, size, 3))
                rel = f'images/{split}/{i:04d}.jpg'
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                    osp.join(folder, rel), quality=95)
                lines[split].append(f'{rel} {label}')
        splits = {'train800val200': lines['train'],
                  'train800': lines['train'][:num_train - num_val],
                  'val200': lines['train'][num_train - num_val:],
                  'test': lines['test']}
        for split, rows in splits.items():
            with open(osp.join(folder, f'{split}.txt'), 'w') as f:
                f.write('\n'.join(rows) + '\n')
    return root


def tiny_vtab1k_overrides(cfg, data_root: Optional[str] = None, size: int = 32,
                          max_epochs: int = 2, batch_size: int = 4,
                          lr: float = 2e-3) -> dict:
    """Overrides turning a configs/vtab1k config into a seconds-long CPU run: a tiny
    backbone without pretrained weights (:func:`data_gen.tiny_model_overrides`), the
    head and neck at its width, ``size`` x ``size`` inputs, ``max_epochs`` epochs with a
    checkpoint after each, plain ``OptimWrapper`` (same optimizer and lr decay, constant
    ``lr``), no dataloader workers."""
    model = tiny_model_overrides(cfg.model)
    kind = 'convnext' if 'ConvNeXt' in cfg.model.backbone.type else 'resnet'
    width = TINY_CHANNELS[kind][-1]
    model['head'] = dict(in_channels=width)
    if cfg.model.get('neck'):
        model['neck'] = dict(in_channels=width)
    pipeline = [dict(type='LoadImageFromFile'),
                dict(type='Resize', scale=(size, size), keep_ratio=False),
                dict(type='PackInputs')]
    dataset = dict(pipeline=pipeline)
    if data_root is not None:
        dataset['data_root'] = data_root
    loader = dict(batch_size=batch_size, num_workers=0, persistent_workers=False,
                  dataset=dataset)
    wrapper = {k: v for k, v in _plain(cfg.optim_wrapper).items()
               if k not in ('type', 'loss_scale')}
    wrapper['optimizer']['lr'] = lr
    return dict(
        model=model,
        train_dataloader=loader,
        test_dataloader=loader,
        optim_wrapper=dict(_delete_=True, type='OptimWrapper', **wrapper),
        param_scheduler=[dict(type='ConstantLR', factor=1.0, by_epoch=False, begin=0,
                              end=1)],
        train_cfg=dict(max_epochs=max_epochs),
        default_hooks=dict(logger=dict(interval=1),
                           checkpoint=dict(interval=1, max_keep_ckpts=1)),
        custom_hooks=[dict(type='CoLoRAReportHook', input_size=(size, size))],
        env_cfg=dict(cudnn_benchmark=False),
    )


def write_tiny_vtab1k_config(config: str, out: str, data_root: Optional[str] = None,
                             extra: Optional[dict] = None, **kwargs) -> str:
    """Write ``out``: the shipped ``config`` as ``_base_`` with
    :func:`tiny_vtab1k_overrides` (and ``extra``, merged into them) on top."""
    from mmengine.config import Config
    cfg = Config.fromfile(config)
    over = _merged(tiny_vtab1k_overrides(cfg, data_root=data_root, **kwargs), extra or {})
    lines = [f'_base_ = {osp.abspath(config)!r}']
    lines += [f'{key} = {_plain(value)!r}' for key, value in over.items()]
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    with open(out, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return out
