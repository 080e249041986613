"""What trains (mark_trainable), what an adapter checkpoint holds (adapter_state_dict)
and folding the independent part (fold_independent_)."""
import math

import pytest
import torch
import torch.nn as nn

from colora_mm.adapters import (AdapterSpec, adapter_state_dict, inject_adapters,
                                iter_adapted_layers, mark_trainable,
                                reset_adapters_from_weights)

from adapter_nets import Bottleneck, ConvNeXtBlock, build, max_abs_diff, net_input
from adapter_nets import randomize_adapters


class TwoBlocks(nn.Module):
    """A ConvNeXt block, a ResNet bottleneck, a GroupNorm and a 1x1 head."""

    def __init__(self):
        super().__init__()
        self.block = ConvNeXtBlock(16)
        self.res = Bottleneck(16, 8)
        self.gn = nn.GroupNorm(4, 32)
        self.head = nn.Conv2d(32, 5, 1)

    def forward(self, x):
        return self.head(self.gn(self.res(self.block(x))))


PAIRS = [('block.pwconv1', 'block.pwconv2'), ('res.conv1', 'res.conv3')]
SPATIAL = ['block.dwconv', 'res.conv2']
# written out from the rule (adapters, every bias, every norm; nothing else)
BASE_TRAINABLE = {
    'block.dwconv.bias', 'block.norm.weight', 'block.norm.bias', 'block.pwconv1.bias',
    'block.pwconv2.bias', 'res.bn1.weight', 'res.bn1.bias', 'res.bn2.weight',
    'res.bn2.bias', 'res.bn3.weight', 'res.bn3.bias', 'res.downsample.1.weight',
    'res.downsample.1.bias', 'gn.weight', 'gn.bias', 'head.bias',
}
BASE_FROZEN = {
    'block.dwconv.weight', 'block.pwconv1.weight', 'block.pwconv2.weight', 'block.gamma',
    'res.conv1.weight', 'res.conv2.weight', 'res.conv3.weight', 'res.downsample.0.weight',
    'head.weight',
}


def _two_blocks(method, **kw):
    torch.manual_seed(0)
    model = TwoBlocks()
    spec = AdapterSpec(method=method, gamma=4 if method != 'conv_adapter' else None, **kw)
    inject_adapters(model, spec, pairs=PAIRS, spatial=SPATIAL)
    return model


@pytest.mark.parametrize('method', ['colora', 'lora', 'pissa', 'hira', 'conv_adapter'])
def test_mark_trainable_peft(method):
    model = _two_blocks(method)
    mark_trainable(model, method)
    params = dict(model.named_parameters())
    assert BASE_TRAINABLE | BASE_FROZEN == {n for n in params if 'adapter_' not in n}
    for name in BASE_TRAINABLE:
        assert params[name].requires_grad, name
    for name in BASE_FROZEN:
        assert not params[name].requires_grad, name
    adapters = [n for n in params if 'adapter_' in n]
    assert adapters
    for name in adapters:
        assert params[name].requires_grad, name


def test_mark_trainable_full_trains_everything():
    model = TwoBlocks()
    mark_trainable(model, 'colora')
    mark_trainable(model, 'full')
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match='method'):
        mark_trainable(model, 'adapterfusion')


def test_frozen_weights_get_no_gradient_and_do_not_move():
    model = _two_blocks('colora')
    reset_adapters_from_weights(model)
    mark_trainable(model, 'colora')
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n in BASE_FROZEN}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(2, 16, 10, 10)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p, frozen[n]), n


@pytest.mark.parametrize('method', ['colora', 'lora', 'pissa', 'hira', 'conv_adapter'])
def test_adapter_state_dict_holds_only_adapter_tensors(method):
    model = _two_blocks(method)
    reset_adapters_from_weights(model)
    sd = adapter_state_dict(model)
    full = model.state_dict()
    want = {k for k in full if any(part.startswith('adapter_') for part in k.split('.'))}
    assert set(sd) == want and sd
    for k, v in sd.items():
        assert v is full[k] or torch.equal(v, full[k])
    params = {n for n, _ in model.named_parameters() if 'adapter_' in n}
    assert params <= set(sd)
    assert not (set(sd) & (BASE_TRAINABLE | BASE_FROZEN))
    assert not any('running_' in k or 'kernel1d' in k for k in sd)
    if method == 'colora':
        for first, _ in PAIRS:
            assert f'{first}.adapter_branch.pair.partner_l1' in sd
            assert f'{first}.adapter_branch.pair.partner_r2' in sd
    if method == 'pissa':
        assert 'block.pwconv1.adapter_branch.svd_initialized' in sd
    # loading it into a freshly injected twin reproduces the adapted model
    randomize_adapters(model)
    sd = adapter_state_dict(model)
    twin = _two_blocks(method)
    twin.load_state_dict(model.state_dict(), strict=True)   # the full state loads
    fresh = _two_blocks(method)
    missing, unexpected = fresh.load_state_dict(sd, strict=False)
    assert unexpected == []
    assert not any('adapter_' in k for k in missing)
    if method == 'pissa':   # the base weight is the residual: it travels with the base
        fresh.load_state_dict({k: v for k, v in model.state_dict().items()
                               if k not in sd}, strict=False)
    model.eval()
    fresh.eval()
    x = torch.randn(2, 16, 10, 10)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


# ------------------------------------------------------------ fold_independent_
@pytest.mark.parametrize('net,method', [
    ('linear_pair', 'colora'), ('conv_pair', 'colora'), ('convnext', 'colora'),
    ('linear_pair', 'lora'), ('conv_pair', 'hira'), ('linear_pair', 'pissa')])
def test_fold_independent_keeps_outputs_and_reinitialises(net, method):
    model = build(net)
    gamma = 4 if net == 'convnext' else 2
    layers = inject_adapters(model, AdapterSpec(method=method, gamma=gamma, spatial=False),
                             pairs=model.pairs)
    reset_adapters_from_weights(model)
    randomize_adapters(model, std=0.3)
    model.eval()
    x = net_input(model)
    with torch.no_grad():
        want = model(x)
    shared_before = {n: p.detach().clone() for n, p in model.named_parameters()
                     if n.endswith(('.As', '.Bs'))}
    for name, layer in layers.items():
        adapter = layer.adapter_branch
        old = {id(p): p.detach().clone() for p in model.parameters()}
        returned = adapter.fold_independent_(layer)
        assert returned, name
        assert all(id(p) in old for p in returned)       # the model's own parameters
        assert all(not torch.equal(p, old[id(p)]) for p in returned), name
        if method == 'colora':
            A, B = returned
            assert torch.count_nonzero(B) == 0
            fan_in = A.shape[0]
            assert A.abs().max() <= 1 / math.sqrt(fan_in) + 1e-7
        elif method in ('lora', 'hira'):
            assert torch.count_nonzero(adapter.B) == 0
            assert adapter.A.abs().max() <= 1 / math.sqrt(adapter.A.shape[1]) + 1e-7
        else:
            assert bool(adapter.svd_initialized)
    with torch.no_grad():
        assert max_abs_diff(model(x), want) < 1e-5
    for n, p in model.named_parameters():       # the shared part is not folded
        if n in shared_before:
            assert torch.equal(p, shared_before[n]), n
    # nothing independent is left: a second fold changes nothing
    with torch.no_grad():
        weights = {n: l.weight.clone() for n, l in iter_adapted_layers(model)}
        if method != 'pissa':
            for _, layer in layers.items():
                layer.adapter_branch.fold_independent_(layer)
            for n, l in iter_adapted_layers(model):
                assert max_abs_diff(l.weight, weights[n]) == 0.0, n
