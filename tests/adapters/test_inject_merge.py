"""Injection and merging over a table of tiny networks and every method: a fresh
injection changes nothing; merged equals unmerged; merge/unmerge round-trips."""
import copy
import re

import pytest
import torch
import torch.nn as nn

from colora_mm.adapters import (AdaptedLayer, AdapterSpec, NotFoldableError,
                                adapter_state_dict, inject_adapters, is_adapter_name, iter_adapted_layers,
                                merge_adapters, reset_adapters_from_weights,
                                unmerge_adapters)

from adapter_nets import build, max_abs_diff, net_input, randomize_adapters

GAMMA = {'linear_pair': 2, 'conv_pair': 2, 'mixed_pair': 2, 'convnext': 4, 'bottleneck': 4}
PAIR_NETS = ['linear_pair', 'conv_pair', 'mixed_pair']
BLOCK_NETS = ['convnext', 'bottleneck']

# (net, spec overrides, names expected to stay unfolded)
FOLDABLE = (
    [(net, dict(method=m), []) for net in PAIR_NETS
     for m in ('colora', 'lora', 'pissa', 'hira')]
    + [(net, dict(method=m), []) for net in BLOCK_NETS for m in ('lora', 'pissa', 'hira')]
    + [('convnext', dict(method='colora', spatial=False), []),
       ('bottleneck', dict(method='colora', use_filter=False), []),       # dense branch folds
       ('bottleneck', dict(method='colora', spatial=False), [])]
)
NOT_FOLDABLE = [
    ('convnext', dict(method='colora'), ['dwconv']),                        # filter on
    ('convnext', dict(method='colora', use_filter=False), ['dwconv']),      # depthwise style
    ('convnext', dict(method='conv_adapter'), ['dwconv']),
    ('bottleneck', dict(method='colora'), ['conv2']),                       # filter on
    ('bottleneck', dict(method='conv_adapter'), ['conv2']),
]
ALL_CASES = FOLDABLE + NOT_FOLDABLE + [(net, dict(method='full'), []) for net in
                                       PAIR_NETS + BLOCK_NETS]


def _case_id(case):
    net, over, _ = case
    return net + '-' + '-'.join(f'{v}' if k == 'method' else f'{k}={v}'
                                for k, v in over.items())


def _spec(net, over):
    kw = dict(gamma=GAMMA[net])
    kw.update(over)
    return AdapterSpec(**kw)


def _inject(net, over, seed=0):
    model = build(net, seed)
    base = copy.deepcopy(model)
    layers = inject_adapters(model, _spec(net, over), pairs=model.pairs,
                             spatial=model.spatial)
    return base, model, layers


@pytest.mark.parametrize('mode', ['eval', 'train'])
@pytest.mark.parametrize('case', ALL_CASES, ids=_case_id)
def test_fresh_injection_reproduces_base_exactly(case, mode):
    net, over, _ = case
    base, model, layers = _inject(net, over)
    if over['method'] == 'full':
        assert layers == {}
    else:
        assert layers and all(isinstance(m, AdaptedLayer) for m in layers.values())
    if over['method'] != 'pissa':      # PiSSA's SVD re-writes the base weight
        reset_adapters_from_weights(model)
    x = net_input(model)
    getattr(base, mode)()
    getattr(model, mode)()
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
    # base checkpoints load into the adapted model unchanged
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert unexpected == []
    assert all(is_adapter_name(k) for k in missing)


def _trained(net, over):
    """An injected model with random non-zero adapter weights, in eval mode."""
    base, model, _ = _inject(net, over)
    reset_adapters_from_weights(model)
    randomize_adapters(model, std=0.2)
    model.eval()
    return base, model


@pytest.mark.parametrize('case', FOLDABLE + NOT_FOLDABLE, ids=_case_id)
def test_merged_equals_unmerged(case):
    net, over, expect_unfolded = case
    base, model = _trained(net, over)
    x = net_input(model)
    with torch.no_grad():
        want = model(x)
        assert max_abs_diff(want, base(x)) > 1e-3          # the adapters do something
        merged = copy.deepcopy(model)
        unfolded = merge_adapters(merged)
        assert sorted(unfolded) == sorted(expect_unfolded)
        assert max_abs_diff(merged(x), want) < 1e-5
    adapted = dict(iter_adapted_layers(merged))
    assert sorted(adapted) == sorted(expect_unfolded)      # folded wrappers are gone
    for name, module in merged.named_modules():
        if name in dict(iter_adapted_layers(model)) and name not in expect_unfolded:
            assert type(module) in (nn.Linear, nn.Conv2d), name
    if not expect_unfolded:
        # a plain upstream checkpoint: the base model's keys, loadable with no trace
        sd = merged.state_dict()
        assert set(sd) == set(base.state_dict())
        plain = copy.deepcopy(base)
        plain.load_state_dict(sd, strict=True)
        with torch.no_grad():
            assert max_abs_diff(plain(x), want) < 1e-5


@pytest.mark.parametrize('case', FOLDABLE + NOT_FOLDABLE, ids=_case_id)
def test_merge_unmerge_round_trip_and_second_merge_refused(case):
    net, over, expect_unfolded = case
    _, model = _trained(net, over)
    x = net_input(model)
    layers = dict(iter_adapted_layers(model))
    weights = {n: l.weight.detach().clone() for n, l in layers.items()}
    with torch.no_grad():
        want = model(x)
        unfolded = merge_adapters(model, replace=False)
    assert sorted(unfolded) == sorted(expect_unfolded)
    folded = [n for n in layers if n not in expect_unfolded]
    for name in folded:
        assert layers[name].merged
        assert max_abs_diff(layers[name].weight, weights[name]) > 1e-4, name
        with pytest.raises(RuntimeError, match='already merged'):
            layers[name].merge()
    for name in expect_unfolded:
        assert not layers[name].merged
        with pytest.raises(NotFoldableError,
                           match=rf'\b{re.escape(name)} \(Conv2d .*cannot (be )?fold'):
            layers[name].merge()
        assert torch.equal(layers[name].weight, weights[name])
        with pytest.raises(RuntimeError, match=r'merge\(\) before to_plain\(\)'):
            layers[name].to_plain()                   # would drop the adaptation
    after_first = {n: l.weight.detach().clone() for n, l in layers.items()}
    with torch.no_grad():
        assert sorted(merge_adapters(model, replace=False)) == sorted(expect_unfolded)
        for n, l in layers.items():                   # the second merge did nothing
            assert torch.equal(l.weight, after_first[n]), n
        assert max_abs_diff(model(x), want) < 1e-5
    assert unmerge_adapters(model) == len(folded)
    for n, l in layers.items():
        assert not l.merged
        assert max_abs_diff(l.weight, weights[n]) < 1e-6, n
    with torch.no_grad():
        assert max_abs_diff(model(x), want) < 1e-5
    assert unmerge_adapters(model) == 0


@pytest.mark.parametrize('dtype', [torch.float64, torch.bfloat16])
@pytest.mark.parametrize('case', FOLDABLE + NOT_FOLDABLE, ids=_case_id)
def test_injecting_into_a_converted_model_is_converting_the_adapted_one(case, dtype):
    """The adapters take their layer's precision (and device): injecting into a
    float64 or bf16 model gives what injecting first and converting after gives, in
    every tensor and in the outputs."""
    net, over, _ = case
    first = build(net).to(dtype)
    inject_adapters(first, _spec(net, over), pairs=first.pairs, spatial=first.spatial)
    after = build(net)
    inject_adapters(after, _spec(net, over), pairs=after.pairs, spatial=after.spatial)
    after.to(dtype)
    state, want_state = first.state_dict(), after.state_dict()
    assert state.keys() == want_state.keys()
    for key, value in state.items():
        assert value.dtype == want_state[key].dtype, key
        assert torch.equal(value, want_state[key]), key
    randomize_adapters(first)
    randomize_adapters(after)
    x = net_input(first).to(dtype)
    with torch.no_grad():
        assert torch.equal(first(x), after(x))


@pytest.mark.parametrize('case', FOLDABLE + NOT_FOLDABLE, ids=_case_id)
def test_checkpoints_say_whether_their_weights_are_merged(case):
    """A layer merged in place saves the update it baked in: its checkpoint loads into
    an unmerged model as a merged one (never applied twice), an unmerged checkpoint
    loads into a merged model as an unmerged one, and adapter tensors loaded without
    the weights unmerge the stale update."""
    net, over, expect_unfolded = case
    _, model = _trained(net, over)
    x = net_input(model)
    plain_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(x)
        merge_adapters(model, replace=False)
        merged_out = model(x)
    merged_state = {k: v.clone() for k, v in model.state_dict().items()}
    merged_names = {n for n, l in iter_adapted_layers(model) if l.merged}
    assert {k for k in merged_state if k.endswith('adapter_merged_delta')} == {
        n + '.adapter_merged_delta' for n in merged_names}

    fresh = _inject(net, over, seed=7)[1].eval()
    fresh.load_state_dict(merged_state)
    assert {n for n, l in iter_adapted_layers(fresh) if l.merged} == merged_names
    with torch.no_grad():
        assert torch.equal(fresh(x), merged_out)
    unmerge_adapters(fresh)
    unmerge_adapters(model)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key

    again = _inject(net, over, seed=7)[1].eval()
    again.load_state_dict(merged_state)               # merged, then an unmerged checkpoint
    again.load_state_dict(plain_state)
    assert not any(l.merged for _, l in iter_adapted_layers(again))
    with torch.no_grad():
        assert torch.equal(again(x), want)

    again.load_state_dict(merged_state)               # merged, then adapter tensors only
    stale = _trained(net, over)[1]
    other = {k: v + 0.01 * (i + 1) for i, (k, v) in enumerate(
        adapter_state_dict(stale).items()) if v.is_floating_point()}
    again.load_state_dict(other, strict=False)
    assert not any(l.merged for _, l in iter_adapted_layers(again))
    check = _inject(net, over, seed=7)[1].eval()
    check.load_state_dict(plain_state)
    check.load_state_dict(other, strict=False)
    with torch.no_grad():
        assert max_abs_diff(again(x), check(x)) < 1e-5
