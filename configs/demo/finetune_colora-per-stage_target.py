# Demo: CoLoRA set per stage (AdapterSpec.overrides, first match wins): the demo's
# CoLoRA (gamma 8, share 0.5) in the middle stages, twice the rank with more of it
# shared in the last stage (gamma 4, share 0.75), no adapter in the first (16-channel)
# stage, whose biases and norms still train.
_base_ = './finetune_colora_target.py'
model = dict(backbone=dict(adapter=dict(overrides=[
    dict(pattern='stages.3.*', gamma=4, share_ratio=0.75),
    dict(pattern='stages.0.*', method='none')])))
