# ADE20K UperNet set-up shared by every configs/ade20k config (appendix F, Tables 3-4):
# 160k iterations, 16 images per iteration (4 GPUs x 4), evaluation and checkpoint every
# 16k, AdamW (lr 1e-4, weight decay 0.05) under AMP, linear warmup over 1500 iterations
# from 1e-6 x lr, then the polynomial decay (power 1.0, down to 0) of upstream's
# ConvNeXt UperNet configs. The backbone and the layer-wise lr decay come from the
# backbone bases beside this file.
_base_ = [
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_160k.py',
]
max_iters = 160000
interval = 16000
warmup_iters = 1500
crop_size = (512, 512)

train_cfg = dict(
    type='IterBasedTrainLoop', max_iters=max_iters, val_interval=interval)
# Checkpoints written atomically, with the random generators; a resume skips a
# damaged one (colora_mm.engine.AtomicCheckpointHook).
default_hooks = dict(
    checkpoint=dict(type='AtomicCheckpointHook', by_epoch=False, interval=interval))
custom_hooks = [dict(type='CoLoRAReportHook', input_size=crop_size)]

optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    loss_scale='dynamic',
    optimizer=dict(
        type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05))
param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=1e-6,
        by_epoch=False,
        begin=0,
        end=warmup_iters),
    dict(
        type='PolyLR',
        power=1.0,
        eta_min=0.0,
        by_epoch=False,
        begin=warmup_iters,
        end=max_iters),
]

# 4 GPUs x 4 images = 16 per iteration.
train_dataloader = dict(batch_size=4)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
