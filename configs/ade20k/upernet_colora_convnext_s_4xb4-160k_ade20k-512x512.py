# UperNet, ConvNeXt-S with CoLoRA (gamma 16, share_ratio 0.5, range filter on): the base's adapter.
# ADE20K, 160k iterations, 4 GPUs x 4 images, 512x512 crops.
_base_ = '../_base_/upernet_convnext-s_ade20k.py'
