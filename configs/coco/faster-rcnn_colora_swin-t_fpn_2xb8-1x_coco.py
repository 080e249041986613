# Faster R-CNN + FPN, Swin-T with CoLoRA on the MLP pairs (gamma 16, share_ratio 0.5):
# the base's adapter. COCO, 1x schedule, 2 GPUs x 8 images, upstream's Swin optimiser.
_base_ = '../_base_/faster-rcnn_swin-t_fpn_1x_coco.py'
