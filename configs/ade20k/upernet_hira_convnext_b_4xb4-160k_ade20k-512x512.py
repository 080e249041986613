# UperNet, ConvNeXt-B with HiRA on the 1x1 layers, gamma 20 (appendix F).
# ADE20K, 160k iterations, 4 GPUs x 4 images, 512x512 crops.
_base_ = '../_base_/upernet_convnext-b_ade20k.py'
model = dict(backbone=dict(adapter=dict(_delete_=True, method='hira', gamma=20)))
