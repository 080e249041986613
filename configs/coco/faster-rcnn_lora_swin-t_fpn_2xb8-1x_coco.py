# Faster R-CNN + FPN, Swin-T with LoRA (gamma 20, alpha/r 2) on the layers CoLoRA adapts,
# the MLPs' fc1 and fc2; add attn_adapter=dict(method='lora', gamma=20) for the
# attention projections qkv and proj as well. COCO, 1x schedule, 2 GPUs x 8 images.
_base_ = '../_base_/faster-rcnn_swin-t_fpn_1x_coco.py'
model = dict(backbone=dict(adapter=dict(_delete_=True, method='lora', gamma=20)))
