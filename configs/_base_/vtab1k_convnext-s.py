# CoLoRA ConvNeXt-S (ImageNet-22k -> 1k, 384) for VTAB-1k classification.
_base_ = './vtab1k_convnext-b.py'
checkpoint_file = 'https://dl.fbaipublicfiles.com/convnext/convnext_small_22k_1k_384.pth'  # noqa
model = dict(
    backbone=dict(
        arch='small',
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    head=dict(in_channels=768))
