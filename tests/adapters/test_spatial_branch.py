"""The spatial low-rank branch: ``out = conv(x) + scale * B(F(A(x)))`` with
``F(z) = z + lambda * Filter(z)``, in both styles, against float64 references."""
import pytest
import torch
import torch.nn.functional as F

from colora_mm.adapters import AdapterSpec, inject_adapters

from adapter_nets import Bottleneck, ConvNeXtBlock, max_abs_diff, randomize_adapters
from adapter_nets import window_range_filter


def _layer(net_cls, use_filter, gamma=4):
    torch.manual_seed(0)
    model = net_cls()
    layers = inject_adapters(model, AdapterSpec(method='colora', gamma=gamma,
                                                use_filter=use_filter, spatial=True),
                             pairs=model.pairs, spatial=model.spatial)
    randomize_adapters(model, std=0.3)
    return model, layers[model.spatial[0]]


def _input(c, hw, seed=4):
    return torch.randn(2, c, hw, hw, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


@pytest.mark.parametrize('use_filter', [True, False])
def test_dense_branch_resnet(use_filter):
    """ResNet conv2 (3x3, stride 2): A 1x1 w -> r, B 1x1 r -> w with conv2's stride,
    scale 0.5, r = w // gamma."""
    model, layer = _layer(Bottleneck, use_filter)
    branch = layer.adapter_branch
    w, r = 8, 8 // 4
    assert branch.style == 'dense' and branch.scale == 0.5
    assert branch.down.weight.shape == (r, w, 1, 1)
    assert branch.up.weight.shape == (w, r, 1, 1) and tuple(branch.up.stride) == (2, 2)
    model.double()
    x = _input(w, 10)
    A, B = branch.down.weight.detach(), branch.up.weight.detach()
    z = F.conv2d(x, A)
    if use_filter:
        z = z + 0.2 * window_range_filter(z)
    want = F.conv2d(x, layer.weight.detach(), None, 2, 1) + 0.5 * F.conv2d(z, B, stride=2)
    with torch.no_grad():
        assert max_abs_diff(layer(x), want) < 1e-6


@pytest.mark.parametrize('use_filter', [True, False])
def test_depthwise_branch_convnext(use_filter):
    """ConvNeXt dwconv (7x7, groups=C): A 1x1 C -> r, B 3x3 r -> C with groups = r,
    scale 1."""
    model, layer = _layer(ConvNeXtBlock, use_filter)
    branch = layer.adapter_branch
    c, r = 16, 16 // 4
    assert branch.style == 'depthwise' and branch.scale == 1.0
    assert branch.down.weight.shape == (r, c, 1, 1)
    assert branch.up.weight.shape == (c, 1, 3, 3) and branch.up.groups == r
    model.double()
    x = _input(c, 9)
    A, B = branch.down.weight.detach(), branch.up.weight.detach()
    z = F.conv2d(x, A)
    if use_filter:
        z = z + 0.2 * window_range_filter(z)
    want = (F.conv2d(x, layer.weight.detach(), layer.bias.detach(), 1, 3, groups=c)
            + F.conv2d(z, B, padding=1, groups=r))
    with torch.no_grad():
        assert max_abs_diff(layer(x), want) < 1e-6


def test_filter_lambda_is_used():
    torch.manual_seed(0)
    model = Bottleneck()
    layers = inject_adapters(model, AdapterSpec(method='colora', gamma=4,
                                                filter_lambda=0.7),
                             pairs=model.pairs, spatial=model.spatial)
    randomize_adapters(model, std=0.3)
    layer = layers['conv2']
    model.double()
    x = _input(8, 10)
    branch = layer.adapter_branch
    z = F.conv2d(x, branch.down.weight.detach())
    z = z + 0.7 * window_range_filter(z)
    want = (F.conv2d(x, layer.weight.detach(), None, 2, 1)
            + 0.5 * F.conv2d(z, branch.up.weight.detach(), stride=2))
    with torch.no_grad():
        assert max_abs_diff(layer(x), want) < 1e-6


def test_dense_fold_is_the_centre_tap():
    model, layer = _layer(Bottleneck, use_filter=False)
    branch = layer.adapter_branch
    delta = layer.get_delta_weight()
    assert delta.shape == layer.weight.shape
    want = 0.5 * (branch.up.weight.flatten(1).double() @ branch.down.weight.flatten(1).double())
    assert max_abs_diff(delta[:, :, 1, 1], want) < 1e-6
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[1, 1] = False
    assert delta[:, :, mask].abs().max() == 0


@pytest.mark.parametrize('conv', [
    dict(kernel_size=3, padding='same'),
    dict(kernel_size=5, padding=2),
    dict(kernel_size=(3, 5), padding=(1, 2)),
    dict(kernel_size=3, padding=2, dilation=2),
    dict(kernel_size=7, padding='same', groups=8),
    dict(kernel_size=5, padding=4, dilation=2, stride=2, groups=8)])
def test_every_size_keeping_conv_takes_the_branch(conv):
    """Any odd kernel whose padding keeps the input's size ("same", as a string or as
    numbers, dilated too) takes the branch; the dense style folds into its centre."""
    torch.manual_seed(0)
    base = torch.nn.Conv2d(8, 8, **conv)
    model = torch.nn.Sequential(base, torch.nn.Conv2d(8, 16, 1),
                                torch.nn.Conv2d(16, 8, 1)).double()
    inject_adapters(model, AdapterSpec(method='colora', gamma=4, use_filter=False),
                    spatial=['0'], pairs=[('1', '2')])
    randomize_adapters(model, std=0.3)
    layer = model[0]
    for hw in (7, 10):
        x = _input(8, hw)
        out = layer(x)
        assert out.shape == base(x).shape
    if layer.adapter_branch.style == 'dense':
        with torch.no_grad():
            want = layer(x)
            folded = F.conv2d(x, layer.weight + layer.get_delta_weight(), layer.bias,
                              layer.stride, layer.padding, layer.dilation)
        assert max_abs_diff(folded, want) < 1e-10
