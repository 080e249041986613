# CoLoRA ResNet-50 (torchvision IMAGENET1K_V2 weights) for VTAB-1k classification.
# The adapter defaults to CoLoRA (gamma 16, share_ratio 0.5, filter on); configs/vtab1k
# override `model.backbone.adapter` for the baselines.
#
# Classifier (appendix F): global average pooling, then a normalisation, then a linear
# classifier with cross-entropy. ResNet has no norm after pooling; GAPNormNeck adds a
# LayerNorm over the 2048 pooled channels (the normalisation ConvNeXt's head uses, and
# independent of the batch). It trains, as does the head.
_base_ = ['./vtab1k_1xb32-100e.py']
checkpoint_file = 'https://download.pytorch.org/models/resnet50-11ad3fa6.pth'  # noqa
model = dict(
    type='ImageClassifier',
    data_preprocessor={{_base_.data_preprocessor}},
    backbone=dict(
        type='CoLoRAResNet',
        depth=50,
        num_stages=4,
        out_indices=(3, ),
        strides=(1, 2, 2, 2),
        dilations=(1, 1, 1, 1),
        deep_stem=False,   # torchvision's plain 7x7 stem
        stem_channels=64,
        style='pytorch',
        frozen_stages=-1,
        # SyncBN: BatchNorm statistics over the whole batch of 32 on any number of
        # GPUs (mmengine reverts it to BN in a single-process run).
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        norm_eval=False,
        adapter=dict(
            method='colora',
            gamma=16,
            share_ratio=0.5,
            use_filter=True,
            partner_policy='effective'),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    neck=dict(type='GAPNormNeck', in_channels=2048, norm_cfg=dict(type='LN')),
    head=dict(
        type='LinearClsHead',
        num_classes={{_base_.num_classes}},
        in_channels=2048,
        loss=dict(type='CrossEntropyLoss', loss_weight=1.0),
        topk=(1, )))

# Layer-wise lr decay over the 16 bottleneck blocks, rate 0.99 (appendix Table 3).
optim_wrapper = dict(
    constructor='LayerDecayResNetOptimizerConstructor',
    paramwise_cfg=dict(num_layers=16, decay_rate=0.99))
