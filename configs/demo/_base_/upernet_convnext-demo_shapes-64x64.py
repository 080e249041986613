# The embedded CPU demo's shared base (tools/demo.py, docs/demo.md): the ADE20K UperNet
# + CoLoRA ConvNeXt set-up of configs/_base_, shrunk to run in minutes on two CPU cores.
# What changes: a 5-block ConvNeXt (16-128 channels) and narrow heads, 64x64 synthetic
# "shapes" images in the ADE20K folder layout (colora_mm/demo/data.py), BN instead of
# SyncBN, a plain OptimWrapper (no AMP on CPU), a short schedule, no validation during
# training (tools/test.py evaluates). What stays: the registered CoLoRAConvNeXt, the
# UperNet decode head on all four stages plus the auxiliary FCN head on stage 3 (loss
# weight 0.4), AdamW with weight decay 0.05, stage-wise lr decay (4 stages, 0.9), warmup
# then polynomial decay, the CoLoRA report hook.
_base_ = '../../_base_/upernet_convnext-b_ade20k.py'

# Written by tools/demo.py (--out, default demo_out); override the roots with
#   --cfg-options train_dataloader.dataset.data_root=... test_dataloader.dataset.data_root=...
source_root = 'demo_out/data/source'
target_root = 'demo_out/data/target'
classes = ('background', 'disc', 'square', 'triangle', 'cross')
palette = [[110, 110, 110], [230, 25, 75], [60, 180, 75], [0, 130, 200],
           [245, 130, 48]]
image_size = (64, 64)
max_iters = 600
warmup_iters = 30
lr = 2e-3
bn = dict(type='BN', requires_grad=True)

model = dict(
    data_preprocessor=dict(size=image_size),
    backbone=dict(
        arch=dict(_delete_=True, depths=[1, 1, 2, 1], channels=[16, 32, 64, 128]),
        drop_path_rate=0.0,
        adapter=dict(_delete_=True, method='full'),
        init_cfg=None),
    decode_head=dict(
        in_channels=[16, 32, 64, 128], channels=32, num_classes=len(classes),
        norm_cfg=bn),
    auxiliary_head=dict(
        in_channels=64, channels=16, num_classes=len(classes), norm_cfg=bn),
    test_cfg=dict(_delete_=True, mode='whole'))

# mmseg's base class of ADE20KDataset, reading the same layout and label convention
# (0 = unlabelled, ignored; k = class k - 1), with the demo's five classes.
dataset = dict(
    type='BaseSegDataset',
    metainfo=dict(classes=classes, palette=palette),
    img_suffix='.jpg',
    seg_map_suffix='.png',
    reduce_zero_label=True)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        _delete_=True,
        data_root=source_root,
        data_prefix=dict(
            img_path='images/training', seg_map_path='annotations/training'),
        pipeline=train_pipeline,
        **dataset))
test_dataloader = dict(
    _delete_=True,
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        data_root=target_root,
        data_prefix=dict(
            img_path='images/validation', seg_map_path='annotations/validation'),
        pipeline=test_pipeline,
        **dataset))
val_dataloader = None
val_evaluator = None
val_cfg = None

train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters)
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=lr, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='LearningRateDecayOptimizerConstructor',
    paramwise_cfg=dict(decay_rate=0.9, decay_type='stage_wise', num_layers=4))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-2, by_epoch=False, begin=0,
         end=warmup_iters),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False,
         begin=warmup_iters, end=max_iters),
]
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10, log_metric_by_epoch=False),
    checkpoint=dict(type='AtomicCheckpointHook', by_epoch=False, interval=max_iters,
                    max_keep_ckpts=1))
log_processor = dict(by_epoch=False, window_size=10)
custom_hooks = [dict(type='CoLoRAReportHook', input_size=image_size)]
randomness = dict(seed=0)
env_cfg = dict(cudnn_benchmark=False)
