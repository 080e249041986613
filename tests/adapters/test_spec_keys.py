"""Which spec keys each method reads (``spec_keys_used``): a key a method ignores
changes nothing in the model it builds."""
import dataclasses

import pytest
import torch

from colora_mm.adapters import (METHOD_KEYS, METHODS, AdapterSpec, inject_adapters,
                                spec_keys_used)

from adapter_nets import ConvNeXtBlock, max_abs_diff, randomize_adapters

#: A non-default value for every field but ``method``, ``gamma``, ``merged`` and
#: ``overrides`` (every adapter method reads those).
OTHER_VALUES = dict(share_ratio=0.9, use_filter=False, filter_lambda=0.7,
                    partner_policy='frozen', spatial=False, spatial_gamma=2,
                    scaling=0.5, act='gelu', train_path='weight')
ADAPTER_METHODS = [m for m in METHODS if m not in ('bitfit', 'full')]


def test_every_field_is_read_by_some_method():
    names = [f.name for f in dataclasses.fields(AdapterSpec)]
    assert set(METHOD_KEYS) == set(METHODS)
    for method in METHODS:
        used = spec_keys_used(method)
        assert used[0] == 'method' and set(used) <= set(names), method
    assert set().union(*(spec_keys_used(m) for m in METHODS)) == set(names)
    assert spec_keys_used('bitfit') == spec_keys_used('full') == spec_keys_used(None) \
        == ('method',)
    assert 'share_ratio' not in spec_keys_used('lora')
    assert 'scaling' in spec_keys_used('pissa')
    with pytest.raises(ValueError, match="method='dora'"):
        spec_keys_used('dora')


def _adapted(spec, seed=0):
    torch.manual_seed(seed)
    model = ConvNeXtBlock(channels=16).eval()
    inject_adapters(model, spec, pairs=model.pairs, spatial=model.spatial)
    return model


@pytest.mark.parametrize('method', ADAPTER_METHODS)
def test_keys_a_method_ignores_change_nothing(method):
    used = spec_keys_used(method)
    ignored = {k: v for k, v in OTHER_VALUES.items() if k not in used}
    assert ignored, method
    base = _adapted(AdapterSpec(method=method, gamma=4))
    with pytest.warns(UserWarning, match=f'method={method!r} does not read'):
        other = _adapted(AdapterSpec(method=method, gamma=4, **ignored))
    with torch.no_grad():
        randomize_adapters(base)
    state = base.state_dict()
    assert {k: v.shape for k, v in other.state_dict().items()} == \
        {k: v.shape for k, v in state.items()}
    assert [type(m) for m in other.modules()] == [type(m) for m in base.modules()]
    other.load_state_dict(state)
    x = torch.randn(2, 16, 9, 9, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_abs_diff(other(x), base(x)) < 1e-5


@pytest.mark.parametrize('method', ADAPTER_METHODS)
def test_keys_a_method_reads_change_its_model(method):
    """The table lists no key the method ignores: each changes the model's tensors or
    outputs (partner_policy how the partners move in training, train_path nothing but
    the path)."""
    base = _adapted(AdapterSpec(method=method, gamma=4))
    with torch.no_grad():
        randomize_adapters(base)
    x = torch.randn(2, 16, 9, 9, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = base(x)
    for key in spec_keys_used(method):
        if key not in OTHER_VALUES or key in ('partner_policy', 'train_path'):
            continue
        other = _adapted(AdapterSpec(method=method, gamma=4, **{key: OTHER_VALUES[key]}))
        changed = {k: v.shape for k, v in other.state_dict().items()} != \
            {k: v.shape for k, v in base.state_dict().items()}
        if not changed:
            other.load_state_dict(base.state_dict())
            with torch.no_grad():
                changed = max_abs_diff(other(x), reference) > 1e-5
        assert changed, (method, key)
