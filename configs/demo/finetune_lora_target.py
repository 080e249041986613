# Demo: LoRA on both pointwise layers of every block (rank = min(in, out) // 8);
# adapters, biases, norms and the heads train.
_base_ = './_base_/finetune_target.py'
model = dict(backbone=dict(adapter=dict(_delete_=True, method='lora', gamma=8)))
