"""``CoLoRAResNet`` in mmdet's model registry: mmdet's ResNet with adapters."""
from mmdet.models.backbones import ResNet
from mmdet.registry import MODELS

from .resnet import ResNetAdapterMixin


@MODELS.register_module()
class CoLoRAResNet(ResNetAdapterMixin, ResNet):
    __doc__ = ResNetAdapterMixin.__doc__
