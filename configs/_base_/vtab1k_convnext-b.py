# CoLoRA ConvNeXt-B (ImageNet-22k, 224) for VTAB-1k classification. The adapter
# defaults to CoLoRA (gamma 16, share_ratio 0.5, filter on); configs/vtab1k override
# `model.backbone.adapter` for the baselines.
#
# Classifier (appendix F): global average pooling, then a normalisation, then a linear
# classifier with cross-entropy. ConvNeXt's own final LayerNorm is that normalisation
# (`gap_before_final_norm=True` pools before it, as the original ConvNeXt head does),
# so it starts from the pretrained weights; it trains (a norm), and so does the head.
_base_ = ['./vtab1k_1xb32-100e.py']
checkpoint_file = 'https://dl.fbaipublicfiles.com/convnext/convnext_base_22k_224.pth'  # noqa
model = dict(
    type='ImageClassifier',
    data_preprocessor={{_base_.data_preprocessor}},
    backbone=dict(
        type='CoLoRAConvNeXt',
        arch='base',
        out_indices=(3, ),
        # Stochastic depth off: the appendix lists no regularisation beyond weight
        # decay (and the official ConvNeXt code defaults to drop_path 0).
        drop_path_rate=0.0,
        gap_before_final_norm=True,
        adapter=dict(
            method='colora',
            gamma=16,
            spatial_gamma=32,  # spatial rank C // (2 gamma): reproduces the paper's #Param
            share_ratio=0.5,
            use_filter=True,
            partner_policy='effective'),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    neck=None,
    head=dict(
        type='LinearClsHead',
        num_classes={{_base_.num_classes}},
        in_channels=1024,
        loss=dict(type='CrossEntropyLoss', loss_weight=1.0),
        topk=(1, )))

# Stage-wise lr decay over the 4 ConvNeXt stages, rate 0.9 (appendix Table 4), by
# mmseg's constructor (mmpretrain's own decays over 12 layers, not 4 stages).
optim_wrapper = dict(
    constructor='mmseg.LearningRateDecayOptimizerConstructor',
    paramwise_cfg=dict(decay_rate=0.9, decay_type='stage_wise', num_layers=4))
