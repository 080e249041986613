"""Trainable-parameter counts on the built modules against the closed forms
(appendix Table 1, and the branches' shapes as spatial.py and conv_adapter.py build them)."""
import pytest

from colora_mm.adapters import (AdapterSpec, inject_adapters, mark_trainable,
                                trainable_report)

from adapter_nets import (Bottleneck, ConvNeXtBlock, ConvPairNet, LinearPairNet,
                          adapter_param_count, expected_ranks)

PAIR_SHAPES = [
    (12, 20, 8, 2, 0.5), (16, 8, 12, 1, 0.25), (10, 15, 20, 2, 0.4),
    (12, 20, 8, 2, 0.0), (12, 20, 8, 2, 1.0), (12, 20, 8, 8, 0.5), (64, 256, 64, 16, 0.5),
]


@pytest.mark.parametrize('cls', [LinearPairNet, ConvPairNet])
@pytest.mark.parametrize('d,d_mid,d_out,gamma,share', PAIR_SHAPES)
def test_colora_pair_count_is_table_1(cls, d, d_mid, d_out, gamma, share):
    model = cls(d, d_mid, d_out)
    inject_adapters(model, AdapterSpec(method='colora', gamma=gamma, share_ratio=share),
                    pairs=model.pairs)
    _, r, rs, rl = expected_ranks(d, d_mid, d_out, gamma, share)
    closed_form = r * (d + d_out) + 2 * rl * d_mid
    assert adapter_param_count(model) == closed_form
    report = trainable_report(model)
    assert report['adapter'] == closed_form
    mark_trainable(model, 'colora')
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith('bias'))
    assert trainable_report(model)['trainable'] == closed_form + biases
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == \
        closed_form + biases


def test_spatial_branch_counts():
    """Depthwise style: A (r x C) + B (C x 1 x 3 x 3) = C r + 9 C.
    Dense style: A (r x w) + B (w x r) = 2 r w."""
    convnext = ConvNeXtBlock(16)
    layers = inject_adapters(convnext, AdapterSpec(method='colora', gamma=4),
                             pairs=convnext.pairs, spatial=convnext.spatial)
    c, r = 16, 16 // 4
    assert adapter_param_count(layers['dwconv']) == c * r + 9 * c
    # the whole block: pair (n = 16, r = 4, rs = rl = 2) + spatial branch
    assert adapter_param_count(convnext) == 4 * (16 + 16) + 2 * 2 * 64 + c * r + 9 * c

    res = Bottleneck(16, 8)
    layers = inject_adapters(res, AdapterSpec(method='colora', gamma=4),
                             pairs=res.pairs, spatial=res.spatial)
    w, r = 8, 8 // 4
    assert adapter_param_count(layers['conv2']) == 2 * r * w
    n, r_pair, rs, rl = expected_ranks(16, 8, 32, 4, 0.5)
    assert adapter_param_count(res) == r_pair * (16 + 32) + 2 * rl * 8 + 2 * r * w


@pytest.mark.parametrize('method', ['lora', 'pissa', 'hira'])
def test_pointwise_baseline_counts(method):
    """r (in + out) per layer; for a pair with equal ranks, r (d + 2 d' + d'')."""
    model = LinearPairNet(12, 20, 8)
    layers = inject_adapters(model, AdapterSpec(method=method, gamma=2), pairs=model.pairs)
    r1, r2 = min(12, 20) // 2, min(20, 8) // 2
    assert adapter_param_count(layers['fc1']) == r1 * (12 + 20)
    assert adapter_param_count(layers['fc2']) == r2 * (20 + 8)

    block = ConvNeXtBlock(16)
    inject_adapters(block, AdapterSpec(method=method, gamma=4), pairs=block.pairs)
    r = 16 // 4
    assert adapter_param_count(block) == r * (16 + 2 * 64 + 16)
    for layer_name in ('pwconv1', 'pwconv2'):
        adapter = getattr(block, layer_name).adapter_branch
        assert adapter.num_trainable() == sum(p.numel() for p in adapter.parameters())


def test_default_gammas():
    """Defaults: colora 16, lora/pissa/hira 20, conv_adapter 4."""
    model = LinearPairNet(40, 160, 40)
    inject_adapters(model, AdapterSpec(method='lora'), pairs=model.pairs)
    assert model.fc1.adapter_branch.rank == 40 // 20
    model = LinearPairNet(32, 128, 32)
    inject_adapters(model, AdapterSpec(method='colora'), pairs=model.pairs)
    assert model.fc1.adapter_branch.pair.r == 32 // 16
    block = ConvNeXtBlock(16)
    inject_adapters(block, AdapterSpec(method='conv_adapter'), spatial=block.spatial)
    assert block.dwconv.adapter_branch.width == 16 // 4


@pytest.mark.parametrize('net,act', [('convnext', 'gelu'), ('bottleneck', 'relu')])
def test_conv_adapter_count(net, act):
    """Down Conv(C_in, w, k, groups=w): C_in k^2; up 1x1 w -> C_out: w C_out; alpha C_out."""
    model = ConvNeXtBlock(16) if net == 'convnext' else Bottleneck(16, 8)
    layers = inject_adapters(model, AdapterSpec(method='conv_adapter', act=act),
                             spatial=model.spatial)
    (layer,) = layers.values()
    c_in, c_out = layer.in_channels, layer.out_channels
    k = layer.kernel_size[0]
    w = c_in // 4
    assert adapter_param_count(layer) == c_in * k * k + w * c_out + c_out
    assert layer.adapter_branch.num_trainable() == c_in * k * k + w * c_out + c_out
    assert trainable_report(model)['adapter'] == c_in * k * k + w * c_out + c_out


def test_full_adds_nothing_and_trains_everything():
    model = ConvNeXtBlock(16)
    assert inject_adapters(model, AdapterSpec(method='full')) == {}
    mark_trainable(model, 'full')
    report = trainable_report(model)
    total = sum(p.numel() for p in model.parameters())
    assert report == dict(total=total, base=total, trainable=total, adapter=0,
                          trainable_other=total)
    assert all(p.requires_grad for p in model.parameters())
