"""``CoLoRASwin`` in mmdet's model registry: mmdet's SwinTransformer with adapters."""
from mmdet.models.backbones import SwinTransformer
from mmdet.registry import MODELS

from .swin import SwinAdapterMixin


@MODELS.register_module()
class CoLoRASwin(SwinAdapterMixin, SwinTransformer):
    __doc__ = SwinAdapterMixin.__doc__
