r"""CoLoRA's spatial low-rank branch (Eqs. 7-11 of the CoLoRA paper).

A branch parallel to a spatial convolution, fed by that convolution's input::

    out = conv(x) + scale * B(F(A(x))),     F(z) = z + lambda * Filter(z)

``A`` (1x1, ``C_in -> r``, kaiming-uniform) compresses, ``Filter`` (Eq. 11) smooths the
``r`` compressed channels only, ``B`` (zero-initialised) expands back. Two styles:

* ``'depthwise'`` (ConvNeXt's 7x7 depthwise conv): ``B`` is a 3x3 conv ``r -> C`` with
  ``groups = r`` (C divisible by r), ``scale = 1``. Cross-channel, so it never folds into
  the depthwise kernel. On the CPU (float32) it runs as a C++ kernel with a one-pass
  backward, elsewhere as PyTorch's grouped convolution (:mod:`.up3x3`;
  ``benchmarks/bench_colora.py --only spatial`` measures both).
* ``'dense'`` (ResNet's 3x3 ``conv2``): ``B`` is a 1x1 conv ``r -> C_out`` carrying the
  conv's stride, ``scale = 0.5``. Without the filter ``B A`` is a strided 1x1 conv and
  folds exactly into the centre tap of the 3x3 kernel.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .base import AdaptedLayer, Adapter, NotFoldableError, compute_dtype, no_autocast
from .filter import RangeKernelFilter
from .init import init_a_
from .up3x3 import GroupedUp3x3

SPATIAL_STYLES = ('depthwise', 'dense')


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


def check_same_padding(layer: AdaptedLayer) -> None:
    """Raise unless ``layer`` keeps the size of what it reads ("same" padding, odd
    kernel): the branch (1x1 or 3x3 at the conv's stride) gives maps of that size, and
    the two add up only where the conv's match them at every input size."""
    k, p, d = tuple(layer.kernel_size), layer.padding, tuple(layer.dilation)
    odd = all(ki % 2 for ki in k)
    same = p == 'same' or (not isinstance(p, str) and all(
        2 * pi == di * (ki - 1) for ki, pi, di in zip(k, p, d)))
    if odd and same:
        return
    want = tuple(di * (ki - 1) // 2 for ki, di in zip(k, d))
    fix = (f'give the conv padding={want} (or "same")' if odd else
           'an even kernel has no centre to align the branch with')
    raise ValueError(f'{layer.describe()}: padding={p!r}, dilation={d}: the conv does not '
                     'keep its input\'s size, so its output cannot take the spatial '
                     f'branch\'s (which does); {fix}, or leave this layer out of '
                     '`spatial`.')


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
        check_same_padding(layer)
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
            self.up = GroupedUp3x3(rank, c_out, 3, stride=layer.stride, padding=1,
                                   groups=rank, bias=False)
            self.scale = 1.0 if scale is None else scale
        else:
            self.up = nn.Conv2d(rank, c_out, 1, stride=layer.stride, bias=False)
            self.scale = 0.5 if scale is None else scale
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

    def branch(self, layer: AdaptedLayer, x: torch.Tensor,
               into: Optional[torch.Tensor] = None) -> torch.Tensor:
        z = self.down(x)
        if self.filter is not None:
            z = torch.add(z, self.filter(z), alpha=self.filter_lambda)
        # the scale goes on the r compressed channels (B is linear), not on the
        # C x H x W output; the depthwise style's scale 1 costs nothing
        z = z if self.scale == 1 else self.scale * z
        if into is not None and self.style == 'depthwise':
            return self.up(z, into)     # ``into`` itself where it could add in place
        return self.up(z)

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
