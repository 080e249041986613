# UperNet, ConvNeXt-B with CoLoRA set per stage (AdapterSpec.overrides, first match
# wins): the last stage gets twice the rank and more sharing (gamma 8, share_ratio 0.8,
# spatial rank C // 16), the first stage no adapter at all (its biases and norms still
# train), stages 2-3 the paper's gamma 16 / share_ratio 0.5.
# ADE20K, 160k iterations, 4 GPUs x 4 images, 512x512 crops.
_base_ = '../_base_/upernet_convnext-b_ade20k.py'
model = dict(
    backbone=dict(
        adapter=dict(overrides=[
            dict(pattern='stages.3.*', gamma=8, spatial_gamma=16, share_ratio=0.8),
            dict(pattern='stages.0.*', method='none'),
        ])))
