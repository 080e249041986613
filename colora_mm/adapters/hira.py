r"""HiRA (Huang et al., 2025) on pointwise layers: a Hadamard high-rank update.

    dW = s_expect * W0 (.) (B A),     s_expect = 1 / (sqrt(r) * sigma_A)

``W0`` is the (frozen) base weight, ``(.)`` the element-wise product, ``A (r x in)``
kaiming-uniform, ``B (out x r)`` zero, and ``sigma_A`` the standard deviation of ``A``'s
initial distribution (the "s_expect" scaling of the CoLoRA paper's Section 3.1).
"""
from __future__ import annotations

import math

import torch

from .base import AdaptedLayer
from .init import a_std
from .lora import LowRankFactors


class HiRA(LowRankFactors):
    """Args:
        layer (AdaptedLayer): The pointwise layer.
        gamma (int): Rank divisor, ``r = min(in, out) // gamma``. Defaults to 20.
    """

    method = 'hira'

    def __init__(self, layer: AdaptedLayer, gamma: int = 20) -> None:
        super().__init__(layer, gamma)
        self.scaling = 1.0 / (math.sqrt(self.rank) * a_std(self.in_features))

    def delta_weight(self, layer: AdaptedLayer) -> torch.Tensor:
        with torch.autocast(device_type=self.A.device.type, enabled=False):
            low_rank = self.B.float() @ self.A.float()
            delta = self.scaling * layer.weight_matrix().detach().float() * low_rank
        return layer.as_weight_shape(delta)
