"""One side of a CoLoRA pair as one C++ autograd node on the CPU
(``csrc/pair_factors.cpp`` via ``up3x3.pair_side_factors``): the factors of the Python
formulation bit for bit, its gradients up to rounding (and float64 gradcheck), training
steps that follow the Python formulation's, and the node taken only where it applies."""
import pytest
import torch

from colora_mm.adapters import (AdapterSpec, inject_adapters, mark_trainable,
                                reset_adapters_from_weights)
from colora_mm.adapters import up3x3 as U

from adapter_nets import (ConvPairNet, LinearPairNet, assert_records_close,
                          randomize_adapters, saved_beyond_state, sgd_records)


def _model(cls=LinearPairNet, share=0.5, dtype=torch.float32, shapes=(12, 20, 8), seed=0):
    torch.manual_seed(seed)
    model = cls(*shapes)
    inject_adapters(model, AdapterSpec(method='colora', gamma=2, share_ratio=share,
                                       partner_policy='effective'), pairs=model.pairs)
    reset_adapters_from_weights(model)
    randomize_adapters(model, std=0.3)
    mark_trainable(model, 'colora')             # frozen base weights, as in training
    return model.to(dtype).train()


def _pair(model):
    first = model.pairs[0][0]
    return getattr(model, first).adapter_branch.pair


def _with_offsets(pair, seed=5):
    """Random partner offsets (what an effective partner holds after a step)."""
    g = torch.Generator().manual_seed(seed)
    for index, (din, dout) in enumerate(pair.side_shapes()):
        dtype = pair.partner_l1.dtype
        pair.set_partner_offset(index, torch.randn(din, 3, generator=g, dtype=dtype),
                                torch.randn(3, dout, generator=g, dtype=dtype))


def _node_name(t):
    return t.grad_fn.name() if t.grad_fn is not None else ''


def _factors_and_grads(pair, index, seed=7):
    left, right = pair.factors(index)
    g = torch.Generator().manual_seed(seed)
    gl = torch.randn(left.shape, generator=g, dtype=left.dtype)
    gr = torch.randn(right.shape, generator=g, dtype=right.dtype)
    params = [p for p in pair.parameters() if p.requires_grad]
    grads = torch.autograd.grad((left * gl).sum() + (right * gr).sum(), params,
                                allow_unused=True)
    return (left.detach(), right.detach()), grads


@pytest.mark.parametrize('index', [0, 1])
@pytest.mark.parametrize('offsets', [False, True])
@pytest.mark.parametrize('shapes', [(12, 20, 8), (16, 8, 12), (9, 14, 7)])
def test_same_factors_bit_for_bit_and_gradients_as_python(kernel, monkeypatch, index,
                                                          offsets, shapes):
    model = _model(shapes=shapes)
    pair = _pair(model)
    if offsets:
        _with_offsets(pair)
    got, got_grads = _factors_and_grads(pair, index)
    assert 'PairSideFactors' in _node_name(pair.factors(index)[0])
    monkeypatch.setenv(U.ENV_CHOICE, 'conv')
    assert 'PairSideFactors' not in _node_name(pair.factors(index)[0])
    want, want_grads = _factors_and_grads(pair, index)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    for a, b in zip(got_grads, want_grads):
        if b is None:
            assert a is None or not a.abs().max()
            continue
        assert (a - b).abs().max() <= 1e-5 * max(b.abs().max().item(), 1e-3)


@pytest.mark.parametrize('index', [0, 1])
def test_gradcheck_float64(kernel, index):
    model = _model(dtype=torch.float64)
    pair = _pair(model)
    _with_offsets(pair)
    other = 1 - index
    base = pair.partner_base(other).detach()
    left, right = pair.offset(other)
    A, B = (pair.A1, pair.B1) if index == 0 else (pair.A2, pair.B2)

    def fn(A, B, As, Bs):
        return U.pair_side_factors(index, A, B, As, Bs, base, left, right,
                                   pair.rl ** 0.5, (pair.rs * pair.n) ** 0.25)
    inputs = tuple(t.detach().clone().requires_grad_() for t in (A, B, pair.As, pair.Bs))
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize('zero', [('Bs',), ('As', 'Bs')])
def test_where_a_std_vanishes_and_the_clamp_binds(kernel, monkeypatch, zero):
    """``Bs = 0``: std(Bs W2^T) = std(Bs) = 0 (PyTorch's std has a zero gradient there);
    with ``As = 0`` too both stds of each shared term vanish and the clamp binds."""
    model = _model(dtype=torch.float64)
    pair = _pair(model)
    with torch.no_grad():
        for name in zero:
            getattr(pair, name).zero_()
    for index in (0, 1):
        monkeypatch.setenv(U.ENV_CHOICE, 'auto')
        got, got_grads = _factors_and_grads(pair, index)
        monkeypatch.setenv(U.ENV_CHOICE, 'conv')
        want, want_grads = _factors_and_grads(pair, index)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        for a, b in zip(got_grads, want_grads):
            if a is None or b is None:          # the other side's own factors
                assert a is None and b is None
                continue
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('cls', [LinearPairNet, ConvPairNet])
def test_three_training_steps_follow_the_python_formulation(kernel, monkeypatch, cls):
    """Outputs, every gradient and the partner offsets after each of three SGD steps
    (effective partners), the node against the Python formulation (fp32, 1e-5)."""
    runs = []
    for choice in ('auto', 'conv'):
        monkeypatch.setenv(U.ENV_CHOICE, choice)
        runs.append(sgd_records(_model(cls)))
    assert_records_close(*runs)


def test_taken_only_where_it_applies(kernel, monkeypatch):
    model = _model()
    pair = _pair(model)
    assert 'PairSideFactors' in _node_name(pair.factors(0)[0])
    with torch.no_grad():                          # evaluation: plain ops
        assert pair.factors(0)[0].grad_fn is None
    for share in (0.0, 1.0):                       # an empty part: the Python path
        assert 'PairSideFactors' not in _node_name(_pair(_model(share=share)).factors(0)[0])
    # a trainable base weight gets its gradient through the partner products (Python)
    model.fc2.weight.requires_grad_(True)
    left, right = _pair(model).factors(0)
    assert 'PairSideFactors' not in _node_name(left)
    right.sum().backward()
    assert model.fc2.weight.grad is not None and model.fc2.weight.grad.abs().max() > 0
    monkeypatch.setenv(U.ENV_CHOICE, 'conv')
    model.fc2.weight.requires_grad_(False)
    assert 'PairSideFactors' not in _node_name(_pair(model).factors(0)[0])


def test_backward_inside_an_autocast_region_stays_in_float32(kernel):
    model = _model()
    pair = _pair(model)
    _with_offsets(pair)
    left, right = pair.factors(1)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        grads = torch.autograd.grad(left.square().sum() + right.square().sum(),
                                    [pair.A2, pair.B2, pair.As, pair.Bs])
    left2, right2 = pair.factors(1)
    ref = torch.autograd.grad(left2.square().sum() + right2.square().sum(),
                              [pair.A2, pair.B2, pair.As, pair.Bs])
    for g, w in zip(grads, ref):
        assert g.dtype == torch.float32
        assert (g - w).abs().max() <= 1e-6 * max(w.abs().max().item(), 1.0)


def test_no_second_derivative_says_how_to_get_one(kernel):
    pair = _pair(_model())
    left, _ = pair.factors(0)
    with pytest.raises(RuntimeError, match='no second derivative; set COLORA_MM_UP3X3=conv'):
        torch.autograd.grad(left.square().sum(), [pair.As], create_graph=True)


@pytest.mark.parametrize('index', [0, 1])
def test_what_the_node_keeps_for_backward(kernel, index):
    """Beside the parameters and the partner's weight and offset (alive anyway), each
    side keeps nothing for its backward pass: not its partner product C, nothing of L
    or R."""
    model = _model(shapes=(12, 20, 8))
    pair = _pair(model)
    _with_offsets(pair)
    factors, saved = saved_beyond_state(model, lambda: pair.factors(index))
    assert 'PairSideFactors' in _node_name(factors[0])
    assert saved == []


def _grads_of(factors, params, seed=7):
    left, right = factors
    g = torch.Generator().manual_seed(seed)
    gl = torch.randn(left.shape, generator=g, dtype=left.dtype)
    gr = torch.randn(right.shape, generator=g, dtype=right.dtype)
    return torch.autograd.grad((left * gl).sum() + (right * gr).sum(), params)


@pytest.mark.parametrize('index', [0, 1])
def test_the_node_takes_the_product_the_rebuild_formed(kernel, index):
    """The node's backward pass uses the partner product C that the rebuild formed just
    before it (in a low-rank op's backward pass), and forms C itself where no rebuild
    ran: the same gradients bit for bit. Fed another C, it would use that one."""
    model = _model()
    pair = _pair(model)
    _with_offsets(pair)
    params = [pair.A1, pair.B1, pair.As, pair.Bs] if index == 0 else \
        [pair.A2, pair.B2, pair.As, pair.Bs]
    alone = _grads_of(pair.factors(index), params)
    factors = pair.factors(index)
    again = factors.rebuild()                # leaves C for the node's backward pass
    assert all(torch.equal(a.detach(), b) for a, b in zip(factors, again))
    assert all(torch.equal(a, b) for a, b in zip(_grads_of(factors, params), alone))
    factors = pair.factors(index)
    A, B, As, Bs, base, left, right = factors.rebuild.tensors
    factors.rebuild._form(A, B, As, Bs, base * 2, left, right)     # another C
    other = _grads_of(factors, params)
    assert not all(torch.equal(a, b) for a, b in zip(other, alone))
    # the slot was emptied by the backward pass that took it: the next one forms C
    assert all(torch.equal(a, b) for a, b in zip(_grads_of(pair.factors(index), params),
                                                alone))


@pytest.mark.parametrize('what', ['base', 'offset'])
def test_the_rebuild_is_stale_once_the_partner_changed_in_place(kernel, what):
    """The rebuild forms C from the partner's base weight and offset: an in-place
    change of either since the forward pass makes it refuse, naming the layer."""
    model = _model()
    pair = _pair(model)
    _with_offsets(pair)
    factors = pair.factors(0)
    A, B, As, Bs, base, left, right = factors.rebuild.tensors
    with torch.no_grad():
        (base if what == 'base' else right).add_(1)
    assert factors.rebuild.stale
    with pytest.raises(RuntimeError, match=r'W1: a tensor its factors were formed from'):
        factors.rebuild()


@pytest.mark.parametrize('index', [0, 1])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_the_rebuild_forms_the_factors_again_bit_for_bit(kernel, index, dtype):
    model = _model(dtype=dtype)
    pair = _pair(model)
    _with_offsets(pair)
    factors = pair.factors(index)
    again = factors.rebuild()
    for a, b in zip(factors, again):
        assert a.dtype == b.dtype and not b.requires_grad
        assert torch.equal(a.detach(), b)
    with torch.enable_grad():                # as a backward pass that records a graph
        graph = factors.rebuild.backward_factors(factors.rebuild.tensors, dtype)
    assert 'PairSideFactors' in _node_name(graph[0])
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(factors, graph))
    assert factors.rebuild.tensors == () and factors.rebuild.stale   # released
    fresh = pair.factors(index)
    got = fresh.rebuild.backward_factors(fresh.rebuild.tensors, torch.bfloat16)
    for a, b in zip(fresh, got):
        assert torch.equal(a.detach().to(torch.bfloat16), b)
    fresh = pair.factors(index)
    with torch.no_grad():
        pair.As.mul_(2)                      # a parameter changed in place: refused
    assert fresh.rebuild.stale
    with pytest.raises(RuntimeError, match=r'W%d: a tensor its factors were formed from '
                       r'\(a parameter\) was modified in place' % (index + 1)):
        fresh.rebuild()
