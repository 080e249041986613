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
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def gaussian_kernel1d(window: int = 11, sigma: float = 1.0) -> torch.Tensor:
    """Normalised 1-D Gaussian centred at ``(window - 1) / 2``."""
    x = torch.arange(window, dtype=torch.float64) - (window - 1) / 2.0
    g = torch.exp(-x ** 2 / (2.0 * sigma ** 2))
    return (g / g.sum()).float()


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
        # Fixed tensors: not part of the model's state.
        self.register_buffer('kernel1d', gaussian_kernel1d(window, sigma),
                             persistent=False)

    def gaussian(self, x: torch.Tensor) -> torch.Tensor:
        """Depthwise Gaussian blur ``G`` with reflect padding, on every channel of x."""
        c = x.shape[1]
        k = self.kernel1d.to(x.dtype)
        pad = self.window // 2
        x = reflect_pad2d(x, pad)
        if self.separable:
            x = F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
            return F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        k2 = torch.outer(k, k)
        return F.conv2d(x, k2.expand(c, 1, -1, -1), groups=c)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 4:
            raise ValueError(f'RangeKernelFilter expects (N, C, H, W), got {tuple(z.shape)}.')
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
