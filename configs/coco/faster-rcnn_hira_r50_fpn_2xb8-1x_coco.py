# Faster R-CNN + FPN, ResNet-50 with HiRA on the 1x1 layers, gamma 20 (appendix F).
# COCO, 1x schedule, 2 GPUs x 8 images.
_base_ = '../_base_/faster-rcnn_r50_fpn_1x_coco.py'
model = dict(backbone=dict(adapter=dict(_delete_=True, method='hira', gamma=20)))
