"""``CoLoRASwin`` in mmseg's model registry: mmseg's SwinTransformer with adapters."""
from mmseg.models.backbones import SwinTransformer
from mmseg.registry import MODELS

from .swin import SwinAdapterMixin


@MODELS.register_module()
class CoLoRASwin(SwinAdapterMixin, SwinTransformer):
    __doc__ = SwinAdapterMixin.__doc__
