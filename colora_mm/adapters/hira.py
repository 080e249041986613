r"""HiRA (Huang et al., 2025) on pointwise layers: a Hadamard high-rank update.

    dW = s_expect * W0 (.) (B A),     s_expect = 1 / (sqrt(r) * sigma_A)

``W0`` is the (frozen) base weight, ``(.)`` the element-wise product, ``A (r x in)``
kaiming-uniform, ``B (out x r)`` zero, and ``sigma_A`` the standard deviation of ``A``'s
initial distribution (the "s_expect" scaling of the CoLoRA paper's Section 3.1).

The update is full rank, so HiRA trains through the weight:
``W0 + W0 (.) (s B A)`` is one fused op that reads ``W0`` in place (no scaled copy of
the weight is formed or saved for backward). ``B A`` is formed in ``max(float32,
parameter dtype)`` with autocast off.
"""
from __future__ import annotations

import math

import torch

from .base import AdaptedLayer, compute_dtype, no_autocast
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

    def _scaled_low_rank(self, layer: AdaptedLayer) -> torch.Tensor:
        dtype = compute_dtype(self.A, layer.weight)
        return layer.as_weight_shape(
            (self.scaling * self.B.to(dtype)) @ self.A.to(dtype))

    def delta_weight(self, layer: AdaptedLayer) -> torch.Tensor:
        with no_autocast(self.A.device):
            low_rank = self._scaled_low_rank(layer)
            return layer.unmerged_weight().detach().to(low_rank.dtype) * low_rank

    def adapted_weight(self, layer: AdaptedLayer) -> torch.Tensor:
        """``W0 + W0 (.) (s B A)`` in one op (what the weight path runs with)."""
        with no_autocast(self.A.device):
            low_rank = self._scaled_low_rank(layer)
            w = layer.weight
            return torch.addcmul(w, w.detach(), low_rank).to(w.dtype)
