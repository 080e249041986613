# Faster R-CNN + FPN with CoLoRA ResNet-50 (torchvision IMAGENET1K_V2 weights) on COCO.
# The rest of the backbone is upstream's: plain 7x7 stem, BN in eval mode, stem and
# first stage frozen (adapters there included).
_base_ = './faster-rcnn_fpn_1x_coco.py'
custom_imports = dict(imports=['colora_mm'], allow_failed_imports=False)
checkpoint_file = 'https://download.pytorch.org/models/resnet50-11ad3fa6.pth'  # noqa
model = dict(
    backbone=dict(
        type='CoLoRAResNet',
        adapter=dict(
            method='colora',
            gamma=16,
            share_ratio=0.5,
            use_filter=True,
            partner_policy='effective'),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)))

# Layer-wise lr decay over the 16 bottleneck blocks, rate 0.99 (appendix Table 3).
optim_wrapper = dict(
    constructor='LayerDecayResNetOptimizerConstructor',
    paramwise_cfg=dict(num_layers=16, decay_rate=0.99))
