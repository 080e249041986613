# UperNet, Swin-T with LoRA (gamma 20, alpha/r 2) on the layers CoLoRA adapts, the MLPs'
# fc1 and fc2; add attn_adapter=dict(method='lora', gamma=20) for the attention
# projections qkv and proj as well. ADE20K, 160k iterations, 8 GPUs x 2 images.
_base_ = '../_base_/upernet_swin-t_ade20k.py'
model = dict(backbone=dict(adapter=dict(_delete_=True, method='lora', gamma=20)))
