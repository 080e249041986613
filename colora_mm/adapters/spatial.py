r"""CoLoRA's spatial low-rank branch (Eqs. 7-11 of the CoLoRA paper).

A branch parallel to a spatial convolution, fed by that convolution's input::

    out = conv(x) + scale * B(F(A(x))),     F(z) = z + lambda * Filter(z)

``A`` (1x1, ``C_in -> r``, kaiming-uniform) compresses, ``Filter`` (Eq. 11) smooths the
``r`` compressed channels only, ``B`` (zero-initialised) expands back. Two styles:

* ``'depthwise'`` (ConvNeXt's 7x7 depthwise conv): ``B`` is a 3x3 conv ``r -> C`` with
  ``groups = r`` (C divisible by r), ``scale = 1``. Cross-channel, so it never folds into
  the depthwise kernel. Each group reads one channel, so on the CPU it runs as the 9
  taps of each compressed channel times a ``(C/r x 9)`` matrix per group (one batched
  matmul, :func:`grouped_up_conv`), which PyTorch's CPU grouped-convolution kernels
  do not match; CUDA runs the grouped convolution itself (cuDNN).
* ``'dense'`` (ResNet's 3x3 ``conv2``): ``B`` is a 1x1 conv ``r -> C_out`` carrying the
  conv's stride, ``scale = 0.5``. Without the filter ``B A`` is a strided 1x1 conv and
  folds exactly into the centre tap of the 3x3 kernel.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import AdaptedLayer, Adapter, NotFoldableError, compute_dtype, no_autocast
from .filter import RangeKernelFilter
from .init import init_a_

SPATIAL_STYLES = ('depthwise', 'dense')


def _pairs(v) -> tuple:
    return (v, v) if isinstance(v, int) else tuple(v)


class _GroupedUpConv(torch.autograd.Function):
    """Forward and backward of a one-channel-per-group convolution as unfolded taps
    times per-group weights; backward unfolds ``z`` again rather than keeping the
    ``k*k`` times larger unfolded copy."""

    @staticmethod
    def forward(ctx, z, weight, stride, padding):
        n, r, h, w = z.shape
        c, _, kh, kw = weight.shape
        out_hw = [(size + 2 * p - k) // s + 1 for size, p, k, s in
                  zip((h, w), padding, (kh, kw), stride)]
        cols = F.unfold(z, (kh, kw), padding=padding, stride=stride)
        cols = cols.view(n, r, kh * kw, out_hw[0] * out_hw[1])
        out = torch.matmul(weight.view(r, c // r, kh * kw), cols)      # (N, r, C/r, L)
        ctx.save_for_backward(z, weight)
        ctx.stride, ctx.padding = stride, padding
        return out.view(n, c, *out_hw)

    @staticmethod
    def backward(ctx, grad):
        z, weight = ctx.saved_tensors
        n, r, h, w = z.shape
        c, _, kh, kw = weight.shape
        g = grad.reshape(n, r, c // r, -1)
        grad_z = grad_w = None
        if ctx.needs_input_grad[1]:
            cols = F.unfold(z, (kh, kw), padding=ctx.padding, stride=ctx.stride)
            cols = cols.view(n, r, kh * kw, -1)
            grad_w = (g @ cols.transpose(-1, -2)).sum(0).view_as(weight)
        if ctx.needs_input_grad[0]:
            grad_cols = weight.view(r, c // r, kh * kw).transpose(-1, -2) @ g
            grad_z = F.fold(grad_cols.reshape(n, r * kh * kw, -1), (h, w), (kh, kw),
                            padding=ctx.padding, stride=ctx.stride)
        return grad_z, grad_w, None, None


def grouped_up_conv(z: torch.Tensor, weight: torch.Tensor, stride=1,
                    padding=1) -> torch.Tensor:
    """``conv2d(z, weight, groups=r)`` for ``z (N, r, H, W)`` and ``weight (C, 1, k, k)``
    (one input channel per group): each channel's ``k*k`` taps (``unfold``) times its
    group's ``(C/r x k*k)`` weights, as one broadcast batched matmul. Exact (the same sums
    in another order); used on the CPU. Keeps only ``z`` and the weight for backward."""
    return _GroupedUpConv.apply(z, weight, _pairs(stride), _pairs(padding))


def spatial_style(layer: AdaptedLayer) -> str:
    """``'depthwise'`` or ``'dense'`` for a spatial conv; raises for anything else."""
    if not layer.is_conv or tuple(layer.kernel_size) == (1, 1):
        raise ValueError(f'{layer.describe()}: the spatial branch adapts k x k convs '
                         '(k > 1); pointwise layers take a pair or a pointwise adapter.')
    if layer.groups == 1:
        return 'dense'
    if layer.groups == layer.in_channels == layer.out_channels:
        return 'depthwise'
    raise ValueError(f'{layer.describe()}: grouped conv with groups={layer.groups} is '
                     'neither dense (groups=1) nor depthwise (groups=channels); the '
                     'spatial branch does not support it. Leave this layer out of '
                     '`spatial`.')


class UpProjection(nn.Conv2d):
    """The depthwise style's ``B``: a 3x3 conv ``r -> C`` with ``groups=r`` (one input
    channel per group), run by :func:`grouped_up_conv` on the CPU and by the grouped
    convolution elsewhere. Same parameters and state-dict keys as ``nn.Conv2d``."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.device.type != 'cpu':
            return super().forward(z)
        weight = self.weight
        if torch.is_autocast_enabled('cpu'):
            dtype = torch.get_autocast_dtype('cpu')
            z, weight = z.to(dtype), weight.to(dtype)
        elif weight.dtype != z.dtype:
            weight = weight.to(z.dtype)
        return grouped_up_conv(z, weight, self.stride, self.padding)


class SpatialLowRankBranch(Adapter):
    """Low-rank branch parallel to a spatial conv, optionally with the range filter.

    Args:
        layer (AdaptedLayer): The wrapped spatial conv (shapes, stride).
        rank (int): Compressed width ``r``.
        use_filter (bool): Apply ``F(z) = z + lambda * Filter(z)``. Defaults to True.
        filter_lambda (float): ``lambda``. Defaults to 0.2.
        scale (float, optional): Branch scale; defaults to 1 (depthwise) or 0.5 (dense).
    """

    method = 'colora'

    def __init__(self, layer: AdaptedLayer, rank: int, use_filter: bool = True,
                 filter_lambda: float = 0.2, scale: Optional[float] = None) -> None:
        super().__init__()
        self.style = spatial_style(layer)
        c_in, c_out = layer.in_channels, layer.out_channels
        if rank <= 0:
            raise ValueError(f'{layer.describe()}: spatial rank r={rank}; raise the width '
                             'or lower gamma so that r = C // gamma >= 1.')
        self.rank = rank
        self.down = nn.Conv2d(c_in, rank, 1, bias=False)
        if self.style == 'depthwise':
            if c_out % rank:
                raise ValueError(
                    f'{layer.describe()}: depthwise style needs C={c_out} divisible by '
                    f'r={rank} (B is a 3x3 conv with groups=r); pick gamma so that '
                    f'C // gamma divides C.')
            self.up = UpProjection(rank, c_out, 3, stride=layer.stride, padding=1,
                                   groups=rank, bias=False)
            self.scale = 1.0 if scale is None else scale
        else:
            self.up = nn.Conv2d(rank, c_out, 1, stride=layer.stride, bias=False)
            self.scale = 0.5 if scale is None else scale
            k, p, d = layer.kernel_size, layer.padding, layer.dilation
            if any(pi != di * (ki - 1) // 2 for ki, pi, di in zip(k, p, d)):
                raise ValueError(f'{layer.describe()}: padding={p} is not "same" for '
                                 f'kernel {k}, dilation {d}; the dense branch needs it.')
        self.use_filter = use_filter
        self.filter_lambda = filter_lambda
        self.filter = RangeKernelFilter() if use_filter else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init_a_(self.down.weight, self.down.in_channels)
        self.up.weight.zero_()

    def num_trainable(self) -> int:
        return self.down.weight.numel() + self.up.weight.numel()

    def branch(self, layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor:
        z = self.down(x)
        if self.filter is not None:
            z = z + self.filter_lambda * self.filter(z)
        return self.scale * self.up(z)

    @property
    def foldable(self) -> bool:
        return self.style == 'dense' and self.filter is None

    def fold_delta(self, layer: AdaptedLayer) -> torch.Tensor:
        if not self.foldable:
            why = ('the range filter is non-linear' if self.filter is not None else
                   'the branch mixes channels while the depthwise conv cannot')
            raise NotFoldableError(f'{layer.describe()}: the spatial branch cannot fold '
                                   f'({why}); it stays as a small branch.')
        dtype = compute_dtype(self.up.weight, layer.weight)
        with no_autocast(layer.weight.device):
            w = self.scale * (self.up.weight.flatten(1).to(dtype)
                              @ self.down.weight.flatten(1).to(dtype))   # (C_out, C_in)
        delta = torch.zeros_like(layer.weight, dtype=dtype)
        kh, kw = layer.kernel_size
        delta[:, :, kh // 2, kw // 2] = w
        return delta

    def extra_repr(self) -> str:
        return (f'style={self.style!r}, rank={self.rank}, scale={self.scale}, '
                f'use_filter={self.use_filter}, lambda={self.filter_lambda}')
