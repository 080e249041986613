# VTAB-1k, ConvNeXt-S with LoRA on the 1x1 layers, gamma 20, alpha/r 2.
# One task per run (tools/vtab1k.py sets it), 100 epochs at batch 32, 224x224.
_base_ = '../_base_/vtab1k_convnext-s.py'
model = dict(backbone=dict(adapter=dict(_delete_=True, method='lora', gamma=20)))
