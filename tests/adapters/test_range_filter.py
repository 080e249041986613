"""Eq. 11 (the range-kernel filter) against a naive double-loop Eq. 7."""
import math

import pytest
import torch
import torch.nn.functional as F

from colora_mm.adapters import RangeKernelFilter

from adapter_nets import (gaussian2d64, max_abs_diff, naive_range_filter, reflect,
                          window_range_filter)


def _features(shape, seed=0):
    """Random float64 features with very different ranges per sample and channel, so a
    gamma computed over the wrong axes gives a different answer."""
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    scale = torch.rand(n, c, 1, 1, generator=g, dtype=torch.float64) * 4 + 0.1
    shift = torch.randn(n, c, 1, 1, generator=g, dtype=torch.float64) * 3
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift


def test_reference_border_is_torch_reflect_padding():
    """The naive reference's border rule is F.pad(mode='reflect') where that applies."""
    for n in (2, 3, 6, 13):
        for pad in range(0, min(n, 6)):
            line = torch.arange(n, dtype=torch.float64).view(1, 1, n)
            torch_pad = F.pad(line, (pad, pad), mode='reflect').view(-1).long().tolist()
            assert torch_pad == [reflect(i, n) for i in range(-pad, n + pad)]


def test_reference_gaussian_is_normalised_and_centred():
    g = gaussian2d64()
    assert g.shape == (11, 11)
    assert abs(g.sum().item() - 1.0) < 1e-12
    assert g.argmax().item() == 5 * 11 + 5
    assert abs(g[5, 6].item() / g[5, 5].item() - math.exp(-0.5)) < 1e-12


@pytest.mark.parametrize('separable', [True, False])
@pytest.mark.parametrize('shape', [(2, 3, 13, 12),   # larger than the 11x11 window
                                   (1, 2, 3, 4),     # smaller: reflect keeps bouncing
                                   (2, 1, 2, 7),
                                   (1, 2, 1, 5),     # a single row
                                   (1, 1, 3, 150),   # long axes, not multiples of 32:
                                   (1, 1, 133, 2),   # dense and blocked fast paths
                                   (1, 1, 2, 270),
                                   (1, 1, 300, 1)])
def test_eq11_equals_naive_eq7(shape, separable):
    z = _features(shape, seed=sum(shape))
    ours = RangeKernelFilter(separable=separable)(z)
    assert ours.dtype == torch.float64 and ours.shape == z.shape
    assert max_abs_diff(ours, naive_range_filter(z)) < 1e-5


def test_eps_is_in_the_denominator_and_gamma_is_per_sample_and_channel():
    """Sensitivity checks of the reference comparison above: without eps, or with one
    gamma for the whole tensor, the answer moves by more than the tolerance."""
    z = _features((2, 3, 6, 5), seed=7)
    ours = RangeKernelFilter()(z)
    assert max_abs_diff(ours, naive_range_filter(z, eps=0.0)) > 1e-5
    # one global range instead of per (sample, channel): scale channel 0 of sample 0 only
    z2 = z.clone()
    z2[0, 0] *= 10
    out2 = RangeKernelFilter()(z2)
    assert max_abs_diff(out2[1], ours[1]) == 0.0        # other samples untouched
    assert max_abs_diff(out2[0, 1:], ours[0, 1:]) == 0.0  # other channels untouched


def test_constant_channel_is_finite():
    z = torch.full((1, 2, 5, 5), 0.7, dtype=torch.float64)
    z[0, 1] = torch.randn(5, 5, dtype=torch.float64)
    out = RangeKernelFilter()(z)
    assert torch.isfinite(out).all()
    assert max_abs_diff(out, naive_range_filter(z)) < 1e-5


@pytest.mark.parametrize('shape', [(2, 4, 12, 10), (1, 3, 4, 3), (1, 1, 129, 16),
                                   (1, 1, 16, 128), (1, 1, 260, 6), (1, 1, 7, 300)])
def test_separable_and_2d_paths_agree(shape):
    z = _features(shape, seed=11)
    fast, full = RangeKernelFilter(separable=True), RangeKernelFilter(separable=False)
    assert max_abs_diff(fast(z), full(z)) < 1e-10
    z32 = z.float()
    assert max_abs_diff(fast(z32), full(z32)) < 1e-5
    assert fast(z32).dtype == torch.float32


def test_vectorised_reference_matches_double_loop():
    z = _features((1, 2, 5, 4), seed=5)
    assert max_abs_diff(window_range_filter(z), naive_range_filter(z)) < 1e-12


@pytest.mark.parametrize('separable', [True, False])
@pytest.mark.parametrize('shape', [(2, 2, 7, 6), (1, 2, 3, 2), (1, 1, 4, 140),
                                   (1, 1, 275, 2)])
def test_gradient_reaches_z_through_the_numerator_only(shape, separable):
    """d Filter / dz equals the gradient of Eq. 7 with the range weights (and gamma_c,
    and the normaliser) held constant; the numerator's z gets a non-zero gradient."""
    z = _features(shape, seed=3).requires_grad_(True)
    v = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    (g_ours,) = torch.autograd.grad(RangeKernelFilter(separable=separable)(z), z, v)
    (g_ref,) = torch.autograd.grad(window_range_filter(z), z, v)
    (g_all,) = torch.autograd.grad(window_range_filter(z, grad_through_range=True), z, v)
    assert max_abs_diff(g_ours, g_ref) < 1e-6
    assert g_ours.abs().max() > 1e-3                       # z does receive a gradient
    assert max_abs_diff(g_all, g_ref) > 1e-3               # the check can tell the two apart


def test_filter_has_no_trainable_state():
    f = RangeKernelFilter()
    assert list(f.parameters()) == []
    assert f.state_dict() == {}                            # the kernel is not persistent
    with pytest.raises(ValueError, match='odd'):
        RangeKernelFilter(window=10)
