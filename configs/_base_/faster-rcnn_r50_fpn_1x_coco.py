# Faster R-CNN + FPN with CoLoRA ResNet-50 (torchvision IMAGENET1K_V2 weights) on COCO.
# The rest of the backbone is upstream's (plain 7x7 stem, BN statistics frozen), except
# that no stage is frozen: every PEFT variant trains all its adapters, biases and norms,
# and full fine-tuning everything, as on ADE20K and VTAB-1k (upstream's detection
# ResNet freezes the stem and the first stage).
_base_ = './faster-rcnn_fpn_1x_coco.py'
custom_imports = dict(imports=['colora_mm'], allow_failed_imports=False)
checkpoint_file = 'https://download.pytorch.org/models/resnet50-11ad3fa6.pth'  # noqa
model = dict(
    backbone=dict(
        type='CoLoRAResNet',
        frozen_stages=-1,
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
