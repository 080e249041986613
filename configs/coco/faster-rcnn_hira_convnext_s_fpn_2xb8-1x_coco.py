# Faster R-CNN + FPN, ConvNeXt-S with HiRA on the 1x1 layers, gamma 20 (appendix F).
# COCO, 1x schedule, 2 GPUs x 8 images.
_base_ = '../_base_/faster-rcnn_convnext-s_fpn_1x_coco.py'
model = dict(backbone=dict(adapter=dict(_delete_=True, method='hira', gamma=20)))
