# Faster R-CNN + FPN with CoLoRA ConvNeXt-S (ImageNet-22k -> 1k, 384) on COCO. The
# adapter defaults to CoLoRA (gamma 16, share_ratio 0.5, filter on); configs/coco
# override `model.backbone.adapter` for the baselines.
_base_ = './faster-rcnn_fpn_1x_coco.py'
custom_imports = dict(imports=['colora_mm'], allow_failed_imports=False)
checkpoint_file = 'https://dl.fbaipublicfiles.com/convnext/convnext_small_22k_1k_384.pth'  # noqa
model = dict(
    backbone=dict(
        _delete_=True,
        type='CoLoRAConvNeXt',
        arch='small',
        out_indices=(0, 1, 2, 3),
        # The appendix names no drop path for COCO: ADE20K's ConvNeXt-S value (the
        # official ConvNeXt detection release uses 0.6 with Cascade Mask R-CNN 3x).
        drop_path_rate=0.3,
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
    neck=dict(in_channels=[96, 192, 384, 768]))

# Stage-wise lr decay over the 4 ConvNeXt stages, rate 0.9 (appendix Table 4).
optim_wrapper = dict(
    constructor='LearningRateDecayOptimizerConstructor',
    paramwise_cfg=dict(decay_rate=0.9, decay_type='stage_wise', num_layers=4))
