# UperNet + CoLoRA ConvNeXt-B (ImageNet-22k, 224) on ADE20K 512x512. The adapter
# defaults to CoLoRA (gamma 16, share_ratio 0.5, filter on); configs/ade20k override
# `model.backbone.adapter` for the baselines and the Table 8 sweep.
_base_ = [
    'mmseg::_base_/models/upernet_convnext.py',
    './ade20k_upernet_160k.py',
]
custom_imports = dict(imports=['colora_mm'], allow_failed_imports=False)
checkpoint_file = 'https://dl.fbaipublicfiles.com/convnext/convnext_base_22k_224.pth'  # noqa
data_preprocessor = dict(size={{_base_.crop_size}})
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        _delete_=True,
        type='CoLoRAConvNeXt',
        arch='base',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.4,
        layer_scale_init_value=1.0,
        gap_before_final_norm=False,
        adapter=dict(
            method='colora',
            gamma=16,
            spatial_gamma=32,  # spatial rank C // (2 gamma): reproduces the paper's #Param
            share_ratio=0.5,
            use_filter=True,
            partner_policy='effective'),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    decode_head=dict(in_channels=[128, 256, 512, 1024], num_classes=150),
    auxiliary_head=dict(in_channels=512, num_classes=150),
    test_cfg=dict(
        mode='slide', crop_size={{_base_.crop_size}}, stride=(341, 341)))

# Stage-wise lr decay over the 4 ConvNeXt stages, rate 0.9 (appendix Table 4).
optim_wrapper = dict(
    constructor='LearningRateDecayOptimizerConstructor',
    paramwise_cfg=dict(decay_rate=0.9, decay_type='stage_wise', num_layers=4))
