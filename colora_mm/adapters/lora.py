r"""LoRA and PiSSA on pointwise layers (``nn.Linear`` or 1x1 ``nn.Conv2d``).

LoRA (Hu et al., 2022)::   dW = (alpha / r) B A,   A (r x in) kaiming-uniform, B (out x r) = 0

PiSSA (Meng et al., 2024) uses the same update but starts from the principal singular
triplets of the pretrained weight ``W = U S V^T``: ``B = U_r sqrt(S_r / s)``,
``A = sqrt(S_r / s) V_r^T`` with ``s = alpha / r``, and the frozen base becomes the
residual ``W - s B A``. The SVD needs the pretrained weights, so it runs on demand
(:meth:`PiSSA.reset_from_weights`, called after the checkpoint is loaded); until then
the adapter is a plain zero-initialised LoRA. Both are PyTorch-layout (``(out, in)``).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .base import AdaptedLayer, Adapter, compute_dtype, no_autocast
from .init import init_a_


def pointwise_rank(layer: AdaptedLayer, gamma: int) -> int:
    if not layer.is_pointwise:
        raise ValueError(f'{layer.describe()}: this adapter applies to pointwise layers '
                         '(Linear or 1x1 conv with groups=1) only.')
    if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma <= 0:
        raise ValueError(f'{layer.describe()}: gamma={gamma!r} must be a positive '
                         'integer (the rank divisor, r = min(in, out) // gamma).')
    n = min(layer.in_channels, layer.out_channels)
    r = n // gamma
    if r == 0:
        raise ValueError(f'{layer.describe()}: rank r = min(in, out) // gamma = {n} // '
                         f'{gamma} = 0; use gamma <= {n}.')
    return r


class LowRankFactors(Adapter):
    """The factors every pointwise baseline shares: ``A (r x in)`` kaiming-uniform,
    ``B (out x r)`` zero, ``r = min(in, out) // gamma``. Subclasses define the delta.

    Args:
        layer (AdaptedLayer): The pointwise layer.
        gamma (int): Rank divisor. Defaults to 20.
    """

    def __init__(self, layer: AdaptedLayer, gamma: int = 20) -> None:
        super().__init__()
        self.rank = pointwise_rank(layer, gamma)
        self.in_features, self.out_features = layer.in_channels, layer.out_channels
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

    @property
    def has_independent_part(self) -> bool:
        return True

    @torch.no_grad()
    def fold_independent_(self, layer: AdaptedLayer) -> list:
        layer.weight.add_(self.delta_weight(layer).to(layer.weight.dtype))
        self.reset_parameters()
        return [self.A, self.B]

    def extra_repr(self) -> str:
        return f'rank={self.rank}, scaling={self.scaling:.4g}'


class LoRA(LowRankFactors):
    """``dW = scaling * B A`` with ``scaling = alpha / r``.

    Args:
        layer (AdaptedLayer): The pointwise layer.
        gamma (int): Rank divisor, ``r = min(in, out) // gamma``. Defaults to 20.
        scaling (float): ``alpha / r``. Defaults to 2.0.
    """

    method = 'lora'

    def __init__(self, layer: AdaptedLayer, gamma: int = 20, scaling: float = 2.0) -> None:
        super().__init__(layer, gamma)
        self.scaling = scaling

    def low_rank(self, layer: AdaptedLayer) -> tuple:
        """``(scaling A^T, B^T)``: ``x dW^T = scaling (x A^T) B^T`` (peft's LoRA forward
        when it runs on activations)."""
        with no_autocast(self.A.device):
            dtype = compute_dtype(self.A, layer.weight)
            return self.scaling * self.A.to(dtype).t(), self.B.to(dtype).t()


class PiSSA(LoRA):
    """LoRA initialised from the principal SVD of the pretrained weight (see module doc)."""

    method = 'pissa'

    def __init__(self, layer: AdaptedLayer, gamma: int = 20, scaling: float = 2.0) -> None:
        super().__init__(layer, gamma, scaling)
        # Persistent: a checkpoint records that the base weight already is the residual.
        self.register_buffer('svd_initialized', torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def reset_from_weights(self, layer: AdaptedLayer, force: bool = False) -> None:
        if bool(self.svd_initialized) and not force:
            return
        if layer.merged:
            raise RuntimeError(f'{layer.describe()}: unmerge before PiSSA initialisation.')
        w = layer.weight_matrix().double()
        if bool(self.svd_initialized):          # force: start again from W = W_res + sBA
            w = w + self.scaling * (self.B.double() @ self.A.double())
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        r = self.rank
        root = (s[:r] / self.scaling).sqrt()
        self.B.copy_(u[:, :r] * root)
        self.A.copy_(root[:, None] * vh[:r])
        residual = w - self.scaling * (self.B.double() @ self.A.double())
        layer.weight.copy_(layer.as_weight_shape(residual))
        self.svd_initialized.fill_(True)

    @torch.no_grad()
    def fold_independent_(self, layer: AdaptedLayer) -> list:
        layer.weight.add_(self.delta_weight(layer).to(layer.weight.dtype))
        self.svd_initialized.fill_(False)
        self.reset_from_weights(layer)
        return [self.A, self.B]
