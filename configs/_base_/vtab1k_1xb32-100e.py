# VTAB-1k classification set-up shared by every configs/vtab1k config (appendix F,
# "Training configuration on VTAB-1k" and Tables 3-4): one task at a time, trained on
# its 1000 train800val200 images and tested (top-1) on its test split; batch 32 for
# 100 epochs; AdamW (lr 1e-4, weight decay 0.05) under AMP; linear warmup over 1500
# iterations from 1e-6 x lr. 224x224 inputs, resized and normalised, no augmentation.
# The backbone, the neck/head and the lr decay come from the backbone bases beside
# this file.
#
# The task is one choice: tools/vtab1k.py sets, for each task it runs,
#   train_dataloader.dataset.task, test_dataloader.dataset.task  (the task folder)
#   model.head.num_classes                                       (the task's classes)
# Defaults: Caltech101, the first column of the paper's Table 5.
_base_ = ['mmpretrain::_base_/default_runtime.py']
custom_imports = dict(imports=['colora_mm'], allow_failed_imports=False)

data_root = 'data/vtab-1k'
task = 'caltech101'
num_classes = 102
image_size = 224
max_epochs = 100
batch_size = 32
warmup_iters = 1500
# train800val200 holds 1000 images: 32 iterations an epoch at batch 32.
iters_per_epoch = 32
max_iters = max_epochs * iters_per_epoch

# ImageNet statistics (the pretrained backbones'), RGB.
data_preprocessor = dict(
    type='ClsDataPreprocessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    to_rgb=True)

# The usual VTAB-1k preprocessing: resize to 224x224 (bicubic), normalise; nothing else.
pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=False,
         interpolation='bicubic'),
    dict(type='PackInputs'),
]
train_dataloader = dict(
    batch_size=batch_size,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(
        type='VTAB1k',
        data_root=data_root,
        task=task,
        split='train800val200',
        pipeline=pipeline))
test_dataloader = dict(
    batch_size=batch_size,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type='VTAB1k',
        data_root=data_root,
        task=task,
        split='test',
        test_mode=True,
        pipeline=pipeline))
test_evaluator = dict(type='Accuracy', topk=(1, ))
test_cfg = dict()
# No validation during training: the protocol trains on train800val200 and reports
# the test split once, after the last epoch.
val_dataloader = None
val_evaluator = None
val_cfg = None

train_cfg = dict(by_epoch=True, max_epochs=max_epochs)

optim_wrapper = dict(
    type='AmpOptimWrapper',
    loss_scale='dynamic',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05))
# Warmup as the appendix states; then cosine decay to 1e-6 over the remaining
# iterations, the schedule of the official ConvNeXt fine-tuning code the appendix says
# the set-up follows (its --min_lr default 1e-6).
param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=1e-6,
        by_epoch=False,
        begin=0,
        end=warmup_iters),
    dict(
        type='CosineAnnealingLR',
        eta_min=1e-6,
        by_epoch=False,
        begin=warmup_iters,
        end=max_iters),
]

# A checkpoint every 10 epochs (the last one kept): what a killed run resumes from.
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10),
    checkpoint=dict(
        type='AtomicCheckpointHook', by_epoch=True, interval=10, max_keep_ckpts=1,
        save_last=True))
custom_hooks = [dict(type='CoLoRAReportHook', input_size=(image_size, image_size))]
randomness = dict(seed=0, deterministic=False)
