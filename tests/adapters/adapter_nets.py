"""Tiny networks and float64 references shared by the adapter tests.

The references here are written from the equations (the appendix's Eqs. 7-15), never
from the package's helpers, so that a test comparing the
two fails when the package's math is wrong.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from colora_mm.adapters import is_adapter_name


# ---------------------------------------------------------------- tiny networks
class LinearPairNet(nn.Module):
    """``fc1 (d -> d') -> GELU -> fc2 (d' -> d'')`` on ``(N, d)`` inputs."""

    pairs = [('fc1', 'fc2')]
    spatial: list = []

    def __init__(self, d: int = 12, d_mid: int = 20, d_out: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, d_mid)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_mid, d_out)
        self.in_shape = (5, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ConvPairNet(nn.Module):
    """Two chained 1x1 convs (the second without bias) on ``(N, d, H, W)``."""

    pairs = [('conv1', 'conv2')]
    spatial: list = []

    def __init__(self, d: int = 12, d_mid: int = 20, d_out: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(d, d_mid, 1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(d_mid, d_out, 1, bias=False)
        self.in_shape = (2, d, 3, 4)

    def forward(self, x):
        return self.conv2(self.act(self.conv1(x)))


class MixedPairNet(nn.Module):
    """A ``nn.Linear`` on channels-last features feeding a 1x1 conv (a mixed pair)."""

    pairs = [('fc', 'conv')]
    spatial: list = []

    def __init__(self, d: int = 12, d_mid: int = 20, d_out: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d_mid)
        self.conv = nn.Conv2d(d_mid, d_out, 1)
        self.in_shape = (2, 3, 4, d)           # NHWC

    def forward(self, x):
        y = torch.tanh(self.fc(x))
        return self.conv(y.permute(0, 3, 1, 2))   # NHWC -> NCHW


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block: depthwise 7x7, LayerNorm, pwconv1 (C -> 4C), GELU, pwconv2,
    layer scale ``gamma``, residual."""

    pairs = [('pwconv1', 'pwconv2')]
    spatial = ['dwconv']

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        c = channels
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pwconv1 = nn.Linear(c, 4 * c)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * c, c)
        # Layer scale of order 1 (not ConvNeXt's 1e-6) so that the pair's effect shows.
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.in_shape = (2, c, 9, 9)

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)          # NCHW -> NHWC
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)  # NHWC -> NCHW


class Bottleneck(nn.Module):
    """ResNet bottleneck: conv1 1x1 (in -> w), conv2 3x3 stride 2 (w -> w), conv3 1x1
    (w -> 4w), BatchNorms, strided 1x1 downsample."""

    pairs = [('conv1', 'conv3')]
    spatial = ['conv2']

    def __init__(self, in_channels: int = 16, width: int = 8, stride: int = 2) -> None:
        super().__init__()
        out = 4 * width
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU()
        self.downsample = nn.Sequential(
            nn.Conv2d(in_channels, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
        with torch.no_grad():   # non-trivial running statistics for eval mode
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
        self.in_shape = (2, in_channels, 10, 10)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + self.downsample(x))


NETS = {
    'linear_pair': LinearPairNet,
    'conv_pair': ConvPairNet,
    'mixed_pair': MixedPairNet,
    'convnext': ConvNeXtBlock,
    'bottleneck': Bottleneck,
}


def build(net: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return NETS[net]().eval()


def net_input(model: nn.Module, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*model.in_shape, generator=g)


@torch.no_grad()
def randomize_adapters(model: nn.Module, std: float = 0.2, seed: int = 3) -> None:
    """Random non-zero values in every adapter parameter (B matrices included)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if is_adapter_name(name):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def adapter_param_count(module: nn.Module) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if is_adapter_name(n))


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# ----------------------------------------------------------- float64 references
def std_unbiased(t: torch.Tensor) -> torch.Tensor:
    """Sample standard deviation with Bessel's correction, written out."""
    t = t.reshape(-1)
    mean = t.sum() / t.numel()
    return (((t - mean) ** 2).sum() / (t.numel() - 1)).sqrt()


def expected_ranks(d: int, d_mid: int, d_out: int, gamma: int, share_ratio: float):
    n = min(d, d_mid, d_out)
    r = n // gamma
    rs = math.floor(r * share_ratio)
    return n, r, rs, r - rs


def colora_deltas64(A1, B1, A2, B2, As, Bs, W1, W2, n):
    """Eqs. 14-15 in float64, paper orientation: ``W1 (d x d')``, ``W2 (d' x d'')``.

    Returns ``(dW1, dW2)`` with shapes ``(d x d')`` and ``(d' x d'')``.
    """
    A1, B1, A2, B2, As, Bs, W1, W2 = (t.double() for t in (A1, B1, A2, B2, As, Bs, W1, W2))
    rl, rs = A1.shape[1], As.shape[1]
    dW1 = torch.zeros(W1.shape, dtype=torch.float64)
    dW2 = torch.zeros(W2.shape, dtype=torch.float64)
    if rl:
        s1 = 1.0 / (math.sqrt(rl) * (std_unbiased(A1) + std_unbiased(B1)))
        s2 = 1.0 / (math.sqrt(rl) * (std_unbiased(A2) + std_unbiased(B2)))
        dW1 = dW1 + s1 * (A1 @ B1)
        dW2 = dW2 + s2 * (A2 @ B2)
    if rs:
        root4 = (rs * n) ** 0.25
        Bs_W2t = Bs @ W2.T                                   # (rs x d')
        W1t_As = W1.T @ As                                   # (d' x rs)
        s_14 = 1.0 / (root4 * (std_unbiased(Bs_W2t) + std_unbiased(As)))
        s_15 = 1.0 / (root4 * (std_unbiased(W1t_As) + std_unbiased(Bs)))
        dW1 = dW1 + s_14 * (As @ Bs_W2t)
        dW2 = dW2 + s_15 * (W1t_As @ Bs)
    return dW1, dW2


def gaussian2d64(window: int = 11, sigma: float = 1.0) -> torch.Tensor:
    """Normalised 2-D Gaussian ``exp(-(dx^2 + dy^2) / (2 sigma^2))`` centred at (k-1)/2."""
    c = (window - 1) / 2.0
    g = torch.tensor([[math.exp(-((i - c) ** 2 + (j - c) ** 2) / (2 * sigma ** 2))
                       for j in range(window)] for i in range(window)], dtype=torch.float64)
    return g / g.sum()


def reflect(i: int, n: int) -> int:
    """Mirror index ``i`` into ``[0, n)`` without repeating the edge, bouncing as often
    as needed (``F.pad(mode='reflect')`` for pads < n, period 2(n-1) beyond)."""
    if n == 1:
        return 0
    while i < 0 or i >= n:
        if i < 0:
            i = -i
        if i >= n:
            i = 2 * (n - 1) - i
    return i


def naive_range_filter(z: torch.Tensor, window: int = 11, sigma: float = 1.0,
                       eps: float = 1e-5) -> torch.Tensor:
    """Eq. 7 as a literal double loop over pixels and window offsets, in float64:
    spatial kernel a normalised Gaussian, range kernel ``cos(gamma_c (x - y))``,
    ``gamma_c = pi / (2 (max - min))`` per sample and channel, reflect border; the
    normaliser ``Z`` (plus ``eps``, as Eq. 11 adds it)."""
    z = z.detach().double()
    ks = gaussian2d64(window, sigma).tolist()
    half = window // 2
    N, C, H, W = z.shape
    out = torch.empty_like(z)
    for b in range(N):
        for c in range(C):
            img = z[b, c].tolist()
            lo = min(min(row) for row in img)
            hi = max(max(row) for row in img)
            gam = math.pi / (2.0 * max(hi - lo, 1e-5))
            for h in range(H):
                for w in range(W):
                    x = img[h][w]
                    num = den = 0.0
                    for dh in range(-half, half + 1):
                        row = img[reflect(h + dh, H)]
                        for dw in range(-half, half + 1):
                            y = row[reflect(w + dw, W)]
                            weight = ks[dh + half][dw + half] * math.cos(gam * (x - y))
                            num += weight * y
                            den += weight
                    out[b, c, h, w] = num / (den + eps)
    return out


def window_range_filter(z: torch.Tensor, window: int = 11, sigma: float = 1.0,
                        eps: float = 1e-5, grad_through_range: bool = False) -> torch.Tensor:
    """Eq. 7 as an explicit weighted sum over the window (vectorised), differentiable.

    The range kernel ``cos(gamma_c (x - y))`` and ``gamma_c`` are constants unless
    ``grad_through_range``; the neighbour value ``y`` that multiplies it in the numerator
    keeps its gradient.
    """
    ks = gaussian2d64(window, sigma).to(z.dtype)
    half = window // 2
    N, C, H, W = z.shape
    rows = torch.tensor([reflect(i, H) for i in range(-half, H + half)])
    cols = torch.tensor([reflect(j, W) for j in range(-half, W + half)])
    padded = z[:, :, rows][:, :, :, cols]
    # every neighbour y at once: (N, C, k, k, H, W), offset (i, j) -> padded[i + h, j + w]
    y = padded.unfold(2, H, 1).unfold(3, W, 1)
    zc = z if grad_through_range else z.detach()
    yc = y if grad_through_range else y.detach()
    t = (zc.amax(dim=(2, 3), keepdim=True) - zc.amin(dim=(2, 3), keepdim=True)).clamp_min(1e-5)
    gam = (math.pi / (2.0 * t))[:, :, None, None]
    weight = ks[:, :, None, None] * torch.cos(gam * (zc[:, :, None, None] - yc))
    return (weight * y).sum(dim=(2, 3)) / (weight.sum(dim=(2, 3)) + eps)


def sgd_records(model: nn.Module, steps: int = 3, lr: float = 0.1) -> list:
    """Per SGD step on ``model``'s own input: its output, every gradient and every
    partner buffer (CoLoRA's offsets), cloned."""
    x = net_input(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    record = []
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        out.square().mean().backward()
        record.append([out.detach().clone()]
                      + [p.grad.clone() for p in model.parameters() if p.grad is not None]
                      + [b.clone() for n, b in model.named_buffers() if 'partner' in n])
        opt.step()
    return record


def assert_records_close(got: list, want: list, rel: float = 1e-5) -> None:
    """Two :func:`sgd_records` agree step for step, each tensor to ``rel`` of its
    largest magnitude (at least 1e-3)."""
    assert len(got) == len(want)
    for got_step, want_step in zip(got, want):
        assert len(got_step) == len(want_step)
        for a, b in zip(got_step, want_step):
            assert a.shape == b.shape
            assert (a - b).abs().max() <= rel * max(b.abs().max().item(), 1e-3)


def saved_beyond_state(model: nn.Module, fn):
    """``(fn(), saved)``: what ``fn`` returns and the tensors autograd saved for
    backward while it ran, except those sharing storage with ``model``'s parameters and
    buffers."""
    fixed = {t.untyped_storage().data_ptr() for t in
             list(model.parameters()) + list(model.buffers())}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in fixed:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved
