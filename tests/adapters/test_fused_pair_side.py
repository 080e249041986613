"""A CoLoRA pair side fused into its layer's low-rank op on the CPU: where a layer runs
the channels-last op (``lowrank.linear_low_rank`` or ``low_rank_product``), its side's
factors come without an autograd node (``up3x3.PairSideRebuild``) and the op takes the
pair's parameters as its own inputs. Training is bit for bit what the separate C++
node gives; every other use of the factors (a 1x1 conv, the weight path) gets the node's
factors with their history."""
import pytest
import torch

from colora_mm.adapters import (AdapterSpec, inject_adapters, mark_trainable,
                                reset_adapters_from_weights)
from colora_mm.adapters import up3x3 as U

from adapter_nets import (ConvNeXtBlock, ConvPairNet, LinearPairNet, MixedPairNet,
                          net_input, randomize_adapters, sgd_records)


def _model(cls=LinearPairNet, train_path='auto', seed=0):
    torch.manual_seed(seed)
    model = cls()
    inject_adapters(model, AdapterSpec(method='colora', gamma=2, share_ratio=0.5,
                                       partner_policy='effective', train_path=train_path),
                    pairs=model.pairs)
    reset_adapters_from_weights(model)
    randomize_adapters(model, std=0.3)
    mark_trainable(model, 'colora')
    return model.train()


def _nodes(out):
    """The names of every autograd node ``out`` was computed through."""
    seen, stack, names = set(), [out.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(fn.name())
        stack.extend(f for f, _ in fn.next_functions)
    return names


def _pair(model):
    first = model.pairs[0][0]
    return getattr(model, first).adapter_branch.pair


def _records(monkeypatch, cls, train_path, fuse, steps=3):
    monkeypatch.setattr(U, 'FUSE_PAIR_SIDES', fuse)
    return sgd_records(_model(cls, train_path), steps=steps)


def _assert_equal(got, want):
    assert len(got) == len(want)
    for a_step, b_step in zip(got, want):
        assert len(a_step) == len(b_step)
        for a, b in zip(a_step, b_step):
            assert a.shape == b.shape and torch.equal(a, b)


def test_one_autograd_node_per_side_of_a_linear_pair(kernel, monkeypatch):
    model = _model(LinearPairNet)
    names = _nodes(model(net_input(model)))
    assert not any('PairSideFactors' in n for n in names), names
    assert names.count('LinearLowRankBackward') == 2
    # the op's inputs reach the pair's parameters directly
    pair = _pair(model)
    fc2 = model(net_input(model)).grad_fn
    assert fc2.name() == 'ViewBackward0' or 'LinearLowRank' in fc2.name()
    op = fc2 if 'LinearLowRank' in fc2.name() else fc2.next_functions[0][0]
    leaves = {id(f.variable) for f, _ in op.next_functions
              if f is not None and hasattr(f, 'variable')}
    assert {id(pair.A2), id(pair.B2), id(pair.As), id(pair.Bs)} <= leaves
    monkeypatch.setattr(U, 'FUSE_PAIR_SIDES', False)
    names = _nodes(model(net_input(model)))
    assert sum('PairSideFactors' in n for n in names) == 2


@pytest.mark.parametrize('cls', [LinearPairNet, MixedPairNet, ConvNeXtBlock])
@pytest.mark.parametrize('train_path', ['auto', 'activation', 'weight'])
def test_training_steps_are_bit_for_bit_the_nodes(kernel, monkeypatch, cls, train_path):
    """Outputs, every gradient and the partner offsets of three SGD steps, fused and
    with the separate node: the same closed form on the same values. A 1x1 conv
    (MixedPairNet's second layer) and the weight path take the node's factors."""
    fused = _records(monkeypatch, cls, train_path, True)
    node = _records(monkeypatch, cls, train_path, False)
    assert any(t.shape[-1] for t in fused[-1][-4:])          # offsets were formed
    _assert_equal(fused, node)


def test_which_layers_fuse(kernel):
    model = _model(MixedPairNet, train_path='activation')
    names = _nodes(model(net_input(model)))
    assert sum('PairSideFactors' in n for n in names) == 1          # the conv's side
    assert names.count('LinearLowRankBackward') == 1                 # the linear's
    model = _model(LinearPairNet, train_path='weight')
    names = _nodes(model(net_input(model)))
    assert sum('PairSideFactors' in n for n in names) == 2
    assert 'LinearLowRankBackward' not in names


def test_under_bfloat16_autocast_the_same_as_the_node(kernel, monkeypatch):
    def run(fuse):
        monkeypatch.setattr(U, 'FUSE_PAIR_SIDES', fuse)
        model = _model(ConvNeXtBlock)
        x = net_input(model)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = model(x)
        out.float().square().mean().backward()
        return [out.detach()] + [p.grad for p in _pair(model).parameters()]

    fused, node = run(True), run(False)
    for a, b in zip(fused, node):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert all(g.dtype == torch.float32 for g in fused[1:])


@pytest.mark.filterwarnings('ignore:Using backward\\(\\) with create_graph=True')
def test_a_second_derivative_through_the_parameters_is_refused(kernel):
    """``create_graph=True`` over the pair's parameters needs a second derivative of
    the closed form, which the CPU op does not have: one clear error, as the node
    gives. Asked for the input's gradient only, it runs (a gradient penalty)."""
    model = _model(LinearPairNet)
    x = net_input(model).requires_grad_()
    out = model(x).square().sum()
    with pytest.raises(RuntimeError, match='no second derivative; set COLORA_MM_UP3X3=conv'):
        out.backward(create_graph=True)
    model = _model(LinearPairNet)
    (gx,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
    gx.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0
               for p in _pair(model).parameters())


def test_frozen_parameters_get_no_gradient(kernel, monkeypatch):
    def run(fuse):
        monkeypatch.setattr(U, 'FUSE_PAIR_SIDES', fuse)
        model = _model(LinearPairNet)
        pair = _pair(model)
        pair.A1.requires_grad_(False)
        pair.Bs.requires_grad_(False)
        model(net_input(model)).square().mean().backward()
        return [p.grad for p in (pair.A1, pair.B1, pair.A2, pair.B2, pair.As, pair.Bs)]

    fused, node = run(True), run(False)
    assert fused[0] is None and fused[5] is None
    for a, b in zip(fused, node):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


@pytest.mark.parametrize('cls, train_path, fused', [
    (LinearPairNet, 'auto', 2), (ConvNeXtBlock, 'activation', 2),
    (MixedPairNet, 'activation', 1), (ConvPairNet, 'auto', 0),
    (LinearPairNet, 'weight', 0)])
def test_each_side_is_formed_once_per_forward(kernel, monkeypatch, cls, train_path, fused):
    """A side is formed fused only where its layer's op takes it: a 1x1 conv and the
    weight path ask for the node's factors directly, not fused and then again."""
    made = []
    original = U.PairSideRebuild.__init__

    def counting(self, *args, **kwargs):
        made.append(self)
        original(self, *args, **kwargs)
    monkeypatch.setattr(U.PairSideRebuild, '__init__', counting)
    tracked = []
    monkeypatch.setattr(U.PairSideRebuild, 'tracked',
                        lambda self: tracked.append(self) or pytest.fail('formed twice'))
    model = _model(cls, train_path)
    model(net_input(model)).square().mean().backward()
    assert len(made) == fused and not tracked
