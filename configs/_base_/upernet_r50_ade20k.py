# UperNet + CoLoRA ResNet-50 (torchvision IMAGENET1K_V2 weights) on ADE20K 512x512.
# Upstream's upernet_r50 base builds ResNetV1c (deep stem); the torchvision weights
# need the plain 7x7 stem, hence the backbone is restated in full here.
_base_ = [
    'mmseg::_base_/models/upernet_r50.py',
    './ade20k_upernet_160k.py',
]
custom_imports = dict(imports=['colora_mm'], allow_failed_imports=False)
checkpoint_file = 'https://download.pytorch.org/models/resnet50-11ad3fa6.pth'  # noqa
norm_cfg = dict(type='SyncBN', requires_grad=True)
data_preprocessor = dict(size={{_base_.crop_size}})
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='CoLoRAResNet',
        depth=50,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        dilations=(1, 1, 1, 1),
        strides=(1, 2, 2, 2),
        deep_stem=False,
        stem_channels=64,
        norm_cfg=norm_cfg,
        norm_eval=False,
        style='pytorch',
        contract_dilation=True,
        adapter=dict(
            method='colora',
            gamma=16,
            share_ratio=0.5,
            use_filter=True,
            partner_policy='effective'),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    decode_head=dict(num_classes=150),
    auxiliary_head=dict(num_classes=150))

# Layer-wise lr decay over the 16 bottleneck blocks, rate 0.99 (appendix Table 3).
optim_wrapper = dict(
    constructor='LayerDecayResNetOptimizerConstructor',
    paramwise_cfg=dict(num_layers=16, decay_rate=0.99))
