"""The range filter under float16 / bfloat16 autocast: its statistics and range weights
run in float32, so constant, all-zero and near-constant channels (whose range is below
float16's resolution, where ``gamma_c = pi / (2 T_c)`` overflows) stay finite."""
import pytest
import torch

from colora_mm.adapters import (AdapterSpec, RangeKernelFilter, inject_adapters,
                                mark_trainable, reset_adapters_from_weights)

from adapter_nets import build, max_abs_diff, randomize_adapters

HALF = [torch.float16, torch.bfloat16]
# relative resolution of the half-precision output (bf16 has 8 mantissa bits)
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _hard_channels(dtype):
    """(1, 4, 12, 12): a constant channel, an all-zero one, a near-constant one
    (range 1e-6, below float16's spacing at 1.0) and an ordinary one."""
    g = torch.Generator().manual_seed(0)
    z = torch.empty(1, 4, 12, 12)
    z[0, 0] = 0.75
    z[0, 1] = 0.0
    z[0, 2] = 1.0 + 1e-6 * torch.rand(12, 12, generator=g)
    z[0, 3] = torch.randn(12, 12, generator=g)
    return z.to(dtype)


@pytest.mark.parametrize('separable', [True, False])
@pytest.mark.parametrize('dtype', HALF, ids=str)
def test_filter_under_half_autocast_is_finite_and_close_to_float32(dtype, separable):
    z = _hard_channels(dtype)
    filt = RangeKernelFilter(separable=separable)
    with torch.autocast('cpu', dtype=dtype):
        out = filt(z)
    assert out.dtype == dtype and torch.isfinite(out).all()
    want = filt(z.float())                       # the same input, float32 throughout
    scale = want.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1.0)
    assert ((out.float() - want).abs() / scale).max() < TOL[dtype]
    # a constant channel filters to itself
    assert max_abs_diff(out[0, 0].float(), torch.full((12, 12), 0.75)) < TOL[dtype]
    assert torch.count_nonzero(out[0, 1]) == 0


@pytest.mark.parametrize('dtype', HALF, ids=str)
def test_half_inputs_without_autocast_are_filtered_in_float32(dtype):
    z = _hard_channels(dtype)
    out = RangeKernelFilter()(z)
    assert out.dtype == dtype and torch.isfinite(out).all()


@pytest.mark.parametrize('dtype', HALF, ids=str)
def test_convnext_block_with_a_constant_input_trains_under_half_autocast(dtype):
    """A spatially constant input makes every compressed channel constant: the case that
    gave NaN when the filter ran in float16."""
    model = build('convnext', 0)
    inject_adapters(model, AdapterSpec(method='colora', gamma=4), pairs=model.pairs,
                    spatial=model.spatial)
    reset_adapters_from_weights(model)
    mark_trainable(model, 'colora')
    randomize_adapters(model, std=0.3)
    x = torch.full(model.in_shape, 0.5)
    model.train()
    with torch.autocast('cpu', dtype=dtype):
        out = model(x)
    assert torch.isfinite(out).all()
    out.float().square().mean().backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    with torch.no_grad():
        want = model.eval()(x)
        with torch.autocast('cpu', dtype=dtype):
            got = model(x)
    assert ((got.float() - want).abs().max() / want.abs().max()) < 5 * TOL[dtype]
