"""What docs/adapter_api.md promises: one name prefix for adapter state, targets by name
or full-match pattern, spec dicts, the layer contract."""
import copy

import pytest
import torch
import torch.nn as nn

from colora_mm.adapters import (ADAPTER_PREFIX, AdaptedLayer, AdapterSpec, inject_adapters,
                                is_adapter_name, merge_adapters,
                                reset_adapters_from_weights)

from adapter_nets import ConvNeXtBlock, LinearPairNet, build, net_input, randomize_adapters


class Stage(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(ConvNeXtBlock(16), ConvNeXtBlock(16))

    def forward(self, x):
        return self.blocks(x)


@pytest.mark.parametrize('method', ['colora', 'lora', 'pissa', 'hira', 'conv_adapter'])
def test_everything_new_is_under_the_adapter_prefix(method):
    torch.manual_seed(0)
    model = Stage()
    base_keys = set(model.state_dict())
    base_params = {n for n, _ in model.named_parameters()}
    inject_adapters(model, AdapterSpec(method=method, gamma=4 if method != 'conv_adapter'
                                       else None),
                    pairs=[(f'blocks.{i}.pwconv1', f'blocks.{i}.pwconv2') for i in range(2)],
                    spatial=[r'blocks\.\d+\.dwconv'])
    reset_adapters_from_weights(model)
    assert ADAPTER_PREFIX == 'adapter_'
    new_keys = set(model.state_dict()) - base_keys
    assert new_keys and all(is_adapter_name(k) for k in new_keys)
    assert base_keys <= set(model.state_dict())           # upstream keys unchanged
    new_params = {n for n, _ in model.named_parameters()} - base_params
    assert new_params and all(is_adapter_name(n) for n in new_params)
    assert not any(is_adapter_name(k) for k in base_keys)


def test_targets_by_full_match_pattern():
    torch.manual_seed(0)
    model = Stage()
    layers = inject_adapters(model, AdapterSpec(method='lora', gamma=4),
                             pointwise=[r'blocks\.\d\.pwconv\d'])
    assert sorted(layers) == ['blocks.0.pwconv1', 'blocks.0.pwconv2', 'blocks.1.pwconv1',
                              'blocks.1.pwconv2']
    # full match: a prefix of a name is not enough
    with pytest.raises(ValueError, match='matches no module'):
        inject_adapters(Stage(), AdapterSpec(method='lora', gamma=4),
                        pointwise=[r'blocks\.\d\.pwconv'])
    model = Stage()
    layers = inject_adapters(model, AdapterSpec(method='conv_adapter'),
                             spatial=[r'.*dwconv'])
    assert sorted(layers) == ['blocks.0.dwconv', 'blocks.1.dwconv']
    assert all(isinstance(model.get_submodule(n), AdaptedLayer) for n in layers)


def test_spec_dicts():
    spec = AdapterSpec(method='colora', gamma=8, share_ratio=0.25, use_filter=False,
                       partner_policy='frozen')
    assert AdapterSpec.from_dict(spec.to_dict()) == spec
    assert AdapterSpec.from_dict(spec) is spec
    assert AdapterSpec.from_dict(None).method == 'full'
    assert AdapterSpec().rank_divisor == 16
    assert AdapterSpec(method='hira').rank_divisor == 20
    assert AdapterSpec(method='conv_adapter').rank_divisor == 4
    model = LinearPairNet()
    assert inject_adapters(model, None) == {}


def test_layer_contract_and_plain_layers():
    model = build('conv_pair')
    base = copy.deepcopy(model)
    layers = inject_adapters(model, AdapterSpec(method='colora', gamma=2),
                             pairs=model.pairs)
    reset_adapters_from_weights(model)
    randomize_adapters(model)
    layer = layers['conv1']
    assert layer.weight is base.conv1.weight or torch.equal(layer.weight, base.conv1.weight)
    assert 'conv1' in layer.describe() and '12->20' in layer.describe()
    assert layer.foldable and not layer.merged
    delta = layer.get_delta_weight()
    assert delta.shape == layer.weight.shape and delta.dtype == layer.weight.dtype
    x = net_input(model)
    with torch.no_grad():
        want = model(x)
    layer.merge()
    plain = layer.to_plain()
    assert type(plain) is nn.Conv2d
    assert set(plain.state_dict()) == set(base.conv1.state_dict())
    assert plain.weight is layer.weight and plain.bias is layer.bias
    assert (plain.kernel_size, plain.stride, plain.padding, plain.groups) == \
        (base.conv1.kernel_size, base.conv1.stride, base.conv1.padding, base.conv1.groups)
    assert merge_adapters(model) == []
    with torch.no_grad():
        assert (model(x) - want).abs().max() < 1e-5


@pytest.mark.parametrize('method', ['colora', 'lora', 'conv_adapter'])
@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_injected_modules_take_the_mode_of_the_layer_they_replace(method, mode):
    """Injecting into a model in eval mode leaves no train-mode adapter behind: two
    evaluations agree and no partner buffer moves."""
    torch.manual_seed(0)
    model = ConvNeXtBlock(16)
    getattr(model, mode)()
    inject_adapters(model, AdapterSpec(method=method, gamma=4 if method != 'conv_adapter'
                                       else None),
                    pairs=model.pairs, spatial=model.spatial)
    reset_adapters_from_weights(model)
    assert all(m.training == (mode == 'train') for m in model.modules())
    if mode == 'eval':
        randomize_adapters(model)
        buffers = {k: v.clone() for k, v in model.state_dict().items()}
        x = net_input(model)
        with torch.no_grad():
            assert torch.equal(model(x), model(x))
        for k, v in model.state_dict().items():
            assert torch.equal(v, buffers[k]), k
