# Short name for UperNet + CoLoRA ConvNeXt-B on ADE20K (the paper's main setting).
_base_ = './upernet_colora_convnext_b_4xb4-160k_ade20k-512x512.py'
