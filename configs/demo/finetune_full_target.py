# Demo: full fine-tuning on the target domain (every parameter trains).
_base_ = './_base_/finetune_target.py'
model = dict(backbone=dict(adapter=dict(_delete_=True, method='full')))
