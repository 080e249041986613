r"""CoLoRA's correlated low-rank pair (Eqs. 14-15 of the CoLoRA paper).

Two chained pointwise layers ``X -> X W1 -> (X W1) W2`` with ``W1 (d x d')`` and
``W2 (d' x d'')`` in the paper's notation (PyTorch stores the transposes,
``weight1 (d' x d)`` and ``weight2 (d'' x d')``) are adapted jointly::

    W1' = W1 + s1 A1 B1 + s  As (Bs W2^T)          (14)
    W2' = W2 + s2 A2 B2 + s  (W1^T As) Bs          (15)

``A1 (d x rl)``, ``B1 (rl x d')``, ``A2 (d' x rl)``, ``B2 (rl x d'')`` are each layer's
own low-rank update; ``As (d x rs)``, ``Bs (rs x d'')`` are shared by both layers and
couple their updates. With ``n = min(d, d', d'')``: ``r = n // gamma``,
``rs = floor(r * share_ratio)``, ``rl = r - rs``; trainable count
``r (d + d'') + 2 rl d'``.

Scalings follow the paper's Lemma 3.1 (``Var[A A^T] ~ r sigma_A^4``) and are recomputed
from the current parameters at every forward pass::

    s_i = 1 / (sqrt(rl) * (std(A_i) + std(B_i)))
    s   = 1 / ((rs * n)^(1/4) * (std(Bs W2^T) + std(As)))      in W1'
    s   = 1 / ((rs * n)^(1/4) * (std(W1^T As) + std(Bs)))      in W2'

The partner weights (``W2`` inside Eq. 14, ``W1`` inside Eq. 15) are persistent buffers:
``'frozen'`` keeps the pretrained weights; ``'effective'`` copies the detached effective
weights ``W + dW`` after every training-mode forward pass. Evaluation never changes them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from .base import AdaptedLayer, Adapter
from .init import init_a_

PARTNER_POLICIES = ('effective', 'frozen')


def pair_ranks(n: int, gamma: int, share_ratio: float, where: str = '') -> tuple:
    """``(r, rs, rl)`` for a block of width ``n``; raises on an empty adapter."""
    if not 0.0 <= share_ratio <= 1.0:
        raise ValueError(f'{where}: share_ratio={share_ratio} must lie in [0, 1] '
                         '(the fraction of the rank shared by the pair).')
    if gamma <= 0:
        raise ValueError(f'{where}: gamma={gamma} must be a positive integer.')
    r = n // gamma
    if r == 0:
        raise ValueError(f'{where}: rank r = n // gamma = {n} // {gamma} = 0 for block '
                         f'width n={n}; use gamma <= {n}.')
    rs = int(math.floor(r * share_ratio))
    return r, rs, r - rs


def _inverse(den: torch.Tensor) -> torch.Tensor:
    """``1 / den``, finite when both std terms vanish (an all-zero partner weight
    with ``B = 0``): the product it scales is then exactly zero, and so is the delta."""
    return 1.0 / den.clamp_min(1e-12)


class CoLoRAPair(nn.Module):
    """Parameters and partner buffers of one correlated pair (paper orientation).

    Args:
        d (int): Input width of the first layer.
        d_mid (int): Output width of the first layer = input width of the second.
        d_out (int): Output width of the second layer.
        gamma (int): Rank divisor, ``r = min(d, d_mid, d_out) // gamma``.
            Defaults to 16.
        share_ratio (float): Fraction of ``r`` given to the shared part.
            Defaults to 0.5.
        partner_policy (str): ``'effective'`` or ``'frozen'``. Defaults to
            ``'effective'``.
        where (str): Names of the two layers, for error messages. Defaults to ''.
    """

    def __init__(self, d: int, d_mid: int, d_out: int, gamma: int = 16,
                 share_ratio: float = 0.5, partner_policy: str = 'effective',
                 where: str = '') -> None:
        super().__init__()
        if partner_policy not in PARTNER_POLICIES:
            raise ValueError(f'{where}: partner_policy={partner_policy!r}; expected one '
                             f'of {PARTNER_POLICIES}.')
        self.d, self.d_mid, self.d_out = d, d_mid, d_out
        self.n = min(d, d_mid, d_out)
        self.r, self.rs, self.rl = pair_ranks(self.n, gamma, share_ratio, where)
        self.gamma, self.share_ratio = gamma, share_ratio
        self.partner_policy = partner_policy
        rl, rs = self.rl, self.rs
        # An empty part (share_ratio 0 or 1) has no parameters at all: a zero-size
        # parameter would never receive a gradient (and stop DDP).
        self._new_param('A1', (d, rl), rl)
        self._new_param('B1', (rl, d_mid), rl)
        self._new_param('A2', (d_mid, rl), rl)
        self._new_param('B2', (rl, d_out), rl)
        self._new_param('As', (d, rs), rs)
        self._new_param('Bs', (rs, d_out), rs)
        # Partner weights in paper orientation: W1 (d x d'), W2 (d' x d'').
        self.register_buffer('partner_w1', torch.zeros(d, d_mid))
        self.register_buffer('partner_w2', torch.zeros(d_mid, d_out))
        self._pending_w1: Optional[torch.Tensor] = None
        self.reset_parameters()

    def _new_param(self, name: str, shape: tuple, rank: int) -> None:
        self.register_parameter(name, nn.Parameter(torch.zeros(shape)) if rank else None)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.rl:
            init_a_(self.A1, self.d)
            init_a_(self.A2, self.d_mid)
            self.B1.zero_()
            self.B2.zero_()
        if self.rs:
            init_a_(self.As, self.d)
            self.Bs.zero_()

    def num_trainable(self) -> int:
        """Closed form ``r (d + d'') + 2 rl d'`` (appendix Table 1)."""
        return self.r * (self.d + self.d_out) + 2 * self.rl * self.d_mid

    # ------------------------------------------------------------------ deltas
    def _independent_factors(self, index: int) -> Optional[tuple]:
        """``(s_i A_i, B_i)``: the scaling goes on the thin factor."""
        if self.rl == 0:
            return None
        A, B = (self.A1, self.B1) if index == 0 else (self.A2, self.B2)
        A, B = A.float(), B.float()
        s = _inverse(math.sqrt(self.rl) * (A.std() + B.std()))
        return s * A, B

    def _shared_factors(self, index: int) -> Optional[tuple]:
        """``(s As, Bs W2^T)`` for W1', ``(s W1^T As, Bs)`` for W2'."""
        if self.rs == 0:
            return None
        As, Bs = self.As.float(), self.Bs.float()
        norm = (self.rs * self.n) ** 0.25
        if index == 0:
            C = Bs @ self.partner_w2.float().t()             # (rs x d'), low-rank first
            s = _inverse(norm * (C.std() + As.std()))
            return s * As, C
        C = self.partner_w1.float().t() @ As                 # (d' x rs)
        s = _inverse(norm * (C.std() + Bs.std()))
        return s * C, Bs

    def _independent(self, index: int) -> Optional[torch.Tensor]:
        factors = self._independent_factors(index)
        return None if factors is None else factors[0] @ factors[1]

    def delta(self, index: int) -> torch.Tensor:
        """``dW1`` (index 0, ``d x d'``) or ``dW2`` (index 1, ``d' x d''``) in float32,
        paper orientation, autocast disabled.

        Both terms of Eq. 14 (or 15) are one product of inner width ``r``,
        ``[s1 A1 | s As] @ [B1 ; Bs W2^T]``: a single full-size GEMM, and autograd
        keeps only the thin factors."""
        device_type = self.partner_w1.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            parts = [f for f in (self._independent_factors(index),
                                 self._shared_factors(index)) if f is not None]
            if len(parts) == 1:
                return parts[0][0] @ parts[0][1]
            left = torch.cat([p[0] for p in parts], dim=1)
            right = torch.cat([p[1] for p in parts], dim=0)
            return left @ right

    # ------------------------------------------------------------- partners
    @torch.no_grad()
    def set_partners(self, w1: torch.Tensor, w2: torch.Tensor) -> None:
        """Set partners from PyTorch-layout weights ``(d' x d)`` and ``(d'' x d')``."""
        self.partner_w1.copy_(w1.reshape(self.d_mid, self.d).t())
        self.partner_w2.copy_(w2.reshape(self.d_out, self.d_mid).t())
        self._pending_w1 = None


class CoLoRAPairLayer(Adapter):
    """One side (``index`` 0 or 1) of a :class:`CoLoRAPair` on an :class:`AdaptedLayer`.

    The first side owns the pair's parameters (registered as ``pair``); the second side
    refers to the same object without registering it, so every tensor appears once in
    the state dict.
    """

    method = 'colora'

    def __init__(self, pair: CoLoRAPair, index: int) -> None:
        super().__init__()
        self.index = index
        if index == 0:
            self.pair = pair
        else:
            object.__setattr__(self, '_pair_ref', pair)

    def get_pair(self) -> CoLoRAPair:
        return self.pair if self.index == 0 else self._pair_ref

    @property
    def foldable(self) -> bool:
        return True

    def delta_weight(self, layer: AdaptedLayer) -> torch.Tensor:
        delta = self.get_pair().delta(self.index)            # paper orientation
        return layer.as_weight_shape(delta.t())              # PyTorch (out, in)

    def after_forward(self, layer: AdaptedLayer, delta: Optional[torch.Tensor]) -> None:
        pair = self.get_pair()
        if not self.training or pair.partner_policy != 'effective':
            return
        with torch.no_grad():
            effective = (layer.weight_matrix().float() + layer.weight_matrix(delta).float()).t()
            effective = effective.to(pair.partner_w1.dtype).contiguous()
            if self.index == 0:
                # Hold W1' until the second layer has used this step's partner W1.
                pair._pending_w1 = effective
            else:
                # Rebind rather than copy in place: autograd saved the old partners
                # for this step's backward pass.
                pair.partner_w2 = effective
                if pair._pending_w1 is not None:
                    pair.partner_w1 = pair._pending_w1
                    pair._pending_w1 = None

    @torch.no_grad()
    def reset_from_weights(self, layer: AdaptedLayer) -> None:
        pair = self.get_pair()
        target = pair.partner_w1 if self.index == 0 else pair.partner_w2
        target.copy_(layer.weight_matrix().t())
        pair._pending_w1 = None

    @torch.no_grad()
    def fold_independent_(self, layer: AdaptedLayer) -> list:
        pair = self.get_pair()
        part = pair._independent(self.index)
        if part is None:
            return []
        layer.weight.add_(layer.as_weight_shape(part.t()).to(layer.weight.dtype))
        A, B = (pair.A1, pair.B1) if self.index == 0 else (pair.A2, pair.B2)
        init_a_(A, pair.d if self.index == 0 else pair.d_mid)
        B.zero_()
        return [A, B]

    def extra_repr(self) -> str:
        p = self.get_pair()
        return (f'index={self.index}, r={p.r}, rs={p.rs}, rl={p.rl}, '
                f'partner_policy={p.partner_policy!r}')
