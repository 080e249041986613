# Faster R-CNN + FPN, ConvNeXt-S with no adapter: only the backbone's biases and
# normalisation layers train (with the neck and heads).
# COCO, 1x schedule, 2 GPUs x 8 images.
_base_ = '../_base_/faster-rcnn_convnext-s_fpn_1x_coco.py'
model = dict(backbone=dict(adapter=dict(_delete_=True, method='bitfit')))
