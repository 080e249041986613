# VTAB-1k, ConvNeXt-S with Conv-Adapter parallel to the spatial convs, gamma 4 (appendix F).
# One task per run (tools/vtab1k.py sets it), 100 epochs at batch 32, 224x224.
_base_ = '../_base_/vtab1k_convnext-s.py'
model = dict(backbone=dict(adapter=dict(_delete_=True, method='conv_adapter', gamma=4)))
