r"""CoLoRA's std-based scalings as one autograd op.

Every side of a correlated pair forms its left factor from one or two scaled terms
(:mod:`.colora_pair`)::

    L = [s_1 X_1 | s_2 X_2],     s_j = 1 / max(k_j (std(X_j) + std(Y_j)), 1e-12)

with ``(X_j, Y_j)`` a thin factor pair (``A_i, B_i``; ``As, Bs W2p^T``; ``W1p^T As, Bs``)
and ``k_j`` the pair's normaliser (``sqrt(rl)``, ``(rs n)^(1/4)``). Written with plain
tensor ops, autograd records about thirty small operators per term (``std``'s backward
alone is a dozen), each of them a kernel launch on a GPU, where a CoLoRA training step
is bound by launches rather than by arithmetic (docs/benchmarks.md, "GPU").
:class:`ScaledColumns` computes the same ``L`` and its gradients in a fixed, small
number of operators whatever the number of terms:

    forward:   12 kernels (one ``std`` per tensor, the scalings as vectors, ``L``)
    backward:  10 kernels + 4 per ``X_j`` + 3 per ``Y_j``

Its backward runs in Python, where the plain ops' runs in autograd's C++ engine: on
the CPU the host time per side of a pair is about the same either way (about 200 us,
forward and backward); what it saves is launches.

The forward values are bit-identical to the plain ops (the same ``std`` calls, the same
sums and products in the same order); the gradients are the closed form of the plain
ops' backward (``std``'s ``(T - mean T) / ((N - 1) std)``, zero where ``std = 0`` as in
PyTorch; zero through the clamp where it binds), equal to them up to rounding. Under
``torch.compile`` (which derives and fuses the backward itself) and without gradients
the plain ops run. On the CPU a training step of a pair with frozen base weights goes
through neither: each side's factors, scalings included, are one C++ autograd node
(``csrc/pair_factors.cpp``, :func:`.up3x3.pair_side_factors`).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch.autograd.function import once_differentiable

from .lowrank import compiling

#: ``s_j = 1 / max(den_j, DEN_MIN)``: finite when both stds vanish (an all-zero
#: partner weight with ``B = 0``); the product it scales is then exactly zero.
DEN_MIN = 1e-12

Term = Tuple[torch.Tensor, torch.Tensor, float]


def inverse(den: torch.Tensor) -> torch.Tensor:
    """``1 / max(den, DEN_MIN)``."""
    return den.clamp_min(DEN_MIN).reciprocal()


def plain_scaled(x: torch.Tensor, y: torch.Tensor, k: float) -> torch.Tensor:
    """``s x`` with ``s = 1 / max(k (std(x) + std(y)), 1e-12)``, as plain ops."""
    return inverse(k * (x.std() + y.std())) * x


class _Constants:
    """Per (device, dtype): the normalisers, ``N - 1`` of every tensor, and the column
    to term map, as tensors (built once; a tensor made from Python numbers in every
    step would be a host-to-device copy on a GPU)."""

    def __init__(self, norms: Sequence[float], counts: Sequence[int],
                 widths: Sequence[int], like: torch.Tensor) -> None:
        opts = dict(dtype=like.dtype, device=like.device)
        self.norms = torch.tensor(list(norms), **opts)
        self.neg_norms = -self.norms
        self.dof = torch.tensor([n - 1 for n in counts], **opts)
        seg = torch.zeros(sum(widths), len(widths), **opts)
        start = 0
        for j, w in enumerate(widths):
            seg[start:start + w, j] = 1
            start += w
        self.seg = seg
        self.bounds = [(sum(widths[:j]), sum(widths[:j + 1])) for j in range(len(widths))]


class ScaledColumns(torch.autograd.Function):
    """``[s_1 X_1 | ... | s_m X_m]`` (columns side by side) from ``X_1, Y_1, ...``; see
    the module doc. ``consts`` is a :class:`_Constants` for these shapes."""

    @staticmethod
    def forward(ctx, consts: _Constants, *tensors: torch.Tensor) -> torch.Tensor:
        m = len(tensors) // 2
        xs = tensors[0::2]
        sig = torch.stack([t.std() for t in tensors])          # (2m,) std X_j, std Y_j
        den = sig.view(m, 2).sum(1).mul_(consts.norms)          # k_j (std X_j + std Y_j)
        s = den.clamp_min(DEN_MIN).reciprocal_()
        rows = xs[0].shape[0]
        out = torch.empty(rows, consts.seg.shape[0], dtype=xs[0].dtype,
                          device=xs[0].device)
        for j, (a, b) in enumerate(consts.bounds):
            torch.mul(xs[j], s[j], out=out[:, a:b])
        ctx.consts = consts
        ctx.save_for_backward(out, s, den, sig.mul_(consts.dof), *tensors)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        # as the forward: autocast off (a backward called inside an autocast region
        # would otherwise run the products below in its dtype)
        with torch.autocast(device_type=grad.device.type, enabled=False):
            return ScaledColumns._backward(ctx, grad.to(ctx.saved_tensors[0].dtype))

    @staticmethod
    def _backward(ctx, grad: torch.Tensor) -> tuple:
        out, s, den, sig_dof, *tensors = ctx.saved_tensors
        consts = ctx.consts
        m = len(tensors) // 2
        # t_j = <dL_j, s_j X_j>; d loss / d std of X_j and of Y_j (the same):
        # t_j * d s_j / d den_j * k_j = -t_j s_j k_j, zero where the clamp binds
        t = (grad * out).sum(0) @ consts.seg
        dstd = (t * s).mul_(consts.neg_norms).masked_fill_(den < DEN_MIN, 0)
        # std's backward: d std(T) / dT = (T - mean T) / ((N - 1) std), 0 where std = 0
        sig_dof = sig_dof.view(m, 2)
        coef = (dstd[:, None] / sig_dof).masked_fill_(sig_dof == 0, 0)
        grads: List = [None]
        needs = ctx.needs_input_grad[1:]
        for j, (a, b) in enumerate(consts.bounds):
            x, y = tensors[2 * j], tensors[2 * j + 1]
            gx = gy = None
            if needs[2 * j]:
                gx = torch.addcmul(grad[:, a:b] * s[j], x - x.mean(), coef[j, 0])
            if needs[2 * j + 1]:
                gy = (y - y.mean()).mul_(coef[j, 1])
            grads += [gx, gy]
        return tuple(grads)


def scaled_columns(terms: Sequence[Term], cache: Dict) -> torch.Tensor:
    """``[s_1 X_1 | ... ]`` for ``terms = [(X_j, Y_j, k_j), ...]`` (every ``X_j`` with
    the same rows, all in one dtype on one device). ``cache`` keeps the constants per
    device and dtype (a dict owned by the caller, e.g. the pair)."""
    tensors = [t for x, y, _ in terms for t in (x, y)]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if not grad or compiling():
        parts = [plain_scaled(x, y, k) for x, y, k in terms]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    like = tensors[0]
    key = (like.device, like.dtype)
    consts = cache.get(key)
    if consts is None:
        consts = _Constants([k for _, _, k in terms], [t.numel() for t in tensors],
                            [x.shape[1] for x, _, _ in terms], like)
        # kept for plain tensors only: not for a tracing subclass (fake, functional)
        if type(like) in (torch.Tensor, torch.nn.Parameter) \
                and like.device.type != 'meta':
            cache[key] = consts
    return ScaledColumns.apply(consts, *tensors)

