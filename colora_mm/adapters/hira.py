r"""HiRA (Huang et al., 2025) on pointwise layers: a Hadamard high-rank update.

    dW = s_expect * W0 (.) (B A),     s_expect = 1 / (sqrt(r) * sigma_A)

``W0`` is the (frozen) base weight, ``(.)`` the element-wise product, ``A (r x in)``
kaiming-uniform, ``B (out x r)`` zero, and ``sigma_A`` the standard deviation of ``A``'s
initial distribution (the "s_expect" scaling of the CoLoRA paper's Section 3.1).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .base import AdaptedLayer, Adapter
from .init import a_std, init_a_
from .lora import pointwise_rank


class HiRA(Adapter):
    """Args:
        layer (AdaptedLayer): The pointwise layer.
        gamma (int): Rank divisor, ``r = min(in, out) // gamma``. Defaults to 20.
    """

    method = 'hira'

    def __init__(self, layer: AdaptedLayer, gamma: int = 20) -> None:
        super().__init__()
        self.rank = pointwise_rank(layer, gamma)
        self.in_features, self.out_features = layer.in_channels, layer.out_channels
        self.scaling = 1.0 / (math.sqrt(self.rank) * a_std(self.in_features))
        self.A = nn.Parameter(torch.empty(self.rank, self.in_features))
        self.B = nn.Parameter(torch.zeros(self.out_features, self.rank))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init_a_(self.A, self.in_features)
        self.B.zero_()

    def num_trainable(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    @property
    def foldable(self) -> bool:
        return True

    def delta_weight(self, layer: AdaptedLayer) -> torch.Tensor:
        with torch.autocast(device_type=self.A.device.type, enabled=False):
            low_rank = self.B.float() @ self.A.float()
            delta = self.scaling * layer.weight_matrix().detach().float() * low_rank
        return layer.as_weight_shape(delta)

    @torch.no_grad()
    def fold_independent_(self, layer: AdaptedLayer) -> list:
        layer.weight.add_(self.delta_weight(layer).to(layer.weight.dtype))
        self.reset_parameters()
        return [self.A, self.B]

    def extra_repr(self) -> str:
        return f'rank={self.rank}, scaling={self.scaling:.4g}'
