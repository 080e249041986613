# COCO Faster R-CNN + FPN set-up shared by every configs/coco config (appendix F):
# upstream's 1x schedule (12 epochs, lr x0.1 after epochs 8 and 11, 500-iteration
# linear warmup from 0.001 x lr, as Swin-Transformer-Object-Detection's schedule_1x),
# AdamW lr 2e-4 and weight decay 0.05 under AMP, 16 images per iteration
# (2 GPUs x 8). The backbone and the layer-wise lr decay come from the backbone bases.
_base_ = [
    'mmdet::_base_/models/faster-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]

max_epochs = 12
warmup_iters = 500
train_cfg = dict(
    type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=1)
param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=0.001,
        by_epoch=False,
        begin=0,
        end=warmup_iters),
    dict(
        type='MultiStepLR',
        begin=0,
        end=max_epochs,
        by_epoch=True,
        milestones=[8, 11],
        gamma=0.1),
]
optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    loss_scale='dynamic',
    optimizer=dict(
        type='AdamW', lr=2e-4, betas=(0.9, 0.999), weight_decay=0.05))
# Checkpoints written atomically, with the random generators, after every epoch
# (upstream's interval); a resume skips a damaged one.
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
# Parameter and FLOPs report at the start of training, on one 800x1333 image.
custom_hooks = [dict(type='CoLoRAReportHook', input_size=(800, 1333))]

# 2 GPUs x 8 images = 16 per iteration.
train_dataloader = dict(batch_size=8)
auto_scale_lr = dict(enable=False, base_batch_size=16)
