# Demo step 2, shared by every fine-tuning method: start from the source-pretrained
# model and train on the target domain. The backbone loads the pretrained segmentor
# through its init_cfg (the loader takes the `backbone.` part of an mmseg checkpoint);
# both heads are loaded from the same checkpoint too (same classes in both domains),
# so every method starts exactly where the "pretrained only" row of the table is.
_base_ = './upernet_convnext-demo_shapes-64x64.py'

# Written by tools/demo.py; override with --cfg-options model.backbone.init_cfg.checkpoint=...
# (and the same for model.decode_head / model.auxiliary_head).
pretrained = 'demo_out/checkpoints/pretrained_source.pth'
max_iters = 300
warmup_iters = 15

model = dict(
    backbone=dict(init_cfg=dict(
        _delete_=True, type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(init_cfg=dict(
        type='Pretrained', checkpoint=pretrained, prefix='decode_head.')),
    auxiliary_head=dict(init_cfg=dict(
        type='Pretrained', checkpoint=pretrained, prefix='auxiliary_head.')))
train_dataloader = dict(dataset=dict(data_root={{_base_.target_root}}))

train_cfg = dict(max_iters=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-2, by_epoch=False, begin=0,
         end=warmup_iters),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False,
         begin=warmup_iters, end=max_iters),
]
default_hooks = dict(checkpoint=dict(interval=max_iters))
