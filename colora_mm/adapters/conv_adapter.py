r"""Conv-Adapter (Chen et al., 2024): a non-linear bottleneck parallel to a spatial conv.

    out = conv(x) + alpha (.) Up(act(Down(x)))

``Down = Conv(C_in, w, k, stride, groups=w)`` with the wrapped conv's kernel, stride,
padding and dilation; ``act`` is ReLU (ResNet) or GELU (ConvNeXt); ``Up`` a 1x1 conv
``w -> C_out``; ``alpha`` a learnable per-channel scale initialised to 1. ``w = C_in //
gamma`` (gamma = 4). ``Up`` starts at zero so a fresh adapter changes nothing. The
activation makes it non-linear: it never folds.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .base import AdaptedLayer, Adapter
from .init import init_a_

ACTIVATIONS = {'relu': nn.ReLU, 'gelu': nn.GELU}


class ConvAdapter(Adapter):
    """Args:
        layer (AdaptedLayer): The wrapped spatial conv.
        gamma (int): Width divisor, ``w = C_in // gamma``. Defaults to 4.
        act (str): ``'relu'`` or ``'gelu'``. Defaults to ``'relu'``.
    """

    method = 'conv_adapter'

    def __init__(self, layer: AdaptedLayer, gamma: int = 4, act: str = 'relu') -> None:
        super().__init__()
        if not layer.is_conv or tuple(layer.kernel_size) == (1, 1):
            raise ValueError(f'{layer.describe()}: Conv-Adapter attaches to k x k convs.')
        if act not in ACTIVATIONS:
            raise ValueError(f'{layer.describe()}: act={act!r}; expected one of '
                             f'{tuple(ACTIVATIONS)}.')
        c_in, c_out = layer.in_channels, layer.out_channels
        width = c_in // gamma if gamma > 0 else 0
        if width == 0 or c_in % width:
            raise ValueError(f'{layer.describe()}: Conv-Adapter width w = C_in // gamma = '
                             f'{c_in} // {gamma} = {width} must be >= 1 and divide C_in; '
                             'change gamma.')
        self.width = width
        self.down = nn.Conv2d(c_in, width, layer.kernel_size, layer.stride, layer.padding,
                              layer.dilation, groups=width, bias=False)
        self.act = ACTIVATIONS[act]()
        self.up = nn.Conv2d(width, c_out, 1, bias=False)
        self.alpha = nn.Parameter(torch.ones(c_out))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        fan_in = self.down.weight[0].numel()
        init_a_(self.down.weight, fan_in)
        self.up.weight.zero_()
        self.alpha.fill_(1.0)

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def branch(self, layer: AdaptedLayer, x: torch.Tensor,
               into: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.alpha.view(1, -1, 1, 1) * self.up(self.act(self.down(x)))

    def extra_repr(self) -> str:
        return f'width={self.width}'
