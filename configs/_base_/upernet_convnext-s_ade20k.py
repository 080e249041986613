# UperNet + CoLoRA ConvNeXt-S (ImageNet-22k -> 1k, 384) on ADE20K 512x512.
_base_ = './upernet_convnext-b_ade20k.py'
checkpoint_file = 'https://dl.fbaipublicfiles.com/convnext/convnext_small_22k_1k_384.pth'  # noqa
model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
