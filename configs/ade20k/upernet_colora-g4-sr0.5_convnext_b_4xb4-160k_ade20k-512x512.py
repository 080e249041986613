# Appendix Table 8 sweep: UperNet, ConvNeXt-B with CoLoRA at gamma 4, share_ratio rs/(rs+rl) 0.5.
_base_ = './upernet_colora_convnext_b_4xb4-160k_ade20k-512x512.py'
model = dict(backbone=dict(adapter=dict(gamma=4, spatial_gamma=8, share_ratio=0.5)))
