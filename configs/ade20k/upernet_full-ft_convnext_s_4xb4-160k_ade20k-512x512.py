# UperNet, ConvNeXt-S with full fine-tuning: every backbone weight trains.
# ADE20K, 160k iterations, 4 GPUs x 4 images, 512x512 crops.
_base_ = '../_base_/upernet_convnext-s_ade20k.py'
model = dict(backbone=dict(adapter=dict(_delete_=True, method='full')))
