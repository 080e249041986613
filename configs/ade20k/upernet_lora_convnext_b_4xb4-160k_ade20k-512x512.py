# UperNet, ConvNeXt-B with LoRA on the 1x1 layers, gamma 20, alpha/r 2.
# ADE20K, 160k iterations, 4 GPUs x 4 images, 512x512 crops.
_base_ = '../_base_/upernet_convnext-b_ade20k.py'
model = dict(backbone=dict(adapter=dict(_delete_=True, method='lora', gamma=20)))
