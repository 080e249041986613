"""CoLoRA's effective partner offsets formed in the backward pass: where a side's factors
come from the CPU's C++ node and its layer runs the activation path, the low-rank op
keeps none of the factors and the offset takes them when the backward pass forms them
again (``colora_pair`` module doc). Training is bit for bit what it is when the factors
are kept; what changes is what lives from forward to backward, and when the offsets
are formed."""
import copy
import warnings

import pytest
import torch

from colora_mm.adapters import (AdapterSpec, inject_adapters, mark_trainable,
                                reset_adapters_from_weights)
from colora_mm.adapters import up3x3 as U

from adapter_nets import (LinearPairNet, net_input, randomize_adapters,
                          saved_beyond_state, sgd_records)

SHAPES = (12, 20, 8)          # gamma 2: r = 4, rs = rl = 2; 5 tokens


def _model(seed=0):
    torch.manual_seed(seed)
    model = LinearPairNet(*SHAPES)
    inject_adapters(model, AdapterSpec(method='colora', gamma=2, share_ratio=0.5,
                                       partner_policy='effective'), pairs=model.pairs)
    reset_adapters_from_weights(model)
    randomize_adapters(model, std=0.3)
    mark_trainable(model, 'colora')
    return model.train()


def _pair(model):
    return model.fc1.adapter_branch.pair


def _offsets(model):
    return [b.clone() for n, b in model.named_buffers() if 'partner' in n]


def _keep_factors(monkeypatch):
    """The node's factors without their rebuild: the ops keep them, the offsets take
    them after the forward pass (the formulation this one must equal): the node's
    factors with their history, never fused into the layer's op."""
    monkeypatch.setattr(U, 'FUSE_PAIR_SIDES', False)
    monkeypatch.setattr(U, 'Factors', lambda left, right, rebuild=None: (left, right))


def _assert_equal(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape and torch.equal(a, b)


def _both(monkeypatch, run):
    """``run(model)`` with the offsets left to the backward pass, then with the factors
    kept; each on a fresh model."""
    deferred = run(_model())
    _keep_factors(monkeypatch)
    kept = run(_model())
    return deferred, kept


@pytest.mark.parametrize('optim', ['sgd', 'adamw'])
def test_training_steps_are_bit_for_bit_those_that_keep_the_factors(kernel, monkeypatch,
                                                                   optim):
    def run(model):
        if optim == 'sgd':
            return sgd_records(model, steps=3)
        x = net_input(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                lr=0.05, weight_decay=0.1)
        records = []
        for _ in range(3):
            opt.zero_grad()
            out = model(x)
            out.square().mean().backward()
            records.append([out.detach().clone()] + _offsets(model)
                           + [p.grad.clone() for p in model.parameters()
                              if p.grad is not None])
            opt.step()
        return records

    deferred, kept = _both(monkeypatch, run)
    assert any(t.shape[-1] for t in deferred[-1][1:5])     # offsets were formed
    for a, b in zip(deferred, kept):
        _assert_equal(a, b)


def _saved_during_forward(model):
    return saved_beyond_state(model, lambda: model(net_input(model)))


def test_a_step_keeps_none_of_the_factors_from_forward_to_backward(kernel, monkeypatch):
    pair = _pair(_model())
    d, d_mid, d_out = SHAPES
    r = pair.r
    factor_shapes = {(d, r), (r, d_mid), (d_mid, r), (r, d_out)}

    def run(model):
        out, saved = _saved_during_forward(model)
        pending = list(_pair(model)._deferred)
        out.square().mean().backward()
        return ({tuple(t.shape) for t in saved},
                sum(t.untyped_storage().nbytes() for t in
                    {t.untyped_storage().data_ptr(): t for t in saved}.values()),
                pending, _pair(model)._deferred, _offsets(model))

    (shapes, nbytes, pending, after, offsets), (kept_shapes, kept_nbytes, kept_pending,
                                               _, kept_offsets) = _both(monkeypatch, run)
    assert not shapes & factor_shapes, shapes
    assert factor_shapes <= kept_shapes
    # the four factors' r (d + 2 d' + d'') floats
    assert kept_nbytes - nbytes == 4 * r * (d + 2 * d_mid + d_out)
    assert all(p is not None for p in pending) and after == [None, None]
    assert kept_pending == [None, None]
    _assert_equal(offsets, kept_offsets)


def test_a_second_forward_before_backward_reads_the_offsets_the_first_formed(kernel,
                                                                          monkeypatch):
    def run(model):
        x = net_input(model)
        first = model(x)
        second = model(x * 0.5)
        (first.square().mean() + second.square().mean()).backward()
        return ([first.detach(), second.detach()] + _offsets(model)
                + [p.grad for p in model.parameters() if p.grad is not None])

    deferred, kept = _both(monkeypatch, run)
    _assert_equal(deferred, kept)


def test_an_optimizer_step_without_backward_forms_them_first(kernel, monkeypatch):
    """A forward pass whose backward never runs, then ``optimizer.step()`` on zeroed
    gradients (which decays the weights): the offsets are that pass's, formed before
    the step changes the parameters."""
    def run(model):
        x = net_input(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                lr=0.05, weight_decay=0.5)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            model(x * 0.5)
            opt.step()
        changed = any(not torch.equal(a, p) for a, p in
                      zip(before, [p for p in model.parameters() if p.requires_grad]))
        return changed, _offsets(model) + [model(x).detach()]

    (changed, deferred), (_, kept) = _both(monkeypatch, run)
    assert changed
    _assert_equal(deferred, kept)


def test_state_dict_copy_and_move_between_forward_and_backward(kernel, monkeypatch):
    def run(model):
        out = model(net_input(model))
        state = {k: v.clone() for k, v in model.state_dict().items() if 'partner' in k}
        twin = copy.deepcopy(model)
        assert twin.fc1.adapter_branch.pair._deferred == [None, None]
        moved = _offsets(model.to(torch.float32))
        out.square().mean().backward()
        return list(state.values()) + _offsets(twin) + moved + _offsets(model)

    deferred, kept = _both(monkeypatch, run)
    _assert_equal(deferred, kept)
    n = len(deferred) // 4
    assert any(t.shape[-1] for t in deferred[:n])
    for i in range(1, 4):                      # the backward pass changed nothing
        _assert_equal(deferred[i * n:(i + 1) * n], deferred[:n])


def test_a_load_after_a_forward_pass_without_backward(kernel, monkeypatch):
    """The offsets a forward pass left to its backward pass are formed before a load
    changes anything: a checkpoint's offsets replace them, one without offsets (the base
    weights only) leaves them. (Between forward and backward a load is autograd's
    error: the tensors the pass read are saved for backward.)"""
    def run(model):
        x = net_input(model)
        model(x).square().mean().backward()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        offsets = {k: v for k, v in state.items() if 'partner' in k}
        weights = {k: v for k, v in state.items() if k in ('fc1.weight', 'fc2.weight')}
        model(x).square().mean().backward()
        model(x * 0.5)                                    # no backward
        assert not model.load_state_dict(offsets, strict=False).unexpected_keys
        assert _pair(model)._deferred == [None, None]
        _assert_equal(_offsets(model), list(offsets.values()))
        pair = _pair(model)
        _assert_equal([*pair.offset(0), *pair.offset(1)], list(offsets.values()))
        model(x * 0.5)                                    # no backward
        model.load_state_dict(weights, strict=False)
        return _offsets(model)

    deferred, kept = _both(monkeypatch, run)
    _assert_equal(deferred, kept)


def test_an_input_gradient_penalty_differentiates_through_the_factors(kernel,
                                                                      monkeypatch):
    """A backward pass that records a graph (``create_graph=True``, e.g. a penalty on
    the input gradient) forms the factors with their autograd history: the penalty's
    gradients of the pair's parameters are those of the factors the forward formed."""
    def run(model):
        x = net_input(model).requires_grad_()
        (gx,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
        gx.square().sum().backward()
        return [gx.detach()] + [p.grad for p in _pair(model).parameters()] + _offsets(model)

    deferred, kept = _both(monkeypatch, run)
    assert all(g is not None and g.abs().max() > 0 for g in deferred[1:7])
    _assert_equal(deferred[:1] + deferred[7:], kept[:1] + kept[7:])
    # the gradients reach the parameters through a second node instance (the same
    # values), so they are summed in another order: equal up to rounding
    for a, b in zip(deferred[1:7], kept[1:7]):
        assert (a - b).abs().max() <= 1e-6 * b.abs().max(), (a - b).abs().max()


def test_a_kept_graph_keeps_none_of_the_rebuilds_tensors(kernel):
    """After the backward pass a graph still referenced (a loss kept for logging) holds
    no partner product: the op's saved tensors are freed and the rebuild drops its own."""
    import weakref
    model = _model()
    losses, products = [], []
    for _ in range(3):
        loss = model(net_input(model)).square().mean()
        products += [weakref.ref(r.tensors[-1]) for r in _pair(model)._deferred]
        loss.backward()
        losses.append(loss)
    assert len(products) == 6 and all(ref() is None for ref in products)


def test_parameters_changed_in_place_without_backward_keep_the_previous_offsets(kernel):
    model = _model()
    x = net_input(model)
    model(x).square().mean().backward()
    before = _offsets(model)
    pair = _pair(model)
    model(x * 0.5)                                # no backward
    with torch.no_grad():
        pair.As.mul_(2)
    with pytest.warns(UserWarning, match=r'CoLoRA pair \(fc1: 12 -> 20, fc2: 20 -> 8\): '
                      r'its parameters were changed in place after a training forward'):
        pair.settle()
    _assert_equal(_offsets(model), before)
    assert pair._deferred == [None, None]


def test_parameters_changed_between_forward_and_backward_are_refused(kernel):
    model = _model()
    out = model(net_input(model))
    with torch.no_grad():
        _pair(model).Bs.add_(1)
    with pytest.raises(RuntimeError, match=r'modified (by an inplace operation|in place)'):
        out.square().mean().backward()


@pytest.mark.parametrize('reentrant', [False, True])
def test_activation_checkpointing_is_refused_with_moving_partners(reentrant):
    """torch.utils.checkpoint (what mmengine's ``activation_checkpointing`` wraps
    modules in) runs the forward pass again in backward, after the effective partners
    moved on: the pair refuses that pass with one clear error. With frozen partners
    checkpointing trains as without it."""
    from torch.utils.checkpoint import checkpoint

    from adapter_nets import ConvNeXtBlock, assert_records_close

    def block(policy):
        torch.manual_seed(0)
        model = ConvNeXtBlock()
        inject_adapters(model, AdapterSpec(method='colora', gamma=2, share_ratio=0.5,
                                           partner_policy=policy),
                        pairs=model.pairs, spatial=model.spatial)
        reset_adapters_from_weights(model)
        randomize_adapters(model, std=0.3)
        mark_trainable(model, 'colora')
        return model.train()

    def train(model, checkpointed, steps=2):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        x = net_input(model).requires_grad_(reentrant)
        records = []
        for _ in range(steps):
            out = (checkpoint(model, x, use_reentrant=reentrant) if checkpointed
                   else model(x))
            out.square().mean().backward()
            records += [out.detach()] + [p.grad.clone() for p in model.parameters()
                                         if p.requires_grad]
            opt.step()
            opt.zero_grad()
        return records

    with pytest.raises(RuntimeError, match=r"pwconv1 .*partner_policy='effective' runs "
                       r"inside a backward pass: activation checkpointing"):
        train(block('effective'), checkpointed=True)
    got, want = (train(block('frozen'), checkpointed=c) for c in (True, False))
    if reentrant:
        # its first forward pass runs without gradients: the CPU's inference kernels
        # (the filter's C++ call), equal to rounding
        assert_records_close([got], [want], rel=1e-5)
    else:
        _assert_equal(got, want)
