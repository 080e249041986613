"""``CoLoRAResNet`` in mmseg's model registry: mmseg's ResNet with adapters."""
from mmseg.models.backbones import ResNet
from mmseg.registry import MODELS

from .resnet import ResNetAdapterMixin


@MODELS.register_module()
class CoLoRAResNet(ResNetAdapterMixin, ResNet):
    __doc__ = ResNetAdapterMixin.__doc__
