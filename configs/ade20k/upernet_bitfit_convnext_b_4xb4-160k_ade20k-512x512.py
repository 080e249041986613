# UperNet, ConvNeXt-B with no adapter: only the backbone's biases and normalisation layers
# train (with the heads), the trainable set every PEFT method here shares.
# ADE20K, 160k iterations, 4 GPUs x 4 images, 512x512 crops.
_base_ = '../_base_/upernet_convnext-b_ade20k.py'
model = dict(backbone=dict(adapter=dict(_delete_=True, method='bitfit')))
