r"""The range-kernel filter of CoLoRA (Eq. 11 of the CoLoRA paper, appendix C).

A bilateral-type filter (Eq. 7) with a Gaussian spatial kernel ``G`` and the range kernel
``k_r(x, y) = cos(gamma_c (x - y)) = cos(gamma_c x) cos(gamma_c y) + sin(gamma_c x)
sin(gamma_c y)``, which turns the double loop into four depthwise convolutions::

    T_c     = max_hw z_c - min_hw z_c  (clamped >= 1e-5),   gamma_c = pi / (2 T_c)
    cz, sz  = cos(gamma_c z), sin(gamma_c z)                 (range weights, no gradient)
    Filter(z) = (cz * G(cz z) + sz * G(sz z)) / (cz * G(cz) + sz * G(sz) + eps)   (11)

``gamma_c`` keeps ``gamma_c (x - y)`` inside ``[-pi/2, pi/2]``, so every range weight is
non-negative. ``G`` is a normalised Gaussian (window 11, sigma 1, centre (k-1)/2) with
reflect padding; it is separable, so the fast path runs two 1-D passes (2k taps instead
of k^2). Gradients reach ``z`` through the numerator only.

Precision: the range statistics and weights (``T_c``, ``gamma_c``, ``cos``, ``sin``),
the normaliser and the blurs run in ``max(float32, input dtype)`` with autocast off,
whatever the autocast dtype: in float16 a constant or near-constant channel
(``T_c`` below about 2.4e-5) makes ``gamma_c`` overflow. The output is cast back to the
input's dtype. float64 inputs are filtered in float64 throughout.

Inference on the CPU (no gradient needed) runs the whole filter as one C++ call
(:func:`colora_mm.adapters.up3x3.range_filter`: the same sums, direct 11-tap passes,
float32 rounding apart), in float32: a bfloat16 or float16 map (autocast) is cast to
float32 for it and the result back, as the PyTorch path does. Elsewhere each 1-D pass
(reflect padding included) is a fixed linear map along one axis, so the fast path
applies it as a matrix product, ``x @ G_w`` and ``G_h^T @ x``: PyTorch's CPU
depthwise convolution runs 1-D kernels at a fraction of its 2-D throughput, a GEMM
does not. Axes up to :data:`DENSE_AXIS_MAX` use the full ``m x m`` band matrix; longer
axes are cut into blocks of :data:`AXIS_BLOCK` outputs that each read ``block + k - 1``
inputs, so the work stays linear in the axis length.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import up3x3
from .lowrank import compiling

# input dtypes the C++ inference call serves (the lower two cast to float32 for it)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def gaussian_kernel1d(window: int = 11, sigma: float = 1.0,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian centred at ``(window - 1) / 2`` (computed in float64)."""
    x = torch.arange(window, dtype=torch.float64) - (window - 1) / 2.0
    g = torch.exp(-x ** 2 / (2.0 * sigma ** 2))
    return (g / g.sum()).to(dtype)


def reflect_indices(n: int, pad: int, device=None) -> torch.Tensor:
    """Indices of a reflect-padded axis (edge not repeated, like ``F.pad(mode='reflect')``)
    for any ``pad``: positions beyond one reflection keep bouncing (period ``2(n-1)``),
    so feature maps smaller than the window are handled exactly."""
    pos = torch.arange(-pad, n + pad, device=device)
    if n == 1:
        return torch.zeros_like(pos)
    period = 2 * (n - 1)
    m = pos.remainder(period)
    return torch.where(m >= n, period - m, m)


#: Axes up to this length are blurred with one dense ``m x m`` matrix.
DENSE_AXIS_MAX = 256
#: Outputs per block on longer axes.
AXIS_BLOCK = 32


def axis_operator(kernel: torch.Tensor, n: int) -> torch.Tensor:
    """``(n, n)`` matrix ``M`` with ``(x @ M)[j] = sum_t kernel[t] x[reflect(j + t - p)]``:
    one reflect-padded 1-D pass on an axis of length ``n``."""
    k = kernel.numel()
    pad = k // 2
    src = reflect_indices(n, pad, kernel.device)               # padded position -> index
    out = torch.arange(n, device=kernel.device)
    op = torch.zeros(n, n, dtype=kernel.dtype, device=kernel.device)
    for t in range(k):
        op.index_put_((src[out + t], out), kernel[t].expand(n), accumulate=True)
    return op


def band_operator(kernel: torch.Tensor, block: int) -> torch.Tensor:
    """``(block + k - 1, block)`` band: ``block`` outputs from their padded window."""
    k = kernel.numel()
    op = torch.zeros(block + k - 1, block, dtype=kernel.dtype, device=kernel.device)
    for j in range(block):
        op[j:j + k, j] = kernel
    return op


def reflect_pad2d(x: torch.Tensor, pad: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    x = x.index_select(-2, reflect_indices(h, pad, x.device))
    return x.index_select(-1, reflect_indices(w, pad, x.device))


class RangeKernelFilter(nn.Module):
    """Eq. 11 on ``(N, C, H, W)`` features, per sample and channel.

    Args:
        window (int): Gaussian window size. Defaults to 11.
        sigma (float): Gaussian standard deviation. Defaults to 1.0.
        eps (float): Added to the normaliser. Defaults to 1e-5.
        separable (bool): Two 1-D passes (fast path) instead of one 2-D pass.
            Defaults to True.
    """

    def __init__(self, window: int = 11, sigma: float = 1.0, eps: float = 1e-5,
                 separable: bool = True) -> None:
        super().__init__()
        if window % 2 != 1:
            raise ValueError(f'RangeKernelFilter: window={window} must be odd.')
        self.window, self.sigma, self.eps = window, sigma, eps
        self.separable = separable
        # Fixed tensors, derived from (window, sigma) in float64 on first use per
        # device and dtype; never part of the model's state, never cast by .half().
        self._kernels: Dict[Tuple, torch.Tensor] = {}
        # Axis operators of the separable path, built on first use per length, device
        # and dtype.
        self._operators: Dict[Tuple, torch.Tensor] = {}

    def kernel1d(self, like: torch.Tensor) -> torch.Tensor:
        """The 1-D Gaussian on ``like``'s device, in its dtype."""
        key = (like.device, like.dtype)
        k = self._kernels.get(key)
        if k is None:
            k = gaussian_kernel1d(self.window, self.sigma, torch.float64).to(
                device=like.device, dtype=like.dtype)
            if type(like) is torch.Tensor and like.device.type != 'meta':
                self._kernels[key] = k
        return k

    def _operator(self, n: int, like: torch.Tensor) -> torch.Tensor:
        blocked = n > DENSE_AXIS_MAX
        key = (n if not blocked else -AXIS_BLOCK, like.device, like.dtype)
        op = self._operators.get(key)
        if op is None:
            kernel = gaussian_kernel1d(self.window, self.sigma, torch.float64).to(
                like.device)
            op = (band_operator(kernel, AXIS_BLOCK) if blocked
                  else axis_operator(kernel, n)).to(like.dtype)
            # Only plain tensors are kept: one built while tracing (fake or meta
            # tensors) must not be served to a later real forward pass.
            if type(like) is torch.Tensor and type(op) is torch.Tensor \
                    and like.device.type != 'meta':
                self._operators[key] = op
        return op

    def _blur_last(self, x: torch.Tensor) -> torch.Tensor:
        """The reflect-padded 1-D Gaussian along the last axis."""
        n = x.shape[-1]
        op = self._operator(n, x)
        if n <= DENSE_AXIS_MAX:
            return x @ op
        pad = self.window // 2
        blocks = -(-n // AXIS_BLOCK)
        # Reflect padding (n > DENSE_AXIS_MAX > pad: one reflection suffices), then zeros
        # up to whole blocks: those only feed outputs that are cut off below.
        lead = x.shape[:-1]
        x = F.pad(x.reshape(1, -1, n), (pad, pad), mode='reflect')
        x = F.pad(x, (0, blocks * AXIS_BLOCK - n))
        windows = x.unfold(-1, AXIS_BLOCK + 2 * pad, AXIS_BLOCK)
        # One 2-D GEMM over every window (a broadcast batched matmul is far slower).
        out = windows.reshape(-1, AXIS_BLOCK + 2 * pad) @ op
        return out.view(*lead, blocks * AXIS_BLOCK)[..., :n]

    def _blur_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The reflect-padded 1-D Gaussian along the second-to-last axis."""
        n, w = x.shape[-2:]
        op = self._operator(n, x)
        if n <= DENSE_AXIS_MAX:
            return op.t() @ x
        pad = self.window // 2
        blocks = -(-n // AXIS_BLOCK)
        lead = x.shape[:-2]
        x = F.pad(x.reshape(1, -1, n, w), (0, 0, pad, pad), mode='reflect')
        x = F.pad(x, (0, 0, 0, blocks * AXIS_BLOCK - n)).reshape(-1, x.shape[-2] + (
            blocks * AXIS_BLOCK - n), w)
        # Overlapping row windows (batch, blocks, block + k - 1, w), as a strided view;
        # op^T @ window gives each block's rows already in place: no transposes.
        b, rows, _ = x.shape
        windows = x.as_strided((b, blocks, AXIS_BLOCK + 2 * pad, w),
                               (rows * w, AXIS_BLOCK * w, w, 1))
        out = op.t() @ windows
        return out.view(*lead, blocks * AXIS_BLOCK, w)[..., :n, :]

    def gaussian(self, x: torch.Tensor) -> torch.Tensor:
        """Depthwise Gaussian blur ``G`` with reflect padding, on every channel of x."""
        if self.separable:
            return self._blur_rows(self._blur_last(x))
        c = x.shape[1]
        k = self.kernel1d(x)
        x = reflect_pad2d(x, self.window // 2)
        k2 = torch.outer(k, k)
        return F.conv2d(x, k2.expand(c, 1, -1, -1), groups=c)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 4:
            raise ValueError(f'RangeKernelFilter expects (N, C, H, W), got {tuple(z.shape)}.')
        if (self.separable and z.device.type == 'cpu' and z.dtype in KERNEL_DTYPES
                and not (torch.is_grad_enabled() and z.requires_grad)):
            # inference on the CPU: one C++ call (colora_mm/adapters/up3x3.py), in
            # float32 as every path here computes; a bfloat16 / float16 map is cast to
            # float32 for it and the result back to the map's dtype
            zc = z if z.dtype == torch.float32 else z.float()
            out = up3x3.range_filter(zc, self.kernel1d(zc), self.eps)
            if out is not None:
                return out.to(z.dtype)     # itself in float32
        dtype = torch.promote_types(z.dtype, torch.float32)
        with torch.autocast(device_type=z.device.type, enabled=False):
            zc = z.to(dtype)
            out = self._forward_2d(zc) if not self.separable else self._forward_separable(zc)
        return out.to(z.dtype)

    def _forward_separable(self, z: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and z.requires_grad):
            with torch.no_grad():
                maps = self._range_weights(z, extra=2)
                weights = maps[:2]
                # the numerators' inputs (cos z, sin z) follow the weights and the four
                # maps are blurred in one call
                torch.mul(weights, z, out=maps[2:])
                blurred = self.gaussian(maps).view((2, 2) + z.shape)
                den, num = (blurred * weights).sum(1)     # cos G(cos) + sin G(sin), ...
                return num.div_(den.add_(self.eps))
        if _graph_transform():
            weights, den = self._weights_and_normaliser(z)
            return self._numerator(z, weights) / den
        return _SeparableFilter.apply(z, self)

    def _range_weights(self, z: torch.Tensor, extra: int = 0) -> torch.Tensor:
        """``(2 + extra, *z.shape)``: the range weights ``cos(gamma z)``,
        ``sin(gamma z)`` stacked on a leading axis, then ``extra`` maps left empty."""
        with torch.no_grad():
            low, high = torch.aminmax(z.flatten(2), dim=-1)
            gamma = (math.pi / 2.0) / (high - low).clamp_min(1e-5)
            gz = z.detach() * gamma[..., None, None]
            maps = torch.empty((2 + extra,) + z.shape, dtype=z.dtype, device=z.device)
            torch.cos(gz, out=maps[0])
            torch.sin(gz, out=maps[1])
        return maps

    def _weights_and_normaliser(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The range weights and the normaliser ``cos G(cos) + sin G(sin) + eps``, no
        gradient."""
        with torch.no_grad():
            weights = self._range_weights(z)
            den = (self.gaussian(weights) * weights).sum(0).add_(self.eps)
        return weights, den

    def _numerator(self, z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``cos G(cos z) + sin G(sin z)``, the gradient path (one blur call); the
        weights carry no gradient."""
        return (self.gaussian(weights * z) * weights).sum(0)

    def _forward_2d(self, z: torch.Tensor) -> torch.Tensor:
        """Eq. 11 with the 2-D Gaussian: the reference path, as the paper writes it."""
        c = z.shape[1]
        with torch.no_grad():
            flat = z.flatten(2)
            t = (flat.amax(-1) - flat.amin(-1)).clamp_min(1e-5)
            gamma = (math.pi / (2.0 * t))[..., None, None]
            cz, sz = torch.cos(gamma * z), torch.sin(gamma * z)
        # One depthwise call for the four maps: numerators (with grad) and normalisers.
        blurred = self.gaussian(torch.cat([cz * z, sz * z, cz, sz], dim=1))
        g_cz_z, g_sz_z, g_cz, g_sz = blurred.split(c, dim=1)
        num = cz * g_cz_z + sz * g_sz_z
        den = cz * g_cz + sz * g_sz + self.eps
        return num / den

    def extra_repr(self) -> str:
        return (f'window={self.window}, sigma={self.sigma}, eps={self.eps}, '
                f'separable={self.separable}')


def _graph_transform() -> bool:
    """Whether the training path must run op by op, not as :class:`_SeparableFilter`:
    under ``torch.compile`` (AOTAutograd derives the backward and chooses what to keep),
    TorchScript tracing (which would record the op as one Python call: no export, no
    FLOPs counted) and ``torch.func`` transforms (which the op's recomputing backward
    does not serve)."""
    if compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    active = getattr(torch._C, '_are_functorch_transforms_active', None)
    return bool(active is not None and active())


class _SeparableFilter(torch.autograd.Function):
    """Eq. 11's separable path with a gradient, keeping only ``z`` for backward.

    Run by autograd op by op, the path would keep the range weights (two maps of ``z``'s
    size, for the numerator's products) and the normaliser (one more, for the division)
    from forward to backward. Here the backward pass forms both again from ``z`` (the
    same ops on the same input: the same values bit for bit) and differentiates the
    numerator's ops as autograd would, so the gradient is the op-by-op path's bit for
    bit, at the cost of the weights, the normaliser and the numerator's blur once more
    (the filter's forward pass again, a few ms of a UperNet + ConvNeXt-T 256 training
    step). Gradients reach ``z`` through the numerator only, as in every path here; a
    backward pass that records a graph (``create_graph=True``) records the input
    gradient's, which is linear in the output gradient. Where :func:`_graph_transform`
    says so, the ops run as they are."""

    @staticmethod
    def forward(ctx, z, module):
        weights, den = module._weights_and_normaliser(z)
        out = module._numerator(z, weights) / den
        ctx.module = module
        ctx.save_for_backward(z)
        return out

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        module = ctx.module
        # in z's precision as the forward pass ran, also where backward() is called
        # inside an autocast region
        with torch.autocast(device_type=z.device.type, enabled=False):
            weights, den = module._weights_and_normaliser(z)
            with torch.enable_grad():
                leaf = z.detach().requires_grad_()
                out = module._numerator(leaf, weights) / den
            (grad_z,) = torch.autograd.grad(out, leaf, grad.to(out.dtype),
                                            create_graph=torch.is_grad_enabled())
        return grad_z, None
