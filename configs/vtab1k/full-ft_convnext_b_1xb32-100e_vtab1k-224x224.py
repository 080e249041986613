# VTAB-1k, ConvNeXt-B with full fine-tuning: every backbone weight trains.
# One task per run (tools/vtab1k.py sets it), 100 epochs at batch 32, 224x224.
_base_ = '../_base_/vtab1k_convnext-b.py'
model = dict(backbone=dict(adapter=dict(_delete_=True, method='full')))
