# VTAB-1k, ConvNeXt-B with CoLoRA (gamma 16, share_ratio 0.5, range filter on): the base's adapter.
# One task per run (tools/vtab1k.py sets it), 100 epochs at batch 32, 224x224.
_base_ = '../_base_/vtab1k_convnext-b.py'
