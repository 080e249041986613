"""The scalings as one autograd op (colora_mm.adapters.scaling): the same forward values
as the plain ops, bit for bit, and the same gradients (the closed form of std's and the
clamp's backward, PyTorch's conventions at std = 0 included)."""
import pytest
import torch

from colora_mm.adapters import AdapterSpec, inject_adapters, reset_adapters_from_weights
from colora_mm.adapters import scaling
from colora_mm.adapters.scaling import ScaledColumns, plain_scaled, scaled_columns

from adapter_nets import (ConvPairNet, LinearPairNet, assert_records_close,
                          randomize_adapters, sgd_records)


def _terms(shapes, dtype=torch.float64, seed=0, zero=()):
    g = torch.Generator().manual_seed(seed)
    terms = []
    for j, (rows, width, cols, k) in enumerate(shapes):
        x = torch.randn(rows, width, generator=g, dtype=dtype)
        y = torch.randn(width, cols, generator=g, dtype=dtype)
        if 'y%d' % j in zero:
            y.zero_()
        if 'x%d' % j in zero:
            x.zero_()
        terms.append((x.requires_grad_(), y.requires_grad_(), k))
    return terms


def _grads(fn, terms, grad_out):
    for x, y, _ in terms:
        x.grad = y.grad = None
    out = fn(terms)
    out.backward(grad_out)
    return out.detach(), [t.grad.clone() for x, y, _ in terms for t in (x, y)]


def _plain(terms):
    return torch.cat([plain_scaled(x, y, k) for x, y, k in terms], dim=1)


@pytest.mark.parametrize('shapes', [
    [(7, 3, 11, 1.7)],                          # one term (share_ratio 0 or 1)
    [(7, 3, 11, 1.7), (7, 2, 5, 2.3)],          # independent + shared
])
def test_gradcheck_float64(shapes):
    terms = _terms(shapes)
    consts = scaling._Constants([k for *_, k in terms],
                                [t.numel() for x, y, _ in terms for t in (x, y)],
                                [x.shape[1] for x, *_ in terms], terms[0][0])
    tensors = [t for x, y, _ in terms for t in (x, y)]
    assert torch.autograd.gradcheck(lambda *ts: ScaledColumns.apply(consts, *ts),
                                    tensors, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize('zero', [(), ('y0',), ('y0', 'y1'), ('x1', 'y1'),
                                  ('x0', 'y0', 'x1', 'y1')])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_equals_plain_ops_zero_std_and_clamp_included(zero, dtype):
    """B = 0 (every freshly injected pair: std 0, PyTorch's zero gradient there) and an
    all-zero term (the clamp binds: no gradient through the scaling)."""
    terms = _terms([(9, 3, 13, 1.7), (9, 2, 6, 2.3)], dtype=dtype, zero=zero)
    grad_out = torch.randn(9, 5, dtype=dtype, generator=torch.Generator().manual_seed(3))
    cache = {}
    fused_out, fused = _grads(lambda t: scaled_columns(t, cache), terms, grad_out)
    plain_out, plain = _grads(_plain, terms, grad_out)
    assert torch.equal(fused_out, plain_out)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for got, want in zip(fused, plain):
        assert torch.isfinite(got).all()
        assert (got - want).abs().max() <= tol * max(want.abs().max().item(), 1.0)
    assert len(cache) == 1                      # constants built once, then reused
    scaled_columns(terms, cache)
    assert len(cache) == 1


def _pair_model(cls, share, seed=0):
    torch.manual_seed(seed)
    model = cls(12, 20, 8)
    inject_adapters(model, AdapterSpec(method='colora', gamma=2, share_ratio=share,
                                       partner_policy='effective'), pairs=model.pairs)
    reset_adapters_from_weights(model)
    randomize_adapters(model, std=0.3)
    return model.train()


@pytest.mark.parametrize('cls', [LinearPairNet, ConvPairNet])
@pytest.mark.parametrize('share', [0.0, 0.5, 1.0])
def test_training_steps_match_the_plain_ops(cls, share, monkeypatch):
    """Three SGD steps of a pair with effective partners: outputs and partner offsets
    equal the plain ops' step for step (fp32, 1e-5 relative), every gradient too."""
    runs = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(scaling, 'compiling', lambda: True)
        runs.append(sgd_records(_pair_model(cls, share)))
    assert_records_close(*runs)


def test_no_grad_forward_equals_the_training_forward():
    """Evaluation (plain ops, no autograd) and training (one autograd op) form the same
    factors, bit for bit: what merge bakes is what training computed."""
    model = _pair_model(LinearPairNet, 0.5)
    pair = model.fc1.adapter_branch.pair
    for index in (0, 1):
        train = pair.factors(index)
        with torch.no_grad():
            evaluated = pair.factors(index)
        assert train[0].grad_fn is not None
        for a, b in zip(train, evaluated):
            assert torch.equal(a.detach(), b)


def test_backward_inside_an_autocast_region_stays_in_the_forward_dtype():
    terms = _terms([(9, 3, 13, 1.7), (9, 2, 6, 2.3)], dtype=torch.float32)
    grad_out = torch.randn(9, 5, generator=torch.Generator().manual_seed(3))
    _, want = _grads(_plain, terms, grad_out)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        _, got = _grads(lambda t: scaled_columns(t, {}), terms, grad_out)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        assert (g - w).abs().max() <= 1e-5 * max(w.abs().max().item(), 1.0)
