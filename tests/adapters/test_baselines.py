"""LoRA, PiSSA, HiRA and Conv-Adapter against their defining formulas."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from colora_mm.adapters import (AdapterSpec, adapter_state_dict, inject_adapters,
                                mark_trainable, merge_adapters,
                                reset_adapters_from_weights)

from adapter_nets import (Bottleneck, ConvNeXtBlock, ConvPairNet, LinearPairNet,
                          max_abs_diff, net_input, randomize_adapters)


def test_lora_delta_is_alpha_over_r_b_a():
    torch.manual_seed(0)
    model = ConvPairNet(12, 20, 8)
    layers = inject_adapters(model, AdapterSpec(method='lora', gamma=2, scaling=1.5),
                             pairs=model.pairs)
    randomize_adapters(model, std=0.3)
    for name, layer in layers.items():
        a = layer.adapter_branch
        want = 1.5 * (a.B.double() @ a.A.double())              # (out x in)
        got = layer.get_delta_weight()
        assert got.shape == layer.weight.shape                   # (out, in, 1, 1)
        assert max_abs_diff(got.reshape(want.shape), want) < 1e-6, name
    assert AdapterSpec(method='lora').scaling == 2.0             # alpha / r = 2


# -------------------------------------------------------------------- PiSSA
def _pissa(cls=LinearPairNet, gamma=4, seed=0, **kw):
    torch.manual_seed(seed)
    model = cls(**kw).eval()
    base = copy.deepcopy(model)
    layers = inject_adapters(model, AdapterSpec(method='pissa', gamma=gamma),
                             pairs=model.pairs)
    return base, model, layers


@pytest.mark.parametrize('cls', [LinearPairNet, ConvPairNet])
def test_pissa_reset_keeps_outputs_and_takes_the_principal_subspace(cls):
    base, model, layers = _pissa(cls, d=24, d_mid=40, d_out=16)
    originals = {n: l.weight.detach().double().reshape(l.weight.shape[0], -1).clone()
                 for n, l in layers.items()}
    reset_adapters_from_weights(model)
    x = net_input(model)
    with torch.no_grad():
        assert max_abs_diff(model(x), base(x)) < 1e-5
    for name, layer in layers.items():
        a = layer.adapter_branch
        W = originals[name]
        r = a.rank
        assert bool(a.svd_initialized)
        # residual + s B A = W
        residual = layer.weight.double().reshape(W.shape)
        low = 2.0 * (a.B.double() @ a.A.double())
        assert max_abs_diff(residual + low, W) < 1e-5, name
        # s B A is the best rank-r approximation: U_r S_r V_r^T
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        assert max_abs_diff(low, (U[:, :r] * S[:r]) @ Vh[:r]) < 1e-5, name
        # B spans the top-r left singular subspace, A the top-r right one
        P_u = U[:, :r] @ U[:, :r].T
        P_v = Vh[:r].T @ Vh[:r]
        B, A = a.B.double(), a.A.double()
        assert max_abs_diff(B - P_u @ B, torch.zeros_like(B)) < 1e-5, name
        assert max_abs_diff(A - A @ P_v, torch.zeros_like(A)) < 1e-5, name
        assert torch.linalg.matrix_rank(B).item() == r
        # the residual keeps the remaining spectrum
        res_s = torch.linalg.svdvals(residual)
        assert max_abs_diff(res_s[:len(S) - r], S[r:]) < 1e-5, name


def test_pissa_second_reset_does_nothing_and_state_records_it():
    base, model, layers = _pissa(LinearPairNet, d=24, d_mid=40, d_out=16)
    reset_adapters_from_weights(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reset_adapters_from_weights(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    sd = adapter_state_dict(model)
    assert 'fc1.adapter_branch.svd_initialized' in sd
    # a checkpoint of the trained model reloads without a second SVD
    randomize_adapters(model, std=0.2)
    x = net_input(model)
    with torch.no_grad():
        want = model(x)
    _, other, _ = _pissa(LinearPairNet, seed=1, d=24, d_mid=40, d_out=16)
    other.load_state_dict(model.state_dict())
    reset_adapters_from_weights(other)
    with torch.no_grad():
        assert torch.equal(other(x), want)


def test_pissa_merge_gives_back_the_trained_weight():
    base, model, layers = _pissa(LinearPairNet, d=24, d_mid=40, d_out=16)
    reset_adapters_from_weights(model)
    with torch.no_grad():
        layers['fc1'].adapter_branch.B.add_(0.05)
    x = net_input(model)
    with torch.no_grad():
        want = model(x)
        assert merge_adapters(model) == []
        assert max_abs_diff(model(x), want) < 1e-5


# -------------------------------------------------------------------- HiRA
@pytest.mark.parametrize('cls', [LinearPairNet, ConvPairNet])
def test_hira_output_and_factor_gradients_equal_the_written_out_update(cls):
    """In float64, a training step's output and the gradients of ``(out * v).sum()``
    with respect to ``A`` and ``B`` equal autograd's through ``W0 + s W0 (.) (B A)``,
    ``s = 1 / (sqrt(r) sigma_A)``, ``sigma_A = (1 / sqrt(in)) / sqrt(3)``, applied
    with plain ``F.linear`` / ``F.conv2d`` (relative 1e-6)."""
    torch.manual_seed(0)
    model = cls(12, 20, 8)
    layers = inject_adapters(model, AdapterSpec(method='hira', gamma=2), pairs=model.pairs)
    model.double()
    mark_trainable(model, 'hira')
    randomize_adapters(model, std=0.3)
    model.train()
    x = net_input(model).double()
    out = model(x)
    v = torch.randn(out.shape, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(2))
    (out * v).sum().backward()
    assert {layer.last_path for layer in layers.values()} == {'weight'}

    refs = {}
    for name, layer in layers.items():
        a = layer.adapter_branch
        A = a.A.detach().clone().requires_grad_()
        B = a.B.detach().clone().requires_grad_()
        r, fan_in = A.shape
        s = 1.0 / (math.sqrt(r) * (1.0 / math.sqrt(fan_in)) / math.sqrt(3.0))
        W0 = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        W = (W0 + s * W0 * (B @ A)).reshape(layer.weight.shape)
        refs[name] = (A, B, W, layer.bias.detach() if layer.bias is not None else None)

    def apply(name, h):
        _, _, W, bias = refs[name]
        return F.conv2d(h, W, bias) if W.dim() == 4 else F.linear(h, W, bias)

    first, second = cls.pairs[0]
    want = apply(second, model.act(apply(first, x)))
    (want * v).sum().backward()
    assert max_abs_diff(out, want) <= 1e-10 * want.abs().max().item()
    for name, layer in layers.items():
        a = layer.adapter_branch
        A, B, _, _ = refs[name]
        for got, ref in ((a.A.grad, A.grad), (a.B.grad, B.grad)):
            assert ref.abs().max() > 0
            assert max_abs_diff(got, ref) <= 1e-6 * ref.abs().max().item(), name
        assert layer.weight.grad is None                 # W0 stays frozen


# ------------------------------------------------------------- Conv-Adapter
class DilatedConvNet(torch.nn.Module):
    """One dilated 3x3 conv (padding 2, dilation 2: the output keeps the input's size),
    as in a dilated ResNet's later stages."""

    spatial = ['conv']

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=2, dilation=2)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize('net,act', [('convnext', 'gelu'), ('bottleneck', 'relu'),
                                     ('dilated', 'relu')])
def test_conv_adapter_forward(net, act):
    """out = conv(x) + alpha (.) Up(act(Down(x))), Down = Conv(C_in, w, k, stride,
    groups=w) with the conv's kernel, stride, padding and dilation."""
    torch.manual_seed(0)
    model = {'convnext': lambda: ConvNeXtBlock(16), 'bottleneck': lambda: Bottleneck(16, 8),
             'dilated': DilatedConvNet}[net]()
    layers = inject_adapters(model, AdapterSpec(method='conv_adapter', act=act),
                             spatial=model.spatial)
    randomize_adapters(model, std=0.3)
    (layer,) = layers.values()
    a = layer.adapter_branch
    c_in = layer.in_channels
    w = c_in // 4
    assert a.down.groups == w and a.down.weight.shape == (w, c_in // w) + layer.kernel_size
    assert a.down.stride == layer.stride and a.down.padding == layer.padding
    assert a.down.dilation == layer.dilation == ((2, 2) if net == 'dilated' else (1, 1))
    x = torch.randn(2, c_in, 9, 9, dtype=torch.float64)
    model.double()
    base = F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding,
                    layer.dilation, layer.groups)
    hidden = F.conv2d(x, a.down.weight, None, layer.stride, layer.padding, layer.dilation,
                      groups=w)
    hidden = F.gelu(hidden) if act == 'gelu' else F.relu(hidden)
    want = base + a.alpha.view(1, -1, 1, 1) * F.conv2d(hidden, a.up.weight)
    with torch.no_grad():
        assert max_abs_diff(layer(x), want) < 1e-10
    assert not layer.foldable
