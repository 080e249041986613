"""The factors of equal-shaped CoLoRA pairs formed together in a training forward pass
(``colora_mm.adapters.pair_batch``): each pair's own values and gradients, training
steps that follow the per-pair formulation, stacks taken once and dropped with the
context, the CPU's C++ node left in place, and fewer operators per step."""
import collections
import copy

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from colora_mm.adapters import (AdapterSpec, CoLoRAPair, inject_adapters, mark_trainable,
                                pair_factors_stacked, reset_adapters_from_weights)
from colora_mm.adapters import pair_batch as PB
from colora_mm.adapters.scaling import _Constants

from adapter_nets import ConvNeXtBlock, randomize_adapters


class Blocks(nn.Module):
    """``n`` ConvNeXt blocks of one width (one pair shape), then one of another."""

    def __init__(self, n: int = 3, channels: int = 16, odd: int = 8) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[ConvNeXtBlock(channels) for _ in range(n)])
        self.proj = nn.Conv2d(channels, odd, 1)
        self.last = ConvNeXtBlock(odd)
        self.in_shape = (2, channels, 9, 9)

    def forward(self, x):
        return self.last(self.proj(self.blocks(x)))


def _net(n=3, share=0.5, policy='effective', seed=0, dtype=torch.float32, **spec):
    torch.manual_seed(seed)
    net = Blocks(n)
    names = [f'blocks.{i}' for i in range(n)] + ['last']
    inject_adapters(net, AdapterSpec(method='colora', gamma=2, share_ratio=share,
                                     partner_policy=policy, **spec),
                    pairs=[(f'{b}.pwconv1', f'{b}.pwconv2') for b in names],
                    spatial=[f'{b}.dwconv' for b in names])
    reset_adapters_from_weights(net)
    randomize_adapters(net)
    mark_trainable(net, 'colora')
    return net.to(dtype).train()


def _pairs(net):
    return [m for m in net.modules() if isinstance(m, CoLoRAPair)]


@pytest.fixture
def python_pairs(monkeypatch):
    """The pair factors' Python formulation on the CPU (a GPU's), not the C++ node."""
    monkeypatch.setenv('COLORA_MM_UP3X3', 'conv')
    monkeypatch.setenv(PB.ENV, '1')


def _step(net, x, stacked, monkeypatch):
    monkeypatch.setenv(PB.ENV, '1' if stacked else '0')
    with pair_factors_stacked(net):
        out = net(x)
    out.square().mean().backward()
    return out.detach()


def _rel(got, want):
    return (got - want).abs().max().item() / max(want.abs().max().item(), 1e-12)


def test_groups_are_the_pairs_of_one_shape(python_pairs):
    net = _net(n=3)
    groups = PB.pair_groups(net)
    assert [len(g) for g in groups] == [3]                 # 'last' has a shape of its own
    assert groups[0] == _pairs(net)[:3]
    assert PB.pair_groups(_net(n=3, share=0.0)) == []      # no shared part: per pair
    assert PB.pair_groups(_net(n=3, share=1.0)) == []      # no independent part
    assert PB.pair_groups(_net(n=3).eval()) == []


@pytest.mark.parametrize('index', [0, 1])
def test_stacked_factors_are_each_pairs_own(python_pairs, monkeypatch, index):
    net = _net(n=3)
    x = torch.randn(net.in_shape)
    _step(net, x, False, monkeypatch)                      # non-empty partner offsets
    group = PB.pair_groups(net)[0]
    assert all(p.offset(1 - index)[0].shape[1] > 0 for p in group)
    stacked = PB.stacked_factors(group, index)
    own = [p.factors(index) for p in group]
    probe = [(torch.randn_like(lf), torch.randn_like(rf)) for lf, rf in own]
    for (ls, rs), (lo, ro) in zip(stacked, own):
        assert ls.shape == lo.shape and rs.shape == ro.shape
        assert _rel(ls, lo) <= 1e-6 and _rel(rs, ro) <= 1e-6

    def grads(factors):
        loss = sum((lf * pl).sum() + (rf * pr).sum()
                   for (lf, rf), (pl, pr) in zip(factors, probe))
        params = [q for p in group for q in p.parameters()]
        return torch.autograd.grad(loss, params, allow_unused=True)

    compared = 0
    for got, want in zip(grads(stacked), grads(own)):
        assert (got is None) == (want is None)
        if want is not None:
            assert _rel(got, want) <= 1e-5
            compared += 1
    assert compared == 3 * 4                               # A_i, B_i, As, Bs of each pair


def test_pairs_without_both_parts_are_refused(python_pairs):
    net = _net(n=3, share=1.0)
    with pytest.raises(ValueError, match=r'0 < share_ratio < 1.*blocks\.0\.pwconv1.*rl=0'):
        PB.stacked_factors(_pairs(net)[:3], 0)


def test_stacked_scalings_gradcheck_float64():
    g, shapes = 3, [(5, 2), (2, 7), (5, 3), (3, 7)]
    gen = torch.Generator().manual_seed(0)
    per_kind = [[torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True)
                 for _ in range(g)] for s in shapes]
    tensors = [t for kind in per_kind for t in kind]
    consts = _Constants([1.3, 0.7], [10, 14, 15, 21], [2, 3], tensors[0])
    assert torch.autograd.gradcheck(
        lambda *t: PB.StackedScaledColumns.apply(consts, 2, *t), tensors)
    # pair i of the stacks is the unstacked op on pair i's tensors (R: [Y_1; Y_2])
    from colora_mm.adapters.scaling import ScaledColumns
    left, right = PB.StackedScaledColumns.apply(consts, 2, *tensors)
    for i in range(g):
        own = [kind[i] for kind in per_kind]
        assert _rel(left[i], ScaledColumns.apply(consts, *own)) <= 1e-14
        assert torch.equal(right[i], torch.cat([own[1], own[3]], 0))


@pytest.mark.parametrize('index', [0, 1])
def test_stacked_offset_products_gradcheck_float64(index):
    """The offsets' part of the partner products, batched: each pair's own product
    (``(Bs R2^T) L2^T`` or ``R1^T (L1^T As)``), gradients to Bs / As only."""
    g, k, rs, d, d_mid, d_out = 3, 2, 3, 5, 7, 4
    gen = torch.Generator().manual_seed(index)

    def rand(*shape, grad=False):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(grad)
    if index == 0:    # Bs (rs x d''), offset of W2: L2 (d' x k), R2 (k x d'')
        shared = [rand(rs, d_out, grad=True) for _ in range(g)]
        lefts, rights = [rand(d_mid, k) for _ in range(g)], [rand(k, d_out) for _ in range(g)]
    else:             # As (d x rs), offset of W1: L1 (d x k), R1 (k x d')
        shared = [rand(d, rs, grad=True) for _ in range(g)]
        lefts, rights = [rand(d, k) for _ in range(g)], [rand(k, d_mid) for _ in range(g)]
    out = PB.StackedOffsetProducts.apply(index, *shared, *lefts, *rights)
    for i in range(g):
        own = ((shared[i] @ rights[i].t()) @ lefts[i].t() if index == 0
               else rights[i].t() @ (lefts[i].t() @ shared[i]))
        assert _rel(out[i], own) <= 1e-14
    assert torch.autograd.gradcheck(
        lambda *t: PB.StackedOffsetProducts.apply(index, *t, *lefts, *rights), shared)


@pytest.mark.parametrize('policy', ['effective', 'frozen'])
def test_training_steps_follow_the_per_pair_formulation(python_pairs, monkeypatch, policy):
    net = _net(n=3, policy=policy)
    ref = copy.deepcopy(net)
    x = torch.randn(net.in_shape, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        got, want = _step(net, x, True, monkeypatch), _step(ref, x, False, monkeypatch)
        assert _rel(got, want) <= 1e-5
        with torch.no_grad():
            for (name, p), q in zip(net.named_parameters(), ref.parameters()):
                if p.grad is None:
                    assert q.grad is None, name
                    continue
                assert _rel(p.grad, q.grad) <= 1e-5, name
                p -= 0.1 * p.grad
                q -= 0.1 * q.grad
                p.grad = q.grad = None
    for (name, b), c in zip(net.named_buffers(), ref.buffers()):
        if 'partner' in name:
            assert b.shape == c.shape, name
            if b.numel():
                assert _rel(b, c) <= 1e-5, name
    assert all(p._stacked == [None, None] for p in _pairs(net))


def test_stacks_are_taken_once_and_dropped_with_the_context(python_pairs):
    net = _net(n=3)
    x = torch.randn(net.in_shape)
    taken = collections.Counter()
    for pair in _pairs(net):
        original = pair.factors

        def factors(index, *args, pair=pair, original=original, **kwargs):
            taken[pair._stacked[index] is not None] += 1
            return original(index, *args, **kwargs)
        pair.factors = factors
    with pair_factors_stacked(net):
        net(x)
    assert taken == {True: 6, False: 2}                    # 3 stacked pairs, 'last' alone
    assert all(p._stacked == [None, None] for p in _pairs(net))
    with pytest.raises(RuntimeError, match='stop'):
        with pair_factors_stacked(net):
            raise RuntimeError('stop')
    assert all(p._stacked == [None, None] for p in _pairs(net))
    with torch.no_grad(), pair_factors_stacked(net):       # no gradients: nothing stacked
        assert all(p._stacked == [None, None] for p in _pairs(net))


def test_the_cpu_keeps_its_pair_node(kernel, monkeypatch):
    monkeypatch.delenv('COLORA_MM_UP3X3', raising=False)
    net = _net(n=3)
    assert PB.pair_groups(net) == []
    monkeypatch.setenv('COLORA_MM_UP3X3', 'conv')
    assert len(PB.pair_groups(net)) == 1


def test_switch_off_and_a_wrong_value(python_pairs, monkeypatch):
    net = _net(n=3)
    monkeypatch.setenv(PB.ENV, '0')
    with pair_factors_stacked(net):
        assert all(p._stacked == [None, None] for p in _pairs(net))
    monkeypatch.setenv(PB.ENV, 'yes')
    with pytest.raises(ValueError, match='COLORA_MM_PAIR_BATCH'):
        with pair_factors_stacked(net):
            pass


class _Ops(TorchDispatchMode):
    """Operators that compute (views and metadata ops apart)."""

    SKIP = ('view', '_unsafe_view', 'reshape', 't', 'transpose', 'permute', 'expand',
            'unsqueeze', 'squeeze', 'slice', 'select', 'alias', 'as_strided', 'unbind',
            'detach', 'promote_types', 'empty', 'empty_like')

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in self.SKIP:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _ops_per_step(net, x, stacked, monkeypatch):
    monkeypatch.setenv(PB.ENV, '1' if stacked else '0')
    for _ in range(2):                                     # the second step counts
        with _Ops() as ops:
            with pair_factors_stacked(net):
                out = net(x)
            out.square().mean().backward()
        net.zero_grad(set_to_none=True)
    return ops.count


def test_fewer_operators_per_step(monkeypatch):
    """Under a dispatch mode the CPU runs a GPU's formulation (no C++ node), so the
    counts are a GPU step's launches: every pair of a group beyond the first saves the
    scalings' operators of both sides."""
    counts = {}
    for n in (3, 6):
        net = _net(n=n, use_filter=False)
        x = torch.randn(net.in_shape)
        counts[n] = {s: _ops_per_step(net, x, s, monkeypatch) for s in (False, True)}
    per_pair = {s: (counts[6][s] - counts[3][s]) / 3 for s in (False, True)}
    assert counts[3][True] < counts[3][False]
    assert per_pair[False] - per_pair[True] >= 60, per_pair


def test_saved_partner_offsets_are_their_own_tensors(python_pairs, monkeypatch):
    """After a stacked pass the 'effective' offsets are views of the stacks; the state
    dict holds each as a tensor of its own size, equal to it."""
    net = _net(n=3)
    _step(net, torch.randn(net.in_shape), True, monkeypatch)
    pair = PB.pair_groups(net)[0][0]
    assert pair.partner_l1.untyped_storage().nbytes() > pair.partner_l1.nbytes
    state = net.state_dict()
    offsets = [k for k in state if k.rsplit('.', 1)[-1].startswith(('partner_l', 'partner_r'))]
    assert len(offsets) == 4 * 4
    for key in offsets:
        value = state[key]
        assert value.untyped_storage().nbytes() == value.numel() * value.element_size(), key
    assert torch.equal(state['blocks.0.pwconv1.adapter_branch.pair.partner_l1'],
                       pair.partner_l1)
