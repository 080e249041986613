"""The correlated pair (Eqs. 14-15): deltas, ranks, gradients and partner buffers."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from colora_mm.adapters import (AdapterSpec, CoLoRAPair, CoLoRAPairLayer, inject_adapters,
                                mark_trainable, reset_adapters_from_weights)

from colora_mm.adapters.colora_pair import pair_ranks

from adapter_nets import (ConvPairNet, LinearPairNet, MixedPairNet, colora_deltas64,
                          expected_ranks, max_abs_diff, net_input, randomize_adapters)

# (d, d', d'', gamma, share_ratio): the usual case, rs = 0, rl = 0, floor cases.
SHAPES = [
    (12, 20, 8, 2, 0.5),     # n=8  r=4 rs=2 rl=2
    (16, 8, 12, 1, 0.25),    # n=8  r=8 rs=2 rl=6
    (10, 15, 20, 2, 0.4),    # n=10 r=5 rs=2 rl=3
    (9, 14, 7, 2, 0.5),      # n=7  r=3 rs=1 rl=2
    (12, 20, 8, 2, 0.0),     # rs = 0: no shared part
    (12, 20, 8, 2, 1.0),     # rl = 0: shared part only
    (12, 20, 8, 8, 0.5),     # r=1: rs = floor(0.5) = 0
    (12, 20, 8, 4, 0.9),     # r=2: rs = floor(1.8) = 1
]


def _pair_of(model, first):
    return getattr(model, first).adapter_branch.pair


def _paper(layer_weight):
    """PyTorch ``(out, in[, 1, 1])`` -> paper ``(in x out)``."""
    return layer_weight.reshape(layer_weight.shape[0], -1).T


def _build(cls, d, d_mid, d_out, gamma, share, policy='effective', seed=0):
    torch.manual_seed(seed)
    model = cls(d, d_mid, d_out)
    spec = AdapterSpec(method='colora', gamma=gamma, share_ratio=share,
                       partner_policy=policy)
    layers = inject_adapters(model, spec, pairs=model.pairs)
    reset_adapters_from_weights(model)
    return model, layers


def _set_random_partners(pair, seed=5):
    """Partners far from the base weights: full-rank random offsets, so that
    ``partner = base + L R`` is an arbitrary matrix."""
    g = torch.Generator().manual_seed(seed)
    for index, (din, dout) in enumerate(pair.side_shapes()):
        k = min(din, dout)
        pair.set_partner_offset(index, torch.randn(din, k, generator=g) * 0.3,
                                torch.randn(k, dout, generator=g) * 0.3)


def factor(pair, name):
    """A pair factor; an empty part (rs = 0 or rl = 0) has no parameter, which reads as
    a zero-size tensor of its shape here."""
    shapes = {'A1': (pair.d, pair.rl), 'B1': (pair.rl, pair.d_mid),
              'A2': (pair.d_mid, pair.rl), 'B2': (pair.rl, pair.d_out),
              'As': (pair.d, pair.rs), 'Bs': (pair.rs, pair.d_out)}
    param = getattr(pair, name)
    if param is None:
        assert 0 in shapes[name], f'{name} missing although its rank is non-zero'
        return torch.zeros(shapes[name], requires_grad=True)
    return param


def _ref(pair):
    n = min(pair.partner_w1.shape[0], pair.partner_w1.shape[1], pair.partner_w2.shape[1])
    return colora_deltas64(*(factor(pair, k) for k in ('A1', 'B1', 'A2', 'B2', 'As', 'Bs')),
                           pair.partner_w1, pair.partner_w2, n)


@pytest.mark.parametrize('d,d_mid,d_out,gamma,share', SHAPES)
def test_ranks_and_shapes(d, d_mid, d_out, gamma, share):
    model, _ = _build(LinearPairNet, d, d_mid, d_out, gamma, share)
    pair = _pair_of(model, 'fc1')
    n, r, rs, rl = expected_ranks(d, d_mid, d_out, gamma, share)
    assert (pair.r, pair.rs, pair.rl) == (r, rs, rl)
    for k, shape in dict(A1=(d, rl), B1=(rl, d_mid), A2=(d_mid, rl), B2=(rl, d_out),
                         As=(d, rs), Bs=(rs, d_out)).items():
        if 0 in shape:     # an empty part has no parameter at all
            assert getattr(pair, k) is None, k
        else:
            assert getattr(pair, k).shape == shape, k
    assert pair.partner_w1.shape == (d, d_mid) and pair.partner_w2.shape == (d_mid, d_out)


@pytest.mark.parametrize('n,share,rs', [(90, 0.7, 63), (170, 0.7, 119), (90, 0.5, 45),
                                         (7, 0.5, 3), (10, 0.3, 3), (9, 1 / 3, 3)])
def test_the_shared_rank_is_the_floor_of_the_ratio_meant(n, share, rs):
    """``rs = floor(r share_ratio)`` of the ratio meant: in binary floating point
    90 * 0.7 is 62.99..., which must not floor to 62."""
    assert pair_ranks(n, 1, share) == (n, rs, n - rs)


@pytest.mark.parametrize('cls', [LinearPairNet, ConvPairNet, MixedPairNet])
@pytest.mark.parametrize('d,d_mid,d_out,gamma,share', SHAPES)
def test_deltas_equal_float64_eqs_14_15(cls, d, d_mid, d_out, gamma, share):
    model, layers = _build(cls, d, d_mid, d_out, gamma, share)
    first, second = cls.pairs[0]
    pair = _pair_of(model, first)
    randomize_adapters(model, std=0.3)
    _set_random_partners(pair)             # the partners, not the live weights, enter
    dW1, dW2 = _ref(pair)
    l1, l2 = layers[first], layers[second]
    got1, got2 = l1.get_delta_weight(), l2.get_delta_weight()
    assert got1.shape == l1.weight.shape and got2.shape == l2.weight.shape
    tol = 1e-5 * max(dW1.abs().max().item(), dW2.abs().max().item(), 1.0)
    assert max_abs_diff(_paper(got1), dW1) < tol
    assert max_abs_diff(_paper(got2), dW2) < tol
    assert pair.delta(0).dtype == torch.float32
    # the training-mode delta is the same function of the parameters
    model.train()
    assert max_abs_diff(_paper(l1.adapter_branch.delta_weight(l1)), dW1) < tol
    model.eval()


def test_linear_pair_forward_equals_float64_reference():
    model, _ = _build(LinearPairNet, 12, 20, 8, 2, 0.5)
    randomize_adapters(model, std=0.3)
    pair = _pair_of(model, 'fc1')
    _set_random_partners(pair)
    x = net_input(model)
    dW1, dW2 = _ref(pair)
    W1 = model.fc1.weight.double().T + dW1
    W2 = model.fc2.weight.double().T + dW2
    ref = F.gelu(x.double() @ W1 + model.fc1.bias.double()) @ W2 + model.fc2.bias.double()
    assert max_abs_diff(model(x), ref) < 1e-5


@pytest.mark.parametrize('share', [0.5, 0.0, 1.0])
def test_gradients_equal_float64_reference(share):
    """Gradients of every adapter tensor, through the std terms of the scalings."""
    model, _ = _build(LinearPairNet, 12, 20, 8, 2, share, policy='frozen')
    randomize_adapters(model, std=0.3)
    pair = _pair_of(model, 'fc1')
    _set_random_partners(pair)
    x = net_input(model)
    model.train()
    v = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    (model(x) * v).sum().backward()

    names = ['A1', 'B1', 'A2', 'B2', 'As', 'Bs']
    leaves = {k: factor(pair, k).detach().double().requires_grad_(True) for k in names}
    dW1, dW2 = colora_deltas64(*(leaves[k] for k in names), pair.partner_w1,
                               pair.partner_w2, 8)
    W1 = model.fc1.weight.detach().double().T + dW1
    W2 = model.fc2.weight.detach().double().T + dW2
    out = F.gelu(x.double() @ W1 + model.fc1.bias.detach().double()) @ W2 \
        + model.fc2.bias.detach().double()
    (out * v.double()).sum().backward()
    for k in names:
        if leaves[k].numel() == 0:        # an empty part (rs = 0 or rl = 0)
            continue
        got, want = getattr(pair, k).grad, leaves[k].grad
        assert got is not None, k
        scale = max(want.abs().max().item(), 1e-3)
        assert max_abs_diff(got, want) < 1e-4 * scale, k
    # A's gradient goes through the std term too: with B fixed it is not A-independent
    if pair.rl:
        assert pair.A1.grad.abs().max() > 0


def test_scaling_uses_unbiased_std_and_fourth_root():
    """Sensitivity: a biased std or a square root instead of the fourth root moves the
    delta by more than the tolerance used above."""
    model, layers = _build(LinearPairNet, 12, 20, 8, 2, 0.5)
    randomize_adapters(model, std=0.3)
    pair = _pair_of(model, 'fc1')
    got = _paper(layers['fc1'].get_delta_weight()).double()
    A1, B1, As, Bs = (t.detach().double() for t in (pair.A1, pair.B1, pair.As, pair.Bs))
    C = Bs @ pair.partner_w2.double().T
    biased = (A1 @ B1) / (math.sqrt(2) * (A1.std(unbiased=False) + B1.std(unbiased=False))) \
        + (As @ C) / ((2 * 8) ** 0.25 * (C.std(unbiased=False) + As.std(unbiased=False)))
    assert max_abs_diff(got, biased) > 1e-4


# ------------------------------------------------------------------- partners
def _train_step(model, x, lr=0.1):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def test_partners_start_at_the_pretrained_weights_in_paper_orientation():
    for cls in (LinearPairNet, ConvPairNet, MixedPairNet):
        model, _ = _build(cls, 12, 20, 8, 2, 0.5)
        first, second = cls.pairs[0]
        pair = _pair_of(model, first)
        assert torch.equal(pair.partner_w1, _paper(getattr(model, first).weight))
        assert torch.equal(pair.partner_w2, _paper(getattr(model, second).weight))


@pytest.mark.parametrize('cls', [LinearPairNet, ConvPairNet])
def test_effective_policy_takes_detached_effective_weights(cls):
    model, layers = _build(cls, 12, 20, 8, 2, 0.5, policy='effective')
    first, second = cls.pairs[0]
    randomize_adapters(model, std=0.3)
    pair = _pair_of(model, first)
    x = net_input(model)
    model.train()
    for step in range(2):
        # both layers of this forward use the partners from before it
        dW1, dW2 = _ref(pair)
        W1 = _paper(layers[first].weight).double()
        W2 = _paper(layers[second].weight).double()
        out = model(x)
        assert max_abs_diff(pair.partner_w1, W1 + dW1) < 1e-5
        assert max_abs_diff(pair.partner_w2, W2 + dW2) < 1e-5
        assert not pair.partner_w1.requires_grad and not pair.partner_w2.requires_grad
        assert pair.partner_w1.grad_fn is None and pair.partner_w2.grad_fn is None
        assert pair.partner_w1.shape == (12, 20)          # (d x d'): weight1.T
        out.square().mean().backward()                    # the update broke no graph
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.1 * p.grad
                    p.grad = None
    sd = model.state_dict()
    for name in ('partner_l1', 'partner_r1', 'partner_l2', 'partner_r2'):
        assert f'{first}.adapter_branch.pair.{name}' in sd
    # a snapshot of width r per side, never a full copy
    assert sd[f'{first}.adapter_branch.pair.partner_l1'].shape == (12, pair.r)
    assert sd[f'{first}.adapter_branch.pair.partner_r2'].shape == (pair.r, 8)


def test_frozen_policy_never_changes_partners():
    """'frozen' reads the (frozen) base weights: training the adapters moves nothing."""
    model, _ = _build(LinearPairNet, 12, 20, 8, 2, 0.5, policy='frozen')
    mark_trainable(model, 'colora')
    randomize_adapters(model, std=0.3)
    pair = _pair_of(model, 'fc1')
    w1, w2 = pair.partner_w1.clone(), pair.partner_w2.clone()
    x = net_input(model)
    model.train()
    for _ in range(3):
        _train_step(model, x)
    assert not torch.equal(model.fc1.adapter_branch.pair.B1, torch.zeros_like(pair.B1))
    assert torch.equal(pair.partner_w1, w1) and torch.equal(pair.partner_w2, w2)


@pytest.mark.parametrize('policy', ['effective', 'frozen'])
def test_eval_forward_never_changes_a_buffer(policy):
    model, _ = _build(LinearPairNet, 12, 20, 8, 2, 0.5, policy=policy)
    randomize_adapters(model, std=0.3)
    x = net_input(model)
    model.train()
    model(x)                       # partners now differ from the base weights
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out1 = model(x)
    with torch.no_grad():
        out2 = model(x)
    assert torch.equal(out1, out2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_partners_are_persistent_and_state_dict_round_trip_reproduces_outputs():
    model, _ = _build(LinearPairNet, 12, 20, 8, 2, 0.5, policy='effective')
    randomize_adapters(model, std=0.3)
    x = net_input(model)
    model.train()
    for _ in range(3):
        _train_step(model, x)
    model.eval()
    pair = _pair_of(model, 'fc1')
    sd = model.state_dict()
    assert 'fc1.adapter_branch.pair.partner_l1' in sd
    assert 'fc1.adapter_branch.pair.partner_r2' in sd
    assert not any('fc2.adapter_branch.pair' in k for k in sd)   # stored once
    assert max_abs_diff(pair.partner_w1, model.fc1.weight.T) > 1e-3  # trained partners
    want = model(x)

    other, _ = _build(LinearPairNet, 12, 20, 8, 2, 0.5, policy='effective', seed=42)
    other.load_state_dict(sd, strict=True)
    other.eval()
    assert torch.equal(other(x), want)
    # the partners matter: re-seeding them from the weights changes the output
    reset_adapters_from_weights(other)
    assert max_abs_diff(other(x), want) > 1e-5


@pytest.mark.parametrize('cls', [LinearPairNet, ConvPairNet])
def test_reset_reseeds_partners_from_current_base_weights(cls):
    model, layers = _build(cls, 12, 20, 8, 2, 0.5, policy='effective')
    first, second = cls.pairs[0]
    randomize_adapters(model, std=0.3)
    x = net_input(model)
    model.train()
    _train_step(model, x)
    with torch.no_grad():         # "load a pretrained checkpoint"
        layers[first].weight.normal_()
        layers[second].weight.normal_()
    count = reset_adapters_from_weights(model)
    assert count == 2
    pair = _pair_of(model, first)
    assert torch.equal(pair.partner_w1, _paper(layers[first].weight))
    assert torch.equal(pair.partner_w2, _paper(layers[second].weight))
    # and the next training forward starts from them, not from a stale pending W1
    dW1, dW2 = _ref(pair)
    W1 = _paper(layers[first].weight).double()
    model(x)
    assert max_abs_diff(pair.partner_w1, W1 + dW1) < 1e-5


@pytest.mark.parametrize('cls', [LinearPairNet, ConvPairNet])
def test_reset_drops_the_first_layers_pending_snapshot(cls):
    """A training-mode forward of the first layer alone leaves its snapshot pending
    (it waits for the second layer). Loading new weights and resetting drops it: the
    next training-mode forward of the second layer keeps W1's partner at the first
    layer's current base weight, not at ``W1 + dW1`` of the old weights."""
    model, layers = _build(cls, 12, 20, 8, 2, 0.5, policy='effective')
    first, second = cls.pairs[0]
    randomize_adapters(model, std=0.3)
    pair = _pair_of(model, first)
    model.train()
    hidden = layers[first](net_input(model))
    assert pair._pending is not None
    with torch.no_grad():         # "load a pretrained checkpoint"
        layers[first].weight.normal_()
        layers[second].weight.normal_()
    reset_adapters_from_weights(model)
    assert pair._pending is None
    dW1, dW2 = _ref(pair)
    assert dW1.abs().max() > 1e-3            # W1 + dW1 would show
    W2 = _paper(layers[second].weight).double()
    layers[second](hidden.detach())
    assert torch.equal(pair.partner_w1, _paper(layers[first].weight))
    assert max_abs_diff(pair.partner_w2, W2 + dW2) < 1e-5


@pytest.mark.parametrize('cls', [LinearPairNet, ConvPairNet])
def test_a_training_forward_without_gradients_then_a_training_step(cls):
    """A training-mode forward under ``torch.inference_mode()`` takes its snapshot as
    one under ``torch.no_grad()`` does, and the next training step still trains."""
    runs = {}
    for mode in ('no_grad', 'inference_mode'):
        model, _ = _build(cls, 12, 20, 8, 2, 0.5, policy='effective')
        mark_trainable(model, 'colora')
        randomize_adapters(model, std=0.3)
        x = net_input(model)
        model.train()
        with getattr(torch, mode)():
            model(x)
        pair = _pair_of(model, cls.pairs[0][0])
        assert not any(t.is_inference() for t in pair.buffers())
        _train_step(model, x)
        runs[mode] = model.state_dict()
    for key, value in runs['no_grad'].items():
        assert torch.equal(runs['inference_mode'][key], value), key


@pytest.mark.parametrize('key,shape,fragments', [
    ('partner_l1', (7, 3), ['(7, 3)', '12 x k']),
    ('partner_r2', (3, 9), ['(3, 9)', 'k x 8']),
    ('partner_r1', (2, 20), ['inner widths', '(12, 4)', '(2, 20)'])])
def test_partner_offsets_of_other_shapes_are_refused_on_load(key, shape, fragments):
    """Only the offsets' inner width may differ from the model's (0, r, more after a
    fold); a checkpoint with other shapes is refused when it loads, not at the first
    forward."""
    model, _ = _build(LinearPairNet, 12, 20, 8, 2, 0.5)
    randomize_adapters(model, std=0.3)
    model.train()
    model(net_input(model))                       # offsets of width r = 4
    sd = model.state_dict()
    sd['fc1.adapter_branch.pair.' + key] = torch.zeros(shape)
    other, _ = _build(LinearPairNet, 12, 20, 8, 2, 0.5)
    with pytest.raises(RuntimeError) as info:
        other.load_state_dict(sd)
    msg = str(info.value)
    for fragment in ['fc1.adapter_branch.pair.' + key, *fragments]:
        assert fragment in msg, msg


def test_deepcopy_keeps_one_shared_pair():
    model, _ = _build(LinearPairNet, 12, 20, 8, 2, 0.5)
    clone = copy.deepcopy(model)
    p0 = clone.fc1.adapter_branch.get_pair()
    assert clone.fc2.adapter_branch.get_pair() is p0
    assert p0 is not model.fc1.adapter_branch.get_pair()
    randomize_adapters(clone)
    x = net_input(model)
    assert not torch.equal(clone(x), model(x))


def test_pair_module_directly():
    pair = CoLoRAPair(12, 20, 8, gamma=2, share_ratio=0.5)
    assert (pair.r, pair.rs, pair.rl) == (4, 2, 2)
    assert pair.num_trainable() == 4 * (12 + 8) + 2 * 2 * 20
    assert sum(p.numel() for p in pair.parameters()) == pair.num_trainable()
    with pytest.raises(ValueError, match='partner_policy'):
        CoLoRAPair(12, 20, 8, partner_policy='ema')
    assert CoLoRAPairLayer(pair, 0).foldable


def test_fresh_pair_is_exact_before_any_reset():
    """Injection seeds the partners from the current weights: no reset needed for the
    freshly injected model to compute the base model's outputs (no 0 * inf)."""
    torch.manual_seed(0)
    base = LinearPairNet(8, 32, 8)
    model = LinearPairNet(8, 32, 8)
    model.load_state_dict(base.state_dict())
    inject_adapters(model, AdapterSpec(method='colora', gamma=4), pairs=model.pairs)
    x = torch.randn(3, 8)
    pair = _pair_of(model, 'fc1')
    assert torch.equal(pair.partner_w1, base.fc1.weight.detach().T)
    assert torch.equal(pair.partner_w2, base.fc2.weight.detach().T)
    model.train()
    out = model(x)
    assert torch.isfinite(out).all()
    assert torch.equal(out, base(x))


def test_zero_partner_gives_a_zero_delta_not_nan():
    pair = CoLoRAPair(8, 32, 8, gamma=4)        # partners default to zero
    for index in (0, 1):
        delta = pair.delta(index)
        assert torch.isfinite(delta).all() and torch.count_nonzero(delta) == 0
