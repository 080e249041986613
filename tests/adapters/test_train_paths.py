"""The two ways a low-rank update trains (activation and weight path), the partner
offsets that replace full partner copies, and the fast spatial up-projection."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from colora_mm.adapters import (AdapterSpec, inject_adapters,
                                is_adapter_name, iter_adapted_layers, mark_trainable,
                                merge_adapters, reset_adapters_from_weights)
from colora_mm.adapters.paths import path_costs, prefer_activation_path

from adapter_nets import (ConvNeXtBlock, ConvPairNet, LinearPairNet, MixedPairNet,
                          colora_deltas64, max_abs_diff)


class StridedConvPairNet(nn.Module):
    """A strided, padded 1x1 conv feeding a 1x1 conv (ResNet's downsampling layout)."""

    pairs = [('conv1', 'conv2')]
    spatial: list = []

    def __init__(self, d=12, d_mid=20, d_out=8):
        super().__init__()
        self.conv1 = nn.Conv2d(d, d_mid, 1, stride=2, padding=1)
        self.conv2 = nn.Conv2d(d_mid, d_out, 1)
        self.in_shape = (2, d, 5, 6)

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x)))


class ChannelsLastBlock(ConvNeXtBlock):
    """ConvNeXt's pointwise layers as ``nn.Linear`` on channels-last maps."""

    def __init__(self):
        super().__init__(channels=16)
        self.in_shape = (2, 16, 6, 5)


NETS = [LinearPairNet, ConvPairNet, MixedPairNet, StridedConvPairNet, ChannelsLastBlock]


class SecondLayerFirstBlock(ChannelsLastBlock):
    """The same block with its pair's second layer registered before the first: a copy
    reaches the pair through the second layer."""

    def __init__(self):
        super().__init__()
        order = ['pwconv2', 'dwconv', 'norm', 'pwconv1', 'act']
        self._modules = {name: self._modules[name] for name in order}


def _build(cls, spec_kw, path, seed=0):
    torch.manual_seed(seed)
    model = cls()
    inject_adapters(model, AdapterSpec(train_path=path, **spec_kw), pairs=model.pairs,
                    spatial=getattr(model, 'spatial', []))
    reset_adapters_from_weights(model)
    mark_trainable(model, spec_kw.get('method', 'colora'))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter_name(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.train()


def _input(model, seed=1):
    return torch.randn(*model.in_shape, generator=torch.Generator().manual_seed(seed))


def _run(model, x, v_seed=2):
    out = model(x)
    v = torch.randn(out.shape, generator=torch.Generator().manual_seed(v_seed))
    (out * v).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def _rel(a, b):
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-6)


SPECS = [dict(method='colora', gamma=2, share_ratio=s, spatial=False) for s in
         (0.0, 0.5, 1.0)] + [dict(method='lora', gamma=2), dict(method='pissa', gamma=2)]


@pytest.mark.parametrize('cls', NETS, ids=lambda c: c.__name__)
@pytest.mark.parametrize('spec_kw', SPECS, ids=lambda s: f"{s['method']}-{s.get('share_ratio')}")
def test_activation_and_weight_paths_give_the_same_outputs_and_gradients(cls, spec_kw):
    outs, grads = {}, {}
    for path in ('activation', 'weight'):
        model = _build(cls, spec_kw, path)
        outs[path], grads[path] = _run(model, _input(model))
        assert {layer.last_path for _, layer in iter_adapted_layers(model)} == {path}
        if spec_kw['method'] == 'colora':      # two steps: the partners moved in between
            outs[path + '2'], grads[path + '2'] = _run(model, _input(model, 4))
    assert _rel(outs['activation'], outs['weight']) < 1e-5
    names = [n for n in grads['weight'] if is_adapter_name(n)]
    assert names and set(names) <= set(grads['activation'])
    for n in grads['weight']:
        assert _rel(grads['activation'][n], grads['weight'][n]) < 1e-5, n
    if spec_kw['method'] == 'colora':
        assert _rel(outs['activation2'], outs['weight2']) < 1e-5
        for n in grads['weight2']:
            assert _rel(grads['activation2'][n], grads['weight2'][n]) < 1e-5, n


def test_auto_takes_the_activation_path_on_few_tokens():
    """64 tokens through a 256 -> 1024 -> 256 pair: forming two 256 x 1024 weights
    costs more than the thin products."""
    torch.manual_seed(0)
    model = LinearPairNet(256, 1024, 256)
    inject_adapters(model, AdapterSpec(method='colora', gamma=16), pairs=model.pairs)
    mark_trainable(model, 'colora')
    model.train()(torch.randn(64, 256)).sum().backward()
    assert [layer.last_path for _, layer in iter_adapted_layers(model)] == \
        ['activation', 'activation']
    # and many tokens through narrow layers take the weight path
    act, weight = path_costs(8192, 96, 384, 6)
    assert weight < act and not prefer_activation_path(8192, 96, 384, 6)
    assert prefer_activation_path(64, 256, 1024, 16)


@pytest.mark.parametrize('cls,x_shape', [(LinearPairNet, (8192, 96)),
                                         (ConvPairNet, (2, 96, 64, 64))],
                         ids=['linear', 'conv'])
def test_auto_takes_the_weight_path_on_many_tokens_through_narrow_layers(cls, x_shape):
    """8192 tokens through a 96 -> 384 -> 96 pair (rank 6): the weight-sized GEMM of
    the weight path costs less than the thin products' memory traffic, and a
    training-mode forward under ``train_path='auto'`` takes it on both layers. The
    linear net's activation is a ReLU: an input that GELU or LayerNorm could recompute
    takes the activation path whatever the cost model says."""
    torch.manual_seed(0)
    model = cls(96, 384, 96)
    model.act = nn.ReLU()
    inject_adapters(model, AdapterSpec(method='colora', gamma=16, train_path='auto'),
                    pairs=model.pairs)
    mark_trainable(model, 'colora')
    layers = [layer for _, layer in iter_adapted_layers(model)]
    assert [layer.train_path for layer in layers] == ['auto', 'auto']
    assert [layer.adapter_branch.low_rank(layer)[0].shape[1] for layer in layers] == [6, 6]
    model.train()(torch.randn(x_shape))
    assert [layer.last_path for layer in layers] == ['weight', 'weight']


def _saved_tensors(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize('spec_kw', [dict(method='colora', gamma=4), dict(method='lora'),
                                     dict(method='pissa')], ids=lambda s: s['method'])
def test_activation_path_forms_no_weight_sized_tensor(spec_kw):
    torch.manual_seed(0)
    model = LinearPairNet(32, 128, 32)
    inject_adapters(model, AdapterSpec(train_path='activation', **spec_kw),
                    pairs=model.pairs)
    reset_adapters_from_weights(model)
    mark_trainable(model, spec_kw['method'])
    params = {p.data_ptr() for p in model.parameters()}
    out, saved = _saved_tensors(lambda: model.train()(torch.randn(4, 32)))
    weight_size = 32 * 128
    for t in saved:
        assert t.numel() < weight_size or t.data_ptr() in params, tuple(t.shape)
    out.sum().backward()
    assert model.fc1.weight.grad is None and model.fc2.weight.grad is None


def test_hira_saves_no_scaled_weight_copy():
    """HiRA's weight path keeps one weight-sized tensor for backward (``W + W (.) sBA``,
    the weight the base op runs with), never ``s W`` besides it."""
    torch.manual_seed(0)
    model = LinearPairNet(32, 128, 32)
    inject_adapters(model, AdapterSpec(method='hira', gamma=4), pairs=model.pairs)
    mark_trainable(model, 'hira')
    params = {p.data_ptr() for p in model.parameters()}
    out, saved = _saved_tensors(lambda: model.train()(torch.randn(4, 32)))
    sized = [t for t in saved if t.numel() >= 32 * 128 and t.data_ptr() not in params]
    assert len(sized) <= 2             # at most the adapted weight of each layer
    for layer in (model.fc1, model.fc2):
        scaled = layer.adapter_branch.scaling * layer.weight.detach()
        assert not any(t.shape == scaled.shape and torch.equal(t, scaled) for t in sized)
    out.sum().backward()
    assert model.fc1.adapter_branch.B.grad.abs().max() > 0


# ------------------------------------------------------------------ partners
def _pair_model(policy, seed=0, d=12, d_mid=20, d_out=8):
    torch.manual_seed(seed)
    model = LinearPairNet(d, d_mid, d_out)
    inject_adapters(model, AdapterSpec(method='colora', gamma=2, partner_policy=policy),
                    pairs=model.pairs)
    reset_adapters_from_weights(model)
    mark_trainable(model, 'colora')
    return model


def _sgd_steps(model, steps, seed=0):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, model.fc1.in_channels, generator=g)).square().mean().backward()
        opt.step()


def test_effective_partner_is_a_rank_r_snapshot_not_a_copy():
    model = _pair_model('effective', d=32, d_mid=128, d_out=32)
    pair = model.fc1.adapter_branch.get_pair()
    assert sum(b.numel() for n, b in pair.named_buffers()) == 0    # partner = base
    _sgd_steps(model, 2)
    r = pair.r
    assert sum(b.numel() for b in pair.buffers()) == r * (32 + 128) + r * (128 + 32)
    # the snapshot is the update the last training step applied
    model.eval()
    W1 = model.fc1.weight.detach().double().T
    with torch.no_grad():
        dW1 = pair.delta(0).double()
    # one more training step: its partner W1 is the eval-mode effective weight from
    # before it (no parameter changed since)
    model.train()
    with torch.no_grad():
        model(torch.randn(5, 32))
    assert max_abs_diff(pair.partner_w1, W1 + dW1) < 1e-6


@pytest.mark.parametrize('policy', ['effective', 'frozen'])
def test_checkpoint_round_trip_restores_partners_exactly(policy):
    model = _pair_model(policy)
    _sgd_steps(model, 3)
    sd = copy.deepcopy(model.state_dict())
    twin = _pair_model(policy, seed=7)
    twin.load_state_dict(sd, strict=True)
    for index in (0, 1):
        assert torch.equal(twin.fc1.adapter_branch.get_pair().partner(index),
                           model.fc1.adapter_branch.get_pair().partner(index))
    # training goes on identically (the resumed partners are the same bits)
    _sgd_steps(model, 2, seed=1)
    _sgd_steps(twin, 2, seed=1)
    for (n, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize('policy', ['effective', 'frozen'])
def test_folding_the_independent_part_keeps_partners_and_outputs(policy):
    model = _pair_model(policy)
    _sgd_steps(model, 2)
    pair = model.fc1.adapter_branch.get_pair()
    x = torch.randn(5, 12)
    model.eval()
    before = [pair.partner(i).clone() for i in (0, 1)]
    with torch.no_grad():
        out = model(x)
    for fold in range(4):                    # repeated folds: offsets are compacted
        for _, layer in iter_adapted_layers(model):
            layer.adapter_branch.fold_independent_(layer)
        for i in (0, 1):
            assert max_abs_diff(pair.partner(i), before[i]) < 1e-5, (fold, i)
        with torch.no_grad():
            assert max_abs_diff(model(x), out) < 1e-5
        _sgd_steps(model, 1, seed=fold)
        model.eval()
        before = [pair.partner(i).clone() for i in (0, 1)]
        with torch.no_grad():
            out = model(x)
    width = pair.partner_l1.shape[1]
    assert width <= min(12, 20)


def test_merged_model_equals_unmerged_with_trained_partners():
    model = _pair_model('effective')
    _sgd_steps(model, 3)
    model.eval()
    x = torch.randn(5, 12)
    with torch.no_grad():
        want = model(x)
        merge_adapters(model)
        got = model(x)
    assert type(model.fc1) is nn.Linear and type(model.fc2) is nn.Linear
    assert max_abs_diff(got, want) < 1e-5


def test_checkpoint_with_full_partner_copies_is_converted():
    """The earlier layout stored ``partner_w1 = W1 + dW1`` (d x d') in full."""
    model = _pair_model('effective')
    _sgd_steps(model, 3)
    pair = model.fc1.adapter_branch.get_pair()
    sd = model.state_dict()
    for i, name in enumerate(('partner_w1', 'partner_w2')):
        sd[f'fc1.adapter_branch.pair.{name}'] = pair.partner(i).float().clone()
        for side in ('l', 'r'):
            sd.pop(f'fc1.adapter_branch.pair.partner_{side}{i + 1}')
    twin = _pair_model('effective', seed=5)
    twin.load_state_dict(sd, strict=True)
    tpair = twin.fc1.adapter_branch.get_pair()
    for i in (0, 1):
        assert max_abs_diff(tpair.partner(i), pair.partner(i)) < 1e-6
        assert tpair.offset(i)[0].shape[1] <= pair.r     # stored as a low-rank offset
    x = torch.randn(5, 12)
    model.eval(), twin.eval()
    with torch.no_grad():
        assert max_abs_diff(twin(x), model(x)) < 1e-5


def test_full_partner_copies_without_their_base_weights_are_refused():
    model = _pair_model('effective')
    pair_sd = {k.split('pair.', 1)[1]: v for k, v in model.state_dict().items()
               if '.pair.' in k}
    pair_sd['partner_w1'] = torch.zeros(12, 20)
    pair_sd['partner_w2'] = torch.zeros(20, 8)
    for k in ('partner_l1', 'partner_r1', 'partner_l2', 'partner_r2'):
        pair_sd.pop(k)
    from colora_mm.adapters import CoLoRAPair
    lone = CoLoRAPair(12, 20, 8, gamma=2)
    lone.load_state_dict(pair_sd)
    with pytest.raises(RuntimeError, match='full partner copies'):
        lone.delta(0)


# ---------------------------------------------------------------- precision
def test_float64_model_stays_float64_end_to_end():
    model = _pair_model('frozen').double()
    g = torch.Generator().manual_seed(3)
    pair = model.fc1.adapter_branch.get_pair()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter_name(name):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    factors = {k: getattr(pair, k).detach() for k in ('A1', 'B1', 'A2', 'B2', 'As', 'Bs')}
    W1 = model.fc1.weight.detach().T
    W2 = model.fc2.weight.detach().T
    dW1, dW2 = colora_deltas64(*factors.values(), W1, W2, pair.n)
    for index, want in enumerate((dW1, dW2)):
        got = pair.delta(index)
        assert got.dtype == torch.float64
        assert max_abs_diff(got, want) < 1e-12
    x = torch.randn(5, 12, dtype=torch.float64)
    ref = F.gelu(x @ (W1 + dW1) + model.fc1.bias.detach()) @ (W2 + dW2) + model.fc2.bias
    for path in ('activation', 'weight'):
        for _, layer in iter_adapted_layers(model):
            layer.train_path = path
        out = model.eval()(x)
        assert out.dtype == torch.float64 and max_abs_diff(out, ref) < 1e-12


def test_half_precision_parameters_form_deltas_in_float32():
    model = _pair_model('frozen')
    model.half()
    pair = model.fc1.adapter_branch.get_pair()
    assert pair.delta(0).dtype == torch.float32
    assert model.fc1.get_delta_weight().dtype == torch.float16


def test_bf16_autocast_outputs_stay_close_to_float32():
    """Under CPU bf16 autocast the base op and the thin products run in bf16, the
    factors, scalings and partner products in float32: the output stays within bf16's
    resolution of the float32 one (relative 2e-2)."""
    model = _pair_model('effective', d=32, d_mid=128, d_out=32)
    _sgd_steps(model, 2)
    model.eval()
    x = torch.randn(16, 32)
    with torch.no_grad():
        want = model(x)
        for path in ('activation', 'weight'):
            for _, layer in iter_adapted_layers(model):
                layer.train_path = path
            with torch.autocast('cpu', dtype=torch.bfloat16):
                got = model(x)
                assert model.fc1.adapter_branch.get_pair().delta(0).dtype == torch.float32
            assert _rel(got.float(), want) < 2e-2


def _saved_bytes(model, x):
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    buffers = {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in buffers:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return sum(seen.values()), out


@pytest.mark.parametrize('method', ['lora', 'colora'])
def test_activation_path_keeps_no_copy_of_layernorm_or_gelu_outputs(method):
    """Against the same block with no adapter (biases and norms train): the low-rank
    path recomputes its inputs from what LayerNorm and GELU keep anyway, so it adds
    only the thin ``x L`` products, not the ``T x C`` and ``T x 4C`` inputs."""
    block_in = (2, 16, 12, 12)
    x = torch.randn(block_in)
    sizes = {}
    for name, spec in (('bitfit', dict(method='bitfit')),
                       (method, dict(method=method, gamma=4, spatial=False))):
        torch.manual_seed(0)
        model = ChannelsLastBlock()
        inject_adapters(model, AdapterSpec(**spec), pairs=model.pairs)
        mark_trainable(model, spec['method'])
        sizes[name], out = _saved_bytes(model.train(), x)
        out.square().mean().backward()
    tokens = 2 * 12 * 12
    inputs = tokens * (16 + 64) * 4            # LayerNorm output + GELU output, float32
    extra = sizes[method] - sizes['bitfit']
    assert extra < inputs / 4, (extra, inputs)


def _producers():
    return {'leaf': lambda u: u * 1.0,
            'gelu': F.gelu,
            'layer_norm': lambda u: F.layer_norm(u, (u.shape[-1],), torch.linspace(0.5, 1.5, u.shape[-1]),
                                                 torch.linspace(-0.1, 0.1, u.shape[-1]))}


@pytest.mark.parametrize('producer', ['leaf', 'gelu', 'layer_norm'])
@pytest.mark.parametrize('with_bias', [True, False])
def test_fused_linear_low_rank_equals_the_separate_ops(producer, with_bias):
    """``linear_low_rank`` (base GEMM and update into one output, one input-gradient
    buffer) against ``F.linear(x, W, b) + (x L) R`` through plain autograd."""
    from colora_mm.adapters.lowrank import linear_low_rank
    g = torch.Generator().manual_seed(0)
    u = torch.randn(2, 5, 3, 8, generator=g, requires_grad=True)
    weight = torch.randn(12, 8, generator=g)
    bias = torch.randn(12, generator=g, requires_grad=True) if with_bias else None
    left = torch.randn(8, 3, generator=g, requires_grad=True)
    right = torch.randn(3, 12, generator=g, requires_grad=True)
    leaves = [t for t in (u, bias, left, right) if t is not None]
    v = torch.randn(2, 5, 3, 12, generator=g)
    make = _producers()[producer]
    out = linear_low_rank(make(u), weight, bias, left, right)
    got = torch.autograd.grad((out * v).sum(), leaves)
    x = make(u)
    ref = F.linear(x, weight, bias) + (x @ left) @ right
    want = torch.autograd.grad((ref * v).sum(), leaves)
    assert out.shape == ref.shape and _rel(out, ref) < 1e-6
    for a, b in zip(got, want):
        assert _rel(a, b) < 1e-6


def test_fused_linear_low_rank_output_takes_in_place_ops():
    from colora_mm.adapters.lowrank import linear_low_rank
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 8, generator=g, requires_grad=True)
    weight, bias = torch.randn(10, 8, generator=g), torch.randn(10, generator=g)
    left = torch.randn(8, 2, generator=g, requires_grad=True)
    right = torch.randn(2, 10, generator=g, requires_grad=True)
    out = linear_low_rank(x, weight, bias, left, right)
    out.mul_(2).relu_()
    out.sum().backward()
    ref = (2 * (F.linear(x, weight, bias) + (x @ left) @ right)).relu()
    want = torch.autograd.grad(ref.sum(), (x, left, right))
    for got, w in zip((x.grad, left.grad, right.grad), want):
        assert _rel(got, w) < 1e-6


def test_fused_linear_low_rank_refuses_a_trainable_base_weight():
    from colora_mm.adapters.lowrank import linear_low_rank
    weight = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(ValueError, match='base weight must be frozen'):
        linear_low_rank(torch.randn(2, 3), weight, None, torch.randn(3, 1), torch.randn(1, 4))


def test_activation_path_with_a_trainable_base_weight_trains_it_too():
    """A base weight left trainable (e.g. by a custom trainable set) cannot take the
    fused op: the layer sums base op and update instead, and the weight's gradient is
    the weight path's."""
    grads = {}
    for path in ('activation', 'weight'):
        model = _build(LinearPairNet, dict(method='lora', gamma=2), path)
        model.fc1.weight.requires_grad_(True)
        _, grads[path] = _run(model, _input(model))
    assert _rel(grads['activation']['fc1.weight'], grads['weight']['fc1.weight']) < 1e-5
    for n in grads['weight']:
        assert _rel(grads['activation'][n], grads['weight'][n]) < 1e-5, n


@pytest.mark.parametrize('d_out', [6, 12])
@pytest.mark.parametrize('producer', ['gelu', 'layer_norm', 'layer_norm_2d'])
def test_factor_gradient_recomputed_in_pieces_equals_the_whole(monkeypatch, producer,
                                                                d_out):
    """The backward recomputes a LayerNorm or GELU input piece by piece (a few rows
    at a time), and on a widening layer (8 -> 12) ``z = x L`` from the same pieces;
    with pieces of a few rows the factor gradients equal plain autograd's, also for a
    LayerNorm over two axes (only the axes before them are cut)."""
    from colora_mm.adapters import lowrank
    monkeypatch.setattr(lowrank, 'RECOMPUTE_PIECE_BYTES', 3 * 8 * 4)
    g = torch.Generator().manual_seed(0)
    u = torch.randn(3, 5, 4, 8, generator=g).permute(0, 2, 1, 3).requires_grad_()
    make = {'gelu': F.gelu,
            'layer_norm': lambda t: F.layer_norm(t, (8,)),
            'layer_norm_2d': lambda t: F.layer_norm(t, (5, 8))}[producer]
    weight, bias = torch.randn(d_out, 8, generator=g), torch.randn(d_out, generator=g)
    left = torch.randn(8, 2, generator=g, requires_grad=True)
    right = torch.randn(2, d_out, generator=g, requires_grad=True)
    v = torch.randn(3, 4, 5, d_out, generator=g)
    x = make(u)
    assert lowrank.producer_recipe(x) is not None
    pieces = list(lowrank._pieces(lowrank.producer_recipe(x), x.shape, 4))
    assert len(pieces) > 1 and pieces[-1][2] == 3 * 4 * 5
    out = lowrank.linear_low_rank(x, weight, bias, left, right)
    got = torch.autograd.grad((out * v).sum(), (u, left, right))
    x = make(u)
    ref = F.linear(x, weight, bias) + (x @ left) @ right
    want = torch.autograd.grad((ref * v).sum(), (u, left, right))
    for a, b in zip(got, want):
        assert _rel(a, b) < 1e-5


def test_recomputed_input_is_cut_into_pieces_on_the_cpu_only(monkeypatch):
    """The pieces serve the CPU's caches; another device (a GPU) recomputes ``x`` whole,
    one piece, whatever the piece size."""
    from colora_mm.adapters import lowrank
    monkeypatch.setattr(lowrank, 'RECOMPUTE_PIECE_BYTES', 3 * 8 * 4)
    x = F.gelu(torch.randn(3, 4, 5, 8, requires_grad=True))
    recipe = lowrank.producer_recipe(x)
    assert len(list(lowrank._pieces(recipe, x.shape, 4, 'cpu'))) > 1
    assert list(lowrank._pieces(recipe, x.shape, 4, 'cuda')) == [((), 0, 60)]
    assert lowrank.piece_bytes('cpu') == 3 * 8 * 4
    assert lowrank.piece_bytes('cuda') is None


def test_fused_linear_low_rank_under_bf16_autocast_trains_in_bf16():
    """Under autocast the fused op runs on bf16 copies (like F.linear there): the
    output is bf16, the gradients reach the float32 leaves in float32, within bf16's
    resolution of the float32 ones (relative 5e-2)."""
    from colora_mm.adapters.lowrank import linear_low_rank
    g = torch.Generator().manual_seed(0)
    u = torch.randn(4, 6, 16, generator=g, requires_grad=True)
    weight, bias = torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
    left = torch.randn(16, 3, generator=g, requires_grad=True)
    right = torch.randn(3, 24, generator=g, requires_grad=True)
    v = torch.randn(4, 6, 24, generator=g)
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype != torch.float32):
            out = linear_low_rank(F.gelu(u), weight, bias, left, right,
                                  dtype=dtype)
        assert out.dtype == dtype
        grads[dtype] = torch.autograd.grad((out.float() * v).sum(), (u, left, right))
    for a, b in zip(grads[torch.bfloat16], grads[torch.float32]):
        assert a.dtype == torch.float32 and _rel(a, b) < 5e-2


@pytest.mark.parametrize('shapes', [((20, 12), (20, 8)), ((12, 20), (20, 9)),
                                    ((12, 16), (16, 8))])
def test_full_partner_copies_of_another_shape_are_refused(shapes):
    """The earlier layout's copies are checked against the pair's sides at load time,
    not at the first forward."""
    model = _pair_model('effective')
    sd = model.state_dict()
    for i, name in enumerate(('partner_w1', 'partner_w2')):
        sd[f'fc1.adapter_branch.pair.{name}'] = torch.zeros(shapes[i])
        for side in ('l', 'r'):
            sd.pop(f'fc1.adapter_branch.pair.partner_{side}{i + 1}')
    twin = _pair_model('effective', seed=5)
    with pytest.raises(RuntimeError) as info:
        twin.load_state_dict(sd, strict=True)
    msg = str(info.value)
    for fragment in ('fc1.adapter_branch.pair', f'partner_w1 {shapes[0]}',
                     f'partner_w2 {shapes[1]}', "(12, 20) (d x d')",
                     "(20, 8) (d' x d'')", 'config the checkpoint was trained with'):
        assert fragment in msg, f'{fragment!r} not in: {msg}'


@pytest.mark.parametrize('op', ['linear_low_rank', 'low_rank_product'])
@pytest.mark.parametrize('producer, d_in, d_out, kept', [
    ('layer_norm', 8, 32, ()),             # widening, x and z recomputed
    ('gelu', 32, 8, ((2, 60),)),           # narrowing: z^T (k x T) kept
    ('relu', 8, 32, ((2, 60), (60, 8)))])  # no recipe: z^T and x kept
def test_what_the_low_rank_ops_keep_for_backward(op, producer, d_in, d_out, kept):
    """Besides the weights and factors, the ops keep ``z^T`` only where recomputing
    ``z = x L`` would cost more than it saves (a narrowing layer), and ``x`` only
    where its producer cannot recompute it."""
    from colora_mm.adapters import lowrank
    g = torch.Generator().manual_seed(0)
    u = torch.randn(3, 20, d_in, generator=g, requires_grad=True)
    make = {'layer_norm': lambda t: F.layer_norm(t, (d_in,)), 'gelu': F.gelu,
            'relu': F.relu}[producer]
    weight = torch.randn(d_out, d_in, generator=g)
    left = torch.randn(d_in, 2, generator=g, requires_grad=True)
    right = torch.randn(2, d_out, generator=g, requires_grad=True)
    x = make(u)
    fixed = {t.data_ptr() for t in (u, weight, left, right)}
    shapes = []

    def pack(t):
        if t.data_ptr() not in fixed:
            shapes.append(tuple(t.reshape(-1, t.shape[-1]).shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if op == 'linear_low_rank':
            out = lowrank.linear_low_rank(x, weight, None, left, right)
        else:
            out = lowrank.low_rank_product(x, left, right)
    assert sorted(shapes) == sorted(kept)
    got = torch.autograd.grad(out.sum(), (u, left, right))
    ref = ((F.linear(make(u), weight) if op == 'linear_low_rank' else 0)
           + (make(u) @ left) @ right)
    want = torch.autograd.grad(ref.sum(), (u, left, right))
    for a, b in zip(got, want):
        assert _rel(a, b) < 1e-5


@pytest.mark.parametrize('cls,spec', [
    (ConvPairNet, dict(method='colora', gamma=4, share_ratio=0.5, spatial=False)),
    (ChannelsLastBlock, dict(method='colora', gamma=6, share_ratio=0.5, spatial=True)),
    (ChannelsLastBlock, dict(method='lora', gamma=12)),
    (ChannelsLastBlock, dict(method='pissa', gamma=12))])
@pytest.mark.parametrize('path', ['activation', 'weight'])
def test_rank_one_factors_get_their_gradient_in_their_own_strides(cls, spec, path):
    """A ``d x 1`` factor's gradient arrives in the factor's strides (what DDP's
    buckets expect); the values are those autograd computes without the hook."""
    model = _build(cls, spec, path)
    bare = copy.deepcopy(model)
    for p in bare.parameters():
        p._backward_hooks = None
    x = _input(model)
    _, grads = _run(model, x)
    _, bare_grads = _run(bare, x)
    params = dict(model.named_parameters())
    rank_one = [n for n, p in params.items() if is_adapter_name(n) and 1 in p.shape]
    assert rank_one
    assert grads.keys() == bare_grads.keys()
    for name in grads:
        assert params[name].grad.stride() == params[name].stride(), name
        assert torch.equal(grads[name], bare_grads[name]), name
    if path == 'activation':    # without the hook, some of them arrive transposed
        assert any(p.grad.stride() != p.stride() for n, p in bare.named_parameters()
                   if n in rank_one)


@pytest.mark.parametrize('cls', [ChannelsLastBlock, SecondLayerFirstBlock])
@pytest.mark.parametrize('how', ['deepcopy', 'pickle'])
def test_copies_of_an_adapted_model_keep_the_gradient_strides(how, cls):
    """Autograd does not copy tensor hooks: a deep copy (EMA, a model built from
    another) or an unpickled model gets them back from its adapted layers, once,
    whichever of a pair's layers the module tree lists first."""
    import io
    model = _build(cls, dict(method='colora', gamma=6, share_ratio=0.5,
                             spatial=True), 'activation')
    if how == 'deepcopy':
        other = copy.deepcopy(model)
    else:
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        other = torch.load(buf, weights_only=False)
    rank_one = [p for n, p in other.named_parameters()
                if is_adapter_name(n) and p.dim() == 2 and 1 in p.shape]
    assert rank_one
    for p in rank_one:
        assert len(p._backward_hooks or {}) == 1
    _, grads = _run(other, _input(other))
    _, want = _run(model, _input(model))
    for p in rank_one:
        assert p.grad.stride() == p.stride()
    assert grads.keys() == want.keys()
    for name in grads:
        assert torch.equal(grads[name], want[name]), name
