"""The separable fast path of the range filter (two 1-D passes as matrix products):
dense and blocked axis operators against the 2-D depthwise convolution, values and
gradients, and its operator cache."""
import pytest
import torch
import torch.nn.functional as F

from colora_mm.adapters import RangeKernelFilter
from colora_mm.adapters import filter as filt


def _z(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * 2 + 0.5


def test_axis_operator_is_a_reflect_padded_1d_pass():
    k = filt.gaussian_kernel1d().double()
    for n in (1, 2, 3, 6, 11, 17):
        x = torch.randn(3, n, dtype=torch.float64)
        pos = filt.reflect_indices(n, 5)
        ref = torch.stack([(x[:, pos[j:j + 11]] * k).sum(-1) for j in range(n)], -1)
        assert (x @ filt.axis_operator(k, n) - ref).abs().max() < 1e-12


@pytest.mark.parametrize('shape', [(1, 2, 20, 300),     # blocked last axis, 300 % 32 != 0
                                   (1, 1, 270, 9),      # blocked rows
                                   (2, 1, 257, 260)])   # both blocked
def test_blocked_path_equals_2d_convolution(shape):
    z = _z(shape, seed=shape[-1])
    fast, full = RangeKernelFilter(separable=True), RangeKernelFilter(separable=False)
    assert max(shape[-2:]) > filt.DENSE_AXIS_MAX
    assert (fast.gaussian(z) - full.gaussian(z)).abs().max() < 1e-12
    assert (fast(z) - full(z)).abs().max() < 1e-10


def test_gaussian_matches_padded_depthwise_conv():
    z = _z((2, 3, 40, 33), seed=3)
    k = filt.gaussian_kernel1d(dtype=torch.float64)
    ref = F.conv2d(F.pad(z, (5, 5, 5, 5), mode='reflect'),
                   torch.outer(k, k).expand(3, 1, 11, 11), groups=3)
    assert (RangeKernelFilter().gaussian(z) - ref).abs().max() < 1e-12


def test_fast_path_gradient_equals_2d_path():
    z = _z((1, 2, 30, 270), seed=5).requires_grad_(True)
    v = _z((1, 2, 30, 270), seed=6)
    (g_fast,) = torch.autograd.grad(RangeKernelFilter(separable=True)(z), z, v)
    (g_full,) = torch.autograd.grad(RangeKernelFilter(separable=False)(z), z, v)
    assert (g_fast - g_full).abs().max() < 1e-9


def test_operator_cache_per_length_and_dtype_and_not_in_state():
    f = RangeKernelFilter()
    f(_z((1, 1, 7, 9)))
    # (float32 inference may take the C++ kernel, which needs no operators: a
    # gradient-carrying input runs the PyTorch formulation)
    f(_z((1, 1, 7, 9), dtype=torch.float32).requires_grad_(True))
    keys = {(n, dtype) for n, _, dtype in f._operators}
    assert keys == {(7, torch.float64), (9, torch.float64), (7, torch.float32),
                    (9, torch.float32)}
    assert f.state_dict() == {}


def test_operators_built_under_fake_tensors_are_not_kept():
    from torch._subclasses.fake_tensor import FakeTensorMode
    f = RangeKernelFilter()
    with FakeTensorMode(allow_non_fake_inputs=True):
        f(torch.zeros(1, 2, 12, 12))
    assert f._operators == {}
    out = f(_z((1, 2, 12, 12), dtype=torch.float32))
    assert type(out) is torch.Tensor and torch.isfinite(out).all()


@pytest.mark.parametrize('shape', [(2, 3, 17, 23), (1, 2, 30, 270), (1, 1, 300, 7)])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_no_grad_path_equals_the_training_path(shape, dtype):
    """Without gradients the four maps are blurred in one call (float32 on the CPU: the
    C++ kernel); with them the weights and the numerators apart: the same filter, to
    rounding."""
    z = _z(shape, seed=7, dtype=dtype)
    f = RangeKernelFilter()
    with torch.no_grad():
        evaluated = f(z)
    trained = f(z.clone().requires_grad_(True))
    assert trained.grad_fn is not None
    tol = 2e-6 if dtype == torch.float32 else 1e-13
    assert (trained.detach() - evaluated).abs().max() <= tol * evaluated.abs().max()


def _saved_storages(fn):
    """``(fn(), storages)``: what ``fn`` returns and the distinct storages (data
    pointer -> bytes) autograd saved for backward while it ran."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize('shape', [(2, 3, 20, 17), (1, 2, 20, 300)])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_training_path_keeps_only_its_input_and_gives_the_op_by_op_gradient(
        monkeypatch, shape, dtype):
    """With a gradient, the separable path keeps only ``z`` for backward (not the two
    range weights and the normaliser, three more maps of ``z``'s size) and gives the
    op-by-op path's output and gradient bit for bit, also in a backward pass that
    records a graph (its gradient is linear in the output gradient)."""
    f = RangeKernelFilter()
    z = _z(shape, seed=4, dtype=dtype).requires_grad_()
    g = _z(shape, seed=5, dtype=dtype)

    def run():
        out, saved = _saved_storages(lambda: f(z))
        (gz,) = torch.autograd.grad(out, z, g)
        gg = g.clone().requires_grad_()
        (gz2,) = torch.autograd.grad(f(z), z, gg, create_graph=True)
        (ggg,) = torch.autograd.grad((gz2 * g).sum(), gg)
        return out.detach(), gz, gz2.detach(), ggg, saved

    out, gz, gz2, ggg, saved = run()
    assert list(saved.values()) == [z.untyped_storage().nbytes()]
    monkeypatch.setattr(filt, 'compiling', lambda: True)    # autograd op by op
    ref_out, ref_gz, ref_gz2, ref_ggg, ref_saved = run()
    assert sum(ref_saved.values()) >= 3 * z.untyped_storage().nbytes()
    assert torch.equal(out, ref_out) and torch.equal(gz, ref_gz)
    assert torch.equal(gz2, ref_gz2) and torch.equal(ggg, ref_ggg)
    assert torch.equal(gz, gz2)


def test_traced_and_func_transformed_training_paths_run_op_by_op(tmp_path):
    """TorchScript tracing with gradients on records the filter's ops (which export and
    which FLOP counters read), not one Python call; ``torch.func.grad`` gives autograd's
    gradient."""
    f = RangeKernelFilter()
    conv = torch.nn.Conv2d(4, 3, 1)
    x = _z((1, 4, 20, 24), seed=6, dtype=torch.float32)
    net = torch.nn.Sequential(conv, f)
    net(x)                                   # the axis operators built and cached
    traced = torch.jit.trace(net, x, check_trace=False)
    assert 'aten::cos' in str(traced.inlined_graph)
    assert 'PythonOp' not in str(traced.inlined_graph)
    torch.jit.save(traced, str(tmp_path / 'f.pt'))
    z = _z((2, 3, 20, 17), seed=7)
    g = _z((2, 3, 20, 17), seed=8)
    got = torch.func.grad(lambda t: (f(t) * g).sum())(z)
    (want,) = torch.autograd.grad((f(z.requires_grad_()) * g).sum(), z)
    assert torch.equal(got, want)


def test_training_path_backward_inside_an_autocast_region_keeps_its_precision():
    """A backward pass called inside a bfloat16 autocast region (a training loop that
    wraps the whole step) differentiates the filter in ``z``'s float32, as the forward
    pass ran: the same gradient as outside it."""
    f = RangeKernelFilter()
    z = _z((2, 3, 20, 17), seed=9, dtype=torch.float32).requires_grad_()
    g = _z((2, 3, 20, 17), seed=10, dtype=torch.float32)
    (want,) = torch.autograd.grad((f(z) * g).sum(), z)
    out = f(z)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        (got,) = torch.autograd.grad((out * g).sum(), z)
    assert torch.equal(got, want)
