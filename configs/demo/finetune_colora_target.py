# Demo: CoLoRA (correlated pairs rank C // 8 with half of it shared, spatial branch with
# the range filter); adapters, biases, norms and the heads train.
_base_ = './_base_/finetune_target.py'
model = dict(backbone=dict(adapter=dict(
    _delete_=True, method='colora', gamma=8, share_ratio=0.5, use_filter=True,
    partner_policy='effective')))
