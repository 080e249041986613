"""``CoLoRAResNet`` in mmpretrain's model registry: mmpretrain's ResNet with adapters.

mmpretrain's ResNet names its tensors as torchvision does (``conv1``, ``bn1``,
``layer{s}.{b}.conv1..bn3``, ``downsample.0/1``), so torchvision's ResNet-50 weights
(the paper's IMAGENET1K_V2) load as they are, their classifier ``fc`` dropped.
"""
from mmpretrain.models.backbones import ResNet
from mmpretrain.registry import MODELS

from .resnet import ResNetAdapterMixin


@MODELS.register_module()
class CoLoRAResNet(ResNetAdapterMixin, ResNet):
    __doc__ = ResNetAdapterMixin.__doc__
