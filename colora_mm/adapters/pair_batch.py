r"""The factors of a training forward pass's CoLoRA pairs, formed together for the pairs
of one shape.

A side of a pair forms its factors (:meth:`.colora_pair.CoLoRAPair.factors`) from its
own parameters and its partner's base weight and offset, never from the activations,
so every pair's can be formed before the backbone runs. Most pairs of a backbone share
their shapes (ConvNeXt-B: 27 blocks in stage 3, 3 in each other stage), and the
scalings of a side take the same 38 operators for a 64-wide pair as for a 1024-wide
one (:mod:`.scaling`); on a GPU, where a CoLoRA training step is bound by launching
kernels rather than by running them (docs/benchmarks.md, "GPU"), each operator is a
launch. :func:`pair_factors_stacked` (entered by the adapted backbones around their
forward pass) stacks the thin factors of the pairs of each shape, runs the scalings
once per shape and side (:class:`StackedScaledColumns`, :class:`.scaling.ScaledColumns`
over a stack), and hands each pair its ``(L, R)`` as views of the stacks, taken once by
:meth:`~.colora_pair.CoLoRAPair.factors` when its layer runs. Of the partner products
``Bs W2p^T`` and ``W1p^T As`` the parts with the low-rank offsets are batched too
(:class:`StackedOffsetProducts`); only the base products, each reading its pair's own
weight, stay per pair.

Where it applies: a module in training mode with gradients enabled; pairs in training
mode with both parts (``0 < share_ratio < 1``), two layers, a trainable parameter, and
at least one other pair of the same shapes, dtype and device; not traced or compiled
(the plain ops run there, for the compiler to fuse); not where a training step forms
each side as the CPU's C++ autograd node (:func:`.up3x3.pair_side_factors`: under a
``TorchDispatchMode``, e.g. an operator counter, the CPU steps aside to the GPU's
formulation, this one included). Everywhere else each pair forms its factors when its
layer runs. ``COLORA_MM_PAIR_BATCH=0`` turns it off.

The values are the per-pair formulation's up to the reduction order of ``std`` over a
stack (rounding), and so are the gradients. The stacks are formed when the context is
entered and dropped when it is left, also on an error: a pair's next forward pass never
takes factors formed before its parameters changed. Partner offsets (``'effective'``)
are updated as before, after each pair's layers ran, from the factors they used.
"""
from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from typing import Dict, Iterator, List, Sequence

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from .base import no_autocast
from .colora_pair import CoLoRAPair
from .lowrank import compiling
from .scaling import DEN_MIN, _Constants

ENV = 'COLORA_MM_PAIR_BATCH'
#: Constants of the stacked scalings, per (normalisers, sizes, widths, device, dtype).
_CONSTANTS: Dict[tuple, _Constants] = {}


def enabled() -> bool:
    """``COLORA_MM_PAIR_BATCH``: ``1`` (default) or ``0``."""
    value = os.environ.get(ENV, '1').strip() or '1'
    if value not in ('0', '1'):
        raise ValueError(f'{ENV}={os.environ[ENV]!r}: expected 1 (default: the factors '
                         'of equal-shaped CoLoRA pairs formed together in a training '
                         'forward pass) or 0 (each pair on its own)')
    return value == '1'


class StackedScaledColumns(torch.autograd.Function):
    """:class:`.scaling.ScaledColumns` of ``G`` pairs at once. Inputs: ``consts``,
    ``m`` (terms per pair), then, term by term, the ``G`` pairs' ``X_j`` followed by
    their ``Y_j`` (each pair's own 2-D tensors). Outputs ``(L, R)``: ``L`` of shape
    ``(G, rows, sum of widths)``, pair ``g``'s ``[s_1 X_1 | ... ]`` with its own stds,
    and ``R = [Y_1; ...]`` of shape ``(G, sum of widths, cols)``. The stacks are formed
    in the forward pass and again in the backward pass, so autograd keeps only the
    pairs' own tensors (no stacked copies). Forward: 12 operators and one stack per
    tensor kind; backward: 10 + 4 per ``X_j`` + 3 per ``Y_j`` and the same stacks,
    whatever ``G``."""

    @staticmethod
    def _stacks(tensors: Sequence[torch.Tensor], kinds: int) -> List[torch.Tensor]:
        g = len(tensors) // kinds
        return [torch.stack(tensors[k * g:(k + 1) * g]) for k in range(kinds)]

    @staticmethod
    def forward(ctx, consts: _Constants, m: int, *tensors: torch.Tensor):
        stacks = StackedScaledColumns._stacks(tensors, 2 * m)
        xs, ys = stacks[0::2], stacks[1::2]
        g = xs[0].shape[0]
        sig = torch.stack([t.std(dim=(1, 2)) for t in stacks], dim=1)     # (G, 2m)
        den = sig.view(g, m, 2).sum(2).mul_(consts.norms)                  # (G, m)
        s = den.clamp_min(DEN_MIN).reciprocal_()
        out = torch.empty(g, xs[0].shape[1], consts.seg.shape[0], dtype=xs[0].dtype,
                          device=xs[0].device)
        for j, (a, b) in enumerate(consts.bounds):
            torch.mul(xs[j], s[:, j, None, None], out=out[:, :, a:b])
        right = ys[0] if m == 1 else torch.cat(ys, dim=1)
        ctx.consts, ctx.m = consts, m
        ctx.save_for_backward(out, s, den, sig.mul_(consts.dof), *tensors)
        return out, right

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor, grad_right: torch.Tensor):
        with torch.autocast(device_type=grad.device.type, enabled=False):
            out, s, den, sig_dof, *tensors = ctx.saved_tensors
            grad, grad_right = grad.to(out.dtype), grad_right.to(out.dtype)
            consts, m = ctx.consts, ctx.m
            g = out.shape[0]
            stacks = StackedScaledColumns._stacks(tensors, 2 * m)
            # as ScaledColumns._backward, with the pairs along the first dimension; a
            # Y_j's gradient also takes R's rows of it
            t = (grad * out).sum(1) @ consts.seg                                # (G, m)
            dstd = (t * s).mul_(consts.neg_norms).masked_fill_(den < DEN_MIN, 0)
            sig_dof = sig_dof.view(g, m, 2)
            coef = (dstd[:, :, None] / sig_dof).masked_fill_(sig_dof == 0, 0)   # (G, m, 2)
            needs = ctx.needs_input_grad[2:]
            per_kind: List = []
            for j, (a, b) in enumerate(consts.bounds):
                x, y = stacks[2 * j], stacks[2 * j + 1]
                gx = torch.addcmul(grad[:, :, a:b] * s[:, j, None, None],
                                   x - x.mean(dim=(1, 2), keepdim=True),
                                   coef[:, j, 0, None, None])
                gy = torch.addcmul(grad_right[:, a:b], y - y.mean(dim=(1, 2), keepdim=True),
                                   coef[:, j, 1, None, None])
                per_kind += [gx, gy]
            grads: List = [None, None]
            for k, stacked in enumerate(per_kind):
                grads += [part if need else None for part, need in
                          zip(stacked.unbind(0), needs[k * g:(k + 1) * g])]
            return tuple(grads)


def _constants(terms: Sequence[tuple], like: torch.Tensor) -> _Constants:
    norms = tuple(k for _, _, k in terms)
    counts = tuple(t.numel() for x, y, _ in terms for t in (x, y))
    widths = tuple(x.shape[1] for x, _, _ in terms)
    key = (norms, counts, widths, like.device, like.dtype)
    consts = _CONSTANTS.get(key)
    if consts is None:
        consts = _CONSTANTS[key] = _Constants(norms, counts, widths, like)
    return consts


class StackedOffsetProducts(torch.autograd.Function):
    """The low-rank offsets' part of ``G`` pairs' partner products, as ``(G, ...)``:
    ``(Bs R2^T) L2^T`` (``index`` 0) or ``R1^T (L1^T As)`` (``index`` 1). Inputs:
    ``index``, then the ``G`` pairs' ``Bs`` (or ``As``), their offsets' ``L`` and their
    ``R`` (each pair's own tensors; the offsets take no gradient). Two batched GEMMs each
    way; the offsets are stacked again in the backward pass rather than kept, so
    autograd holds no copies of them."""

    @staticmethod
    def forward(ctx, index: int, *tensors: torch.Tensor) -> torch.Tensor:
        g = len(tensors) // 3
        shared, left, right = (torch.stack(tensors[k * g:(k + 1) * g]) for k in range(3))
        ctx.index = index
        ctx.save_for_backward(*tensors[g:])
        if index == 0:
            return (shared @ right.transpose(1, 2)) @ left.transpose(1, 2)
        return right.transpose(1, 2) @ (left.transpose(1, 2) @ shared)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        offsets = ctx.saved_tensors
        g = len(offsets) // 2
        with torch.autocast(device_type=grad.device.type, enabled=False):
            left, right = torch.stack(offsets[:g]), torch.stack(offsets[g:])
            grad = grad.to(left.dtype)
            # as autograd would: d(Bs) = (dU L2) R2; d(As) = L1 (R1 dU)
            shared = (grad @ left) @ right if ctx.index == 0 else left @ (right @ grad)
        return (None, *shared.unbind(0)) + (None,) * (2 * g)


def _partner_products(pairs: Sequence[CoLoRAPair], index: int,
                      dtype: torch.dtype) -> List[torch.Tensor]:
    """Each pair's partner product of side ``index`` (``Bs W2p^T`` for W1', ``W1p^T As``
    for W2'): the base weight's product pair by pair (each reads its own weight), the
    low-rank offsets' products of all pairs batched (:class:`StackedOffsetProducts`),
    added in :meth:`~.colora_pair.CoLoRAPair._partner_product`'s order."""
    other = 1 - index
    products = torch.stack([p._partner_product(index, dtype, offset=False) for p in pairs])
    offsets = [p.offset(other) for p in pairs]
    if offsets[0][0].shape[1]:
        shared = [(p.As if index else p.Bs).to(dtype) for p in pairs]
        products = products + StackedOffsetProducts.apply(
            index, *shared, *(l.to(dtype) for l, _ in offsets),
            *(r.to(dtype) for _, r in offsets))
    return list(products.unbind(0))


def stacked_factors(pairs: Sequence[CoLoRAPair], index: int) -> List[tuple]:
    """Side ``index``'s ``(L, R)`` of every pair of ``pairs`` (pairs of one shape, dtype
    and device, each with both parts and both layers), formed together: each pair's the
    values of its own :meth:`~.colora_pair.CoLoRAPair.factors` up to rounding, as views
    of one stack."""
    bad = [p for p in pairs if not (p.rl and p.rs) or None in p._layers]
    if bad:
        raise ValueError(
            'stacked_factors: pairs stack only with both parts (0 < share_ratio < 1) and '
            'both layers injected; ' + ', '.join(
                f'{p.where or type(p).__name__} has rl={p.rl}, rs={p.rs}, layers '
                f'{[layer is not None for layer in p._layers]}' for p in bad)
            + '. Leave such pairs out (pair_groups() does).')
    first = pairs[0]
    with no_autocast(first.As.device):
        dtype = first._compute_dtype()
        products = _partner_products(pairs, index, dtype)
        terms = [pair._terms(index, dtype, partner_product=c)
                 for pair, c in zip(pairs, products)]
        # term by term, every pair's X_j, then every pair's Y_j
        tensors = [t[j][i] for j in range(2) for i in range(2) for t in terms]
        left, right = StackedScaledColumns.apply(_constants(terms[0], tensors[0]), 2,
                                                 *tensors)
    return list(zip(left.unbind(0), right.unbind(0)))


def _shape_key(pair: CoLoRAPair) -> tuple:
    params = (pair.A1, pair.B1, pair.A2, pair.B2, pair.As, pair.Bs)
    bases = [layer.weight for layer in pair._layers]
    return (pair.d, pair.d_mid, pair.d_out, pair.rl, pair.rs, pair.n,
            pair.partner_l1.shape[1], pair.partner_l2.shape[1], pair.As.device,
            tuple((p.dtype, p.requires_grad) for p in params),
            tuple((b.dtype, b.requires_grad) for b in bases))


def _stackable(pair: CoLoRAPair) -> bool:
    return (pair.training and pair.rl > 0 and pair.rs > 0
            and pair._legacy_partners is None
            and all(layer is not None for layer in pair._layers)
            and any(p.requires_grad for p in (pair.A1, pair.B1, pair.A2, pair.B2,
                                               pair.As, pair.Bs)))


def _pairs(module: nn.Module) -> Iterator[CoLoRAPair]:
    """The CoLoRA pairs under ``module``, each once, in module order (a plain walk of
    the module tree: :meth:`nn.Module.modules` costs a few milliseconds a step on a
    large backbone)."""
    seen, todo = set(), [module]
    while todo:
        sub = todo.pop()
        if isinstance(sub, CoLoRAPair):
            if id(sub) not in seen:
                seen.add(id(sub))
                yield sub
            continue
        todo.extend(reversed([m for m in sub._modules.values() if m is not None]))


def pair_groups(module: nn.Module) -> List[List[CoLoRAPair]]:
    """The pairs of ``module`` whose factors a training forward pass forms together,
    grouped by shape (groups of two or more, in module order)."""
    groups: 'OrderedDict[tuple, List[CoLoRAPair]]' = OrderedDict()
    for pair in _pairs(module):
        if _stackable(pair):
            groups.setdefault(_shape_key(pair), []).append(pair)
    # the pairs of a group share what decides the CPU's C++ node: ask the first
    return [g for g in groups.values() if len(g) > 1
            and not g[0].one_node_applies(0) and not g[0].one_node_applies(1)]


@contextlib.contextmanager
def pair_factors_stacked(module: nn.Module) -> Iterator[None]:
    """Within this context, a training forward pass of ``module`` takes the factors of
    its equal-shaped CoLoRA pairs formed together (see the module doc); outside it, or
    where it does not apply, nothing changes. Usage::

        with pair_factors_stacked(backbone):
            outs = backbone(x)
    """
    if not (module.training and torch.is_grad_enabled()) or compiling() \
            or torch.jit.is_tracing() or torch.jit.is_scripting() or not enabled():
        yield
        return
    formed: List[CoLoRAPair] = []
    try:
        for group in pair_groups(module):
            formed += group
            for index in (0, 1):
                for pair, lr in zip(group, stacked_factors(group, index)):
                    pair._stacked[index] = lr
        yield
    finally:
        for pair in formed:
            pair._stacked = [None, None]
