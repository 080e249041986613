"""``GAPNormNeck``: global average pooling, then a normalisation (mmpretrain registry).

The classification neck of the CoLoRA paper's VTAB-1k set-up (appendix F: GAP, a
normalisation, then the linear classifier) for backbones without a norm of their own
after pooling (ResNet). ConvNeXt has one: its final norm, applied after pooling with
``gap_before_final_norm=True``.
"""
from __future__ import annotations

from typing import Tuple, Union

import torch
import torch.nn as nn
from mmcv.cnn import build_norm_layer
from mmpretrain.registry import MODELS


@MODELS.register_module()
class GAPNormNeck(nn.Module):
    """Global average pooling over H, W, then ``norm_cfg`` over the channels.

    Args:
        in_channels (int): Channels of the (last) feature map.
        norm_cfg (dict): The normalisation, an mmcv norm config on ``(N, C)``
            (``'LN'``, ``'BN1d'``...). Defaults to ``dict(type='LN')``.
    """

    def __init__(self, in_channels: int, norm_cfg: dict = dict(type='LN')) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.gap = nn.AdaptiveAvgPool2d(1)
        _, self.norm = build_norm_layer(norm_cfg, in_channels)

    def init_weights(self) -> None:
        """The norm keeps its identity initialisation (weight 1, bias 0)."""

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f'GAPNormNeck(in_channels={self.in_channels}): got features '
                             f'of shape {tuple(x.shape)}; expected (N, '
                             f'{self.in_channels}, H, W). Set in_channels to the '
                             "backbone's output channels.")
        return self.norm(self.gap(x).flatten(1))

    def forward(self, inputs: Union[torch.Tensor, Tuple[torch.Tensor, ...]]):
        if isinstance(inputs, torch.Tensor):
            return self._one(inputs)
        return tuple(self._one(x) for x in inputs)
