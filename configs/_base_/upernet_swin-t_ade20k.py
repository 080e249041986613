# UperNet + CoLoRA Swin-T (ImageNet-1k, 224) on ADE20K 512x512: upstream's
# swin-tiny-patch4-window7-in1k-pre_upernet config as it is (model, data, 160k schedule,
# 8 GPUs x 2 images, AdamW lr 6e-5 / weight decay 0.01 without decay on the position
# tables and norms, warmup 1500 then linear decay; upstream uses no layer-wise lr decay
# for Swin) with CoLoRASwin as the backbone: every block's MLP (fc1 -> GELU -> fc2) is a
# correlated pair; no spatial branch (a Swin block has no convolution). The checkpoint
# is upstream's (mmseg's conversion of the Swin release; the original release loads too).
_base_ = 'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'  # noqa
custom_imports = dict(imports=['colora_mm'], allow_failed_imports=False)
model = dict(
    backbone=dict(
        type='CoLoRASwin',
        adapter=dict(
            method='colora',
            gamma=16,
            share_ratio=0.5,
            partner_policy='effective')))
custom_hooks = [dict(type='CoLoRAReportHook', input_size=(512, 512))]
# Checkpoints written atomically (upstream's interval and settings otherwise).
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
