"""CoLoRA backbones for mmpretrain, mmseg and mmdet.

Importing this package registers ``CoLoRAConvNeXt`` (mmpretrain, mmseg and mmdet
registries), ``CoLoRAResNet`` (one class per codebase, built on that codebase's own
``ResNet``, in mmpretrain's, mmseg's and mmdet's registries), ``CoLoRASwin`` (mmseg's
and mmdet's ``SwinTransformer``) and the classification neck ``GAPNormNeck``
(mmpretrain).
"""
from .adapted_backbone import AdaptedBackboneMixin
from .convnext import CoLoRAConvNeXt
from .necks import GAPNormNeck
from .pretrained import (LAYOUTS, PretrainedLoadReport, convert_convnext_original,
                         convert_swin_original, detect_layout, load_pretrained,
                         unwrap_state_dict)
from .resnet import ResNetAdapterMixin
from .resnet_mmdet import CoLoRAResNet as DetCoLoRAResNet
from .resnet_mmpretrain import CoLoRAResNet as ClsCoLoRAResNet
from .resnet_mmseg import CoLoRAResNet as SegCoLoRAResNet
from .swin import SwinAdapterMixin
from .swin_mmdet import CoLoRASwin as DetCoLoRASwin
from .swin_mmseg import CoLoRASwin as SegCoLoRASwin

__all__ = [
    'AdaptedBackboneMixin', 'CoLoRAConvNeXt', 'ResNetAdapterMixin', 'SegCoLoRAResNet',
    'DetCoLoRAResNet', 'ClsCoLoRAResNet', 'GAPNormNeck', 'SwinAdapterMixin',
    'SegCoLoRASwin', 'DetCoLoRASwin', 'LAYOUTS', 'PretrainedLoadReport',
    'convert_convnext_original', 'convert_swin_original', 'detect_layout',
    'load_pretrained', 'unwrap_state_dict',
]
