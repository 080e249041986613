# Faster R-CNN + FPN with CoLoRA Swin-T (ImageNet-1k, 224) on COCO: the 1x set-up of
# ./faster-rcnn_fpn_1x_coco.py with upstream's Swin-T detection settings (mmdet's
# swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py; mmdet ships no Faster R-CNN Swin config):
# the backbone as there (drop-path 0.2, the original Swin release as pretrained weights),
# AdamW lr 1e-4 / weight decay 0.05 without decay on the position tables and norms, a
# 1000-iteration warmup; no layer-wise lr decay, as upstream. CoLoRASwin: every block's
# MLP (fc1 -> GELU -> fc2) is a correlated pair; no spatial branch (no convolution).
_base_ = './faster-rcnn_fpn_1x_coco.py'
custom_imports = dict(imports=['colora_mm'], allow_failed_imports=False)
pretrained = 'https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_tiny_patch4_window7_224.pth'  # noqa
model = dict(
    backbone=dict(
        _delete_=True,
        type='CoLoRASwin',
        embed_dims=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        mlp_ratio=4,
        qkv_bias=True,
        qk_scale=None,
        drop_rate=0.,
        attn_drop_rate=0.,
        drop_path_rate=0.2,
        patch_norm=True,
        out_indices=(0, 1, 2, 3),
        with_cp=False,
        adapter=dict(
            method='colora',
            gamma=16,
            share_ratio=0.5,
            partner_policy='effective'),
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))

param_scheduler = [
    dict(
        type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(
        type='MultiStepLR',
        begin=0,
        end=12,
        by_epoch=True,
        milestones=[8, 11],
        gamma=0.1),
]
optim_wrapper = dict(
    optimizer=dict(lr=1e-4, weight_decay=0.05),
    paramwise_cfg=dict(
        custom_keys={
            'absolute_pos_embed': dict(decay_mult=0.),
            'relative_position_bias_table': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.),
        }))
