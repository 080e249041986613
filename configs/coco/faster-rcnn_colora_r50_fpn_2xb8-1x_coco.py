# Faster R-CNN + FPN, ResNet-50 with CoLoRA (gamma 16, share_ratio 0.5, range filter on): the base's adapter.
# COCO, 1x schedule, 2 GPUs x 8 images.
_base_ = '../_base_/faster-rcnn_r50_fpn_1x_coco.py'
