"""The depthwise-style up-projection's CPU kernel (``colora_mm/adapters/up3x3.py``):
equal to PyTorch's grouped convolution in values and both gradients, taken only where
it applies, and a build that fails falls back with one warning."""
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from colora_mm.adapters import AdapterSpec, inject_adapters
from colora_mm.adapters import up3x3 as U

from adapter_nets import ConvNeXtBlock, randomize_adapters


def _relative(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize('n, r, c, h, w', [
    (2, 6, 96, 64, 64),       # ConvNeXt-T stage 0 at 256x256, r = C // 16
    (2, 24, 768, 8, 8),       # stage 3
    (3, 4, 8, 5, 7),          # H != W, odd sizes
    (1, 3, 3, 1, 1),          # one pixel, one output per group
    (2, 2, 8, 1, 9),          # one row
    (1, 5, 10, 7, 1),         # one column
])
@pytest.mark.parametrize('threads', [1, 2])
def test_equals_the_grouped_conv(kernel, n, r, c, h, w, threads):
    gen = torch.Generator().manual_seed(n * 100 + c)
    z = torch.randn(n, r, h, w, generator=gen, requires_grad=True)
    weight = torch.randn(c, 1, 3, 3, generator=gen, requires_grad=True)
    grad = torch.randn(n, c, h, w, generator=gen)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = U.up3x3(z, weight)
        got = torch.autograd.grad(out, (z, weight), grad)
    finally:
        torch.set_num_threads(saved)
    z64, w64 = z.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = F.conv2d(z64, w64, None, 1, 1, 1, r)
    want = torch.autograd.grad(ref, (z64, w64), grad.double())
    assert out.dtype == torch.float32 and out.shape == (n, c, h, w)
    assert _relative(out.double(), ref) < 1e-6
    for g, g64 in zip(got, want):
        assert _relative(g.double(), g64) < 1e-6
    # and the grouped conv in float32 sits as close to float64
    assert _relative(F.conv2d(z, weight, None, 1, 1, 1, r).double(), ref) < 1e-6


def test_non_contiguous_input_and_one_gradient(kernel):
    z = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(8, 1, 3, 3, requires_grad=True)
    ref = F.conv2d(z, weight, None, 1, 1, 1, 4)
    out = U.up3x3(z, weight)           # z needs no gradient
    assert _relative(out, ref) < 1e-6
    g, = torch.autograd.grad(out.square().sum(), weight)
    g_ref, = torch.autograd.grad(ref.square().sum(), weight)
    assert _relative(g, g_ref) < 1e-5


def test_no_second_derivative(kernel):
    z = torch.randn(1, 2, 4, 4, requires_grad=True)
    weight = torch.randn(4, 1, 3, 3, requires_grad=True)
    out = U.up3x3(z, weight)
    with pytest.raises(RuntimeError, match='no second derivative; set COLORA_MM_UP3X3=conv'):
        torch.autograd.grad(out.sum(), z, create_graph=True)


def _count_kernel_calls(monkeypatch):
    calls = []
    apply, add = U._apply_kernel, U._apply_add_kernel
    monkeypatch.setattr(U, '_apply_kernel', lambda *a: calls.append(1) or apply(*a))
    monkeypatch.setattr(U, '_apply_add_kernel', lambda *a: calls.append(1) or add(*a))
    return calls


def test_taken_only_where_it_applies(kernel, monkeypatch):
    calls = _count_kernel_calls(monkeypatch)
    z, weight = torch.randn(1, 2, 5, 5), torch.randn(4, 1, 3, 3)
    U.up3x3(z, weight)
    assert len(calls) == 1
    U.up3x3(z.double(), weight.double())                    # float64: the conv
    with torch.autocast('cpu', dtype=torch.bfloat16):       # autocast: the conv, in bf16
        assert U.up3x3(z, weight).dtype == torch.bfloat16
    torch.jit.trace(lambda t: U.up3x3(t, weight), (z,), check_trace=False)   # the conv
    strided = U.GroupedUp3x3(2, 4, 3, stride=2, padding=1, groups=2, bias=False)
    assert strided(z).shape == (1, 4, 3, 3)                 # stride 2: the conv
    # an input of the wrong width: the conv's own error, not another grouping
    with pytest.raises(RuntimeError, match='expected input.* to have 2 channels'):
        U.GroupedUp3x3(2, 4, 3, padding=1, groups=2, bias=False)(torch.randn(1, 4, 5, 5))
    monkeypatch.setenv(U.ENV_CHOICE, 'conv')
    U.up3x3(z, weight)
    assert len(calls) == 1
    monkeypatch.setenv(U.ENV_CHOICE, 'fast')
    with pytest.raises(ValueError, match=r"COLORA_MM_UP3X3='fast': expected one of auto, "
                                         r"conv"):
        U.up3x3(z, weight)


def test_the_module_keeps_conv2d_parameters_and_state_dict(kernel, monkeypatch):
    calls = _count_kernel_calls(monkeypatch)
    up = U.GroupedUp3x3(6, 24, 3, padding=1, groups=6, bias=False)
    plain = nn.Conv2d(6, 24, 3, padding=1, groups=6, bias=False)
    assert up.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(up.state_dict())
    z = torch.randn(2, 6, 9, 9)
    assert _relative(up(z), plain(z)) < 1e-6 and len(calls) == 1
    with torch.no_grad():                                   # inference: the kernel too
        up(z)
    assert len(calls) == 2


def test_spatial_branch_takes_it_and_trains_alike(kernel, monkeypatch):
    """A ConvNeXt block's spatial branch (filter on): output and every adapter
    gradient the same with the kernel and with the grouped conv (float32)."""
    def run(choice):
        monkeypatch.setenv(U.ENV_CHOICE, choice)
        torch.manual_seed(0)
        model = ConvNeXtBlock()
        inject_adapters(model, AdapterSpec(method='colora', gamma=4, spatial=True),
                        pairs=model.pairs, spatial=model.spatial)
        randomize_adapters(model, std=0.3)
        x = torch.randn(model.in_shape, generator=torch.Generator().manual_seed(1))
        out = model(x)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(out.square().mean(), params)
        return out, grads, model
    calls = _count_kernel_calls(monkeypatch)
    out, grads, model = run('auto')
    assert len(calls) == 1
    assert isinstance(model.get_submodule(model.spatial[0]).adapter_branch.up,
                      U.GroupedUp3x3)
    out_conv, grads_conv, _ = run('conv')
    assert len(calls) == 1
    assert _relative(out, out_conv) < 1e-6
    for g, g_conv in zip(grads, grads_conv):
        assert _relative(g, g_conv) < 1e-5


def test_a_failed_build_falls_back_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(U, '_state', {})
    monkeypatch.setattr(U, 'SOURCES', (str(tmp_path / 'missing.cpp'),) + U.SOURCES[1:])
    z, weight = torch.randn(1, 2, 4, 4), torch.randn(4, 1, 3, 3)
    with pytest.warns(UserWarning, match=r"CPU kernels \(up-projection, inference filter, "
                                         r"pair factors; .*missing.cpp, .*pair_factors.cpp\) "
                                         r"could not be built "
                                         r"\(FileNotFoundError"):
        out = U.up3x3(z, weight)
    assert torch.equal(out, F.conv2d(z, weight, None, 1, 1, 1, 2))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        U.up3x3(z, weight)                 # the failure is remembered: no second try
    assert 'FileNotFoundError' in U._state['error']


def test_sources_are_staged_in_the_build_directory_once(tmp_path):
    """Two copies of the package with the same sources build from the same files (so
    ninja's command line does not change between them); a staged file is rewritten only
    when the source differs."""
    build = tmp_path / 'build'
    build.mkdir()
    copies = []
    for where in ('clone_a', 'clone_b'):
        (tmp_path / where).mkdir()
        for src in U.SOURCES:
            dst = tmp_path / where / os.path.basename(src)
            dst.write_bytes(open(src, 'rb').read())
        copies.append([str(tmp_path / where / os.path.basename(s)) for s in U.SOURCES])
    first = U.stage_sources(str(build), copies[0])
    assert first == [str(build / os.path.basename(s)) for s in U.SOURCES]
    stamps = [os.stat(f).st_mtime_ns for f in first]
    assert U.stage_sources(str(build), copies[1]) == first
    assert [os.stat(f).st_mtime_ns for f in first] == stamps     # not touched
    with open(copies[1][0], 'ab') as f:
        f.write(b'\n// changed\n')
    U.stage_sources(str(build), copies[1])
    assert open(first[0], 'rb').read() == open(copies[1][0], 'rb').read()
    assert sorted(os.listdir(build)) == sorted(os.path.basename(s) for s in U.SOURCES)


def test_the_build_reads_the_staged_sources(monkeypatch, tmp_path):
    """``load_kernel`` hands torch's builder the copies in the build directory, a
    directory named by the sources' digest and what the build depends on."""
    import torch.utils.cpp_extension as ext
    seen = {}

    def fake_load(name, sources, build_directory, **kw):
        seen.update(name=name, sources=sources, build_directory=build_directory)
        return 'module'

    monkeypatch.setattr(U, '_state', {})
    monkeypatch.setenv(U.ENV_DIR, str(tmp_path))
    monkeypatch.setattr(ext, 'load', fake_load)
    assert U.load_kernel() == 'module'
    assert seen['build_directory'] == str(tmp_path / seen['name'])
    assert seen['sources'] == [os.path.join(seen['build_directory'], os.path.basename(s))
                               for s in U.SOURCES]
    for staged, src in zip(seen['sources'], U.SOURCES):
        assert open(staged, 'rb').read() == open(src, 'rb').read()


def test_operator_counters_and_fake_tensors_see_the_convolution(kernel, monkeypatch):
    """Under a TorchDispatchMode (tools/analysis/param_flops.py counts MACs that way, on
    fake tensors) the grouped convolution runs, so it is seen and counted."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    calls = _count_kernel_calls(monkeypatch)
    z, weight = torch.randn(1, 2, 5, 5), torch.randn(4, 1, 3, 3)
    with Ops() as ops:
        U.up3x3(z, weight)
    assert any('convolution' in op for op in ops.seen) and not calls
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert U.up3x3(torch.zeros(1, 2, 5, 5), weight).shape == (1, 4, 5, 5)
    assert U.up3x3(z.to('meta'), weight.to('meta')).is_meta and not calls


@pytest.mark.parametrize('n, r, c, h, w', [(2, 6, 96, 64, 64), (3, 4, 8, 5, 7),
                                           (1, 3, 3, 1, 1)])
def test_add_in_place_equals_the_sum_bit_for_bit(kernel, n, r, c, h, w):
    g = torch.Generator().manual_seed(n + c)
    z = torch.randn(n, r, h, w, generator=g)
    weight = torch.randn(c, 1, 3, 3, generator=g)
    base = torch.randn(n, c, h, w, generator=g)
    want = base + U.up3x3(z, weight)
    out = base.clone()
    with torch.no_grad():
        assert U.up3x3_add_(out, z, weight)
    assert torch.equal(out, want)


def test_add_in_place_trains_as_the_sum(kernel):
    """As one autograd op: the same output and the same gradients of the conv's input,
    its bias, z and the weight as ``conv(x) + up(z)``, bit for bit."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 6, 7, 9, generator=g)
    dw = torch.randn(6, 1, 7, 7, generator=g)
    z0 = torch.randn(2, 3, 7, 9, generator=g)
    w0 = torch.randn(6, 1, 3, 3, generator=g)
    b0 = torch.randn(6, generator=g)
    v = torch.randn(2, 6, 7, 9, generator=g)
    results = []
    for in_place in (True, False):
        x, z, w, b = (t.clone().requires_grad_(True) for t in (x0, z0, w0, b0))
        out = F.conv2d(x, dw, b, 1, 3, 1, 6)
        if in_place:
            assert U.up3x3_add_(out, z, w)
        else:
            out = out + U.up3x3(z, w)
        (out * v).sum().backward()
        results.append([out.detach()] + [t.grad for t in (x, z, w, b)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_add_in_place_only_on_fitting_outputs(kernel):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 6, 6, generator=g)
    weight = torch.randn(6, 1, 3, 3, generator=g)
    out = torch.randn(2, 6, 6, 6, generator=g)
    before = out.clone()
    assert not U.up3x3_add_(out.double(), z.double(), weight.double())
    assert not U.up3x3_add_(out.transpose(2, 3), z, weight)           # not contiguous
    assert not U.up3x3_add_(out[:, :3], z, weight[:3])      # a view with other strides
    assert not U.up3x3_add_(torch.zeros(2, 6, 5, 6), z, weight)       # another shape
    leaf = out.clone().requires_grad_(True)
    assert not U.up3x3_add_(leaf, z, weight)        # a leaf that needs its own gradient
    assert torch.equal(out, before)


def test_branch_adds_in_place(kernel, monkeypatch):
    """A ConvNeXt block's spatial branch: the up-projection adds into the depthwise
    conv's output (one kernel call, no sum) in training and inference; the block's
    output is the same (the filter's inference kernel apart, float32 rounding)."""
    torch.manual_seed(0)
    model = ConvNeXtBlock()
    inject_adapters(model, AdapterSpec(method='colora', gamma=4, spatial=True),
                    pairs=model.pairs, spatial=model.spatial)
    randomize_adapters(model, std=0.3)
    model.eval()
    x = torch.randn(model.in_shape, generator=torch.Generator().manual_seed(1))
    added = []
    real = U.up3x3_add_
    monkeypatch.setattr(U, 'up3x3_add_', lambda *a: added.append(real(*a)) or added[-1])
    with_grad = model(x)
    assert added == [True]
    with torch.no_grad():
        without = model(x)
    assert added == [True, True]
    assert _relative(without, with_grad.detach()) < 1e-6


# ------------------------------------------------------- the filter's inference kernel
@pytest.mark.parametrize('shape', [(2, 3, 64, 64), (2, 24, 8, 8), (2, 6, 56, 56),
                                   (1, 2, 1, 5), (1, 1, 5, 1), (1, 1, 1, 1),
                                   (1, 1, 300, 7), (1, 1, 3, 300), (3, 2, 4, 13)])
def test_filter_kernel_equals_the_pytorch_formulation(kernel, shape):
    """Inference (no gradient) runs the filter as one C++ call: the same filter as the
    separable PyTorch path, float32 rounding apart; axes shorter than the window
    (reflections that keep bouncing) and longer than the dense-operator limit
    included."""
    from colora_mm.adapters import RangeKernelFilter
    g = torch.Generator().manual_seed(sum(shape))
    z = torch.randn(shape, generator=g) * 2 + 0.5
    z[0, 0].fill_(0.25)                                     # a constant channel
    f = RangeKernelFilter()
    with torch.no_grad():
        native = U.range_filter(z, f.kernel1d(z), f.eps)
        assert native is not None
        assert torch.equal(f(z), native)                    # the module takes it
    reference = f._forward_separable(z.clone().requires_grad_(True)).detach()
    assert torch.isfinite(native).all()
    assert _relative(native, reference) < 2e-6


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=str)
def test_filter_kernel_serves_half_precision_maps(kernel, dtype, monkeypatch):
    """A bfloat16 / float16 map (merged inference under autocast) takes the C++ call
    too: cast to float32, filtered, cast back; the PyTorch path computes in float32 as
    well, so the two differ by at most one step of the low precision."""
    from colora_mm.adapters import RangeKernelFilter
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(2, 5, 20, 17, generator=g) * 2 + 0.5).to(dtype)
    z[0, 0].fill_(0.25)                                     # a constant channel
    f = RangeKernelFilter()
    calls = []
    native = U.range_filter

    def counted(*args):
        calls.append(args[0].dtype)
        return native(*args)

    monkeypatch.setattr(U, 'range_filter', counted)
    with torch.no_grad(), torch.autocast('cpu', dtype=dtype):
        out = f(z)
    assert calls == [torch.float32] and out.dtype == dtype
    assert torch.equal(out, native(z.float(), f.kernel1d(z.float()), f.eps).to(dtype))
    monkeypatch.setenv(U.ENV_CHOICE, 'conv')                # the PyTorch formulation
    with torch.no_grad(), torch.autocast('cpu', dtype=dtype):
        reference = f(z)
    step = torch.finfo(dtype).eps * reference.float().abs().clamp_min(1.0)
    assert ((out.float() - reference.float()).abs() <= step).all()


def test_filter_kernel_only_where_it_applies(kernel, monkeypatch):
    from colora_mm.adapters import RangeKernelFilter
    f = RangeKernelFilter()
    z = torch.randn(2, 3, 9, 9)
    k = f.kernel1d(z)
    assert U.range_filter(z.requires_grad_(True), k, f.eps) is None     # training
    z = z.detach()
    assert U.range_filter(z.double(), k.double(), f.eps) is None
    assert U.range_filter(z.transpose(2, 3), k, f.eps) is None          # not contiguous
    with torch.no_grad():
        assert U.range_filter(z.requires_grad_(True), k, f.eps) is not None
        monkeypatch.setenv(U.ENV_CHOICE, 'conv')
        assert U.range_filter(z, k, f.eps) is None
