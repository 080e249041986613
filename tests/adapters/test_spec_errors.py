"""Bad specifications raise, and the message names the module, the numbers and the fix."""
import pytest
import torch.nn as nn

from colora_mm.adapters import (AdaptedLayer, AdapterSpec, CoLoRAPair,
                                SpatialLowRankBranch, inject_adapters, iter_adapted_layers)

from adapter_nets import Bottleneck, ConvNeXtBlock, LinearPairNet


def _raises(fn, *fragments, exc=ValueError):
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    for fragment in fragments:
        assert fragment in msg, f'{fragment!r} not in: {msg}'
    return msg


class Odd(nn.Module):
    """Layers that cannot take the adapters they are offered."""

    def __init__(self):
        super().__init__()
        self.fc_a = nn.Linear(12, 20)
        self.fc_b = nn.Linear(24, 8)                               # does not chain
        self.grouped_1x1 = nn.Conv2d(16, 16, 1, groups=4)
        self.pw = nn.Conv2d(16, 16, 1)
        self.spatial_3x3 = nn.Conv2d(16, 16, 3, padding=1)
        self.grouped_3x3 = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.multiplier_3x3 = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.valid_3x3 = nn.Conv2d(16, 16, 3, padding=0)          # not "same"
        self.valid_dw7 = nn.Conv2d(16, 16, 7, padding=0, groups=16)
        self.short_dw5 = nn.Conv2d(16, 16, 5, padding=1, groups=16)
        self.dilated_dw7 = nn.Conv2d(16, 16, 7, padding=3, dilation=2, groups=16)
        self.even_4x4 = nn.Conv2d(16, 16, 4, padding=1)           # (4 - 1) // 2 = 1
        self.even_same = nn.Conv2d(16, 16, 4, padding='same')


def test_rank_zero_from_gamma_pair():
    model = LinearPairNet(12, 40, 28)
    msg = _raises(lambda: inject_adapters(model, AdapterSpec(method='colora', gamma=16),
                                          pairs=model.pairs),
                  'fc1', 'fc2', '12 // 16', 'gamma <= 12')
    # the shapes of the pair: 12 -> 40 -> 28
    assert '40' in msg and '28' in msg, msg
    assert not list(iter_adapted_layers(model))


def test_rank_zero_from_gamma_pointwise_and_conv_adapter():
    model = LinearPairNet(12, 40, 28)
    _raises(lambda: inject_adapters(model, AdapterSpec(method='lora', gamma=20),
                                    pairs=model.pairs),
            'fc1', '12->40', '12 // 20', 'gamma <= 12')
    block = ConvNeXtBlock(16)
    _raises(lambda: inject_adapters(block, AdapterSpec(method='conv_adapter', gamma=32),
                                    spatial=block.spatial),
            'dwconv', '16->16', '16 // 32', 'change gamma')
    res = Bottleneck(16, 8)
    _raises(lambda: AdaptedLayer(res.conv2, lambda l: SpatialLowRankBranch(l, 0), 'conv2'),
            'conv2', '8->8', 'r=0', 'gamma')


@pytest.mark.parametrize('share', [-0.1, 1.5])
def test_share_ratio_outside_unit_interval(share):
    _raises(lambda: AdapterSpec(method='colora', share_ratio=share),
            f'share_ratio={share}', '[0, 1]')
    model = LinearPairNet()
    _raises(lambda: inject_adapters(model, dict(method='colora', share_ratio=share),
                                    pairs=model.pairs), f'share_ratio={share}')
    _raises(lambda: CoLoRAPair(12, 20, 8, gamma=2, share_ratio=share,
                               where='CoLoRA pair (blk.fc1, blk.fc2)'),
            'blk.fc1', 'blk.fc2', f'share_ratio={share}', '[0, 1]')


def test_depthwise_width_not_divisible_by_rank():
    block = ConvNeXtBlock(20)                       # r = 20 // 3 = 6 does not divide 20
    _raises(lambda: inject_adapters(block, AdapterSpec(method='colora', gamma=3),
                                    pairs=block.pairs, spatial=block.spatial),
            'dwconv', 'C=20', 'r=6', 'groups=r', 'gamma')


@pytest.mark.parametrize('kwargs,fragments', [
    (dict(spec=dict(method='colora', gamma=2), pairs=[('fc1', 'fc9')]), ['fc9']),
    (dict(spec=dict(method='colora', gamma=2), pairs=[('fc1', 'fc2')],
          spatial=['blocks\\..*\\.dw']), ['blocks\\\\..*\\\\.dw']),
    (dict(spec=dict(method='lora', gamma=2), pointwise=['head']), ['head']),
    (dict(spec=dict(method='conv_adapter'), spatial=['conv7']), ['conv7']),
])
def test_names_that_match_nothing(kwargs, fragments):
    model = LinearPairNet()
    spec = kwargs.pop('spec')
    msg = _raises(lambda: inject_adapters(model, spec, **kwargs),
                  'matches no module', 'LinearPairNet', *fragments)
    assert 'fc1' in msg and 'fc2' in msg                       # what names look like


def test_pair_whose_shapes_do_not_chain():
    _raises(lambda: inject_adapters(Odd(), AdapterSpec(method='colora', gamma=2),
                                    pairs=[('fc_a', 'fc_b')]),
            'fc_a', 'fc_b', '12 -> 20', '24', 'does not chain', 'consumes its output')


@pytest.mark.parametrize('method', ['colora', 'lora', 'hira', 'pissa'])
def test_grouped_or_spatial_conv_as_pointwise_layer(method):
    def pair_with(name):
        return lambda: inject_adapters(Odd(), AdapterSpec(method=method, gamma=2),
                                       pairs=[(name, 'pw')])
    _raises(pair_with('grouped_1x1'), 'grouped_1x1', 'groups=4', 'pointwise')
    _raises(pair_with('spatial_3x3'), 'spatial_3x3', 'kernel=(3, 3)', 'pointwise')


@pytest.mark.parametrize('name,fragments', [
    ('grouped_3x3', ['groups=4', 'neither dense', 'Leave this layer out']),
    ('multiplier_3x3', ['groups=8', '8->16']),
    ('pw', ['k x k', 'pointwise']),
    ('valid_3x3', ['padding=(0, 0)', 'same', 'padding=(1, 1)']),
    ('valid_dw7', ['groups=16', 'padding=(0, 0)', 'padding=(3, 3)']),
    ('short_dw5', ['padding=(1, 1)', 'padding=(2, 2)']),
    ('dilated_dw7', ['dilation=(2, 2)', 'padding=(6, 6)']),
    ('even_4x4', ['padding=(1, 1)', 'even kernel']),
    ('even_same', ["padding='same'", 'even kernel'])])
def test_conv_the_spatial_branch_cannot_handle(name, fragments):
    model = Odd()
    model.pw_a, model.pw_b = nn.Conv2d(16, 32, 1), nn.Conv2d(32, 16, 1)
    _raises(lambda: inject_adapters(model, AdapterSpec(method='colora', gamma=2),
                                    pairs=[('pw_a', 'pw_b')], spatial=[name]),
            name, *fragments)


def test_other_bad_specs():
    _raises(lambda: AdapterSpec(method='adapterfusion'), 'adapterfusion', 'colora')
    _raises(lambda: AdapterSpec(method='conv_adapter', act='silu'), "act='silu'", 'gelu')
    _raises(lambda: AdapterSpec.from_dict(dict(method='colora', rank=4)), 'rank', 'gamma')
    _raises(lambda: AdapterSpec(method='colora', gamma=0), 'gamma=0')
    _raises(lambda: AdapterSpec(method='colora', partner_policy='ema'), 'ema', 'frozen')
    model = LinearPairNet()
    _raises(lambda: inject_adapters(model, AdapterSpec(method='colora', gamma=2)),
            'no pairs')
    inject_adapters(model, AdapterSpec(method='colora', gamma=2), pairs=model.pairs)
    _raises(lambda: inject_adapters(model, AdapterSpec(method='lora', gamma=2),
                                    pointwise=['fc1']), 'fc1')
    _raises(lambda: AdaptedLayer(model.fc1, lambda l: None, 'fc1'), 'fc1', 'already')
    _raises(lambda: AdaptedLayer(nn.Conv1d(3, 3, 1), lambda l: None, 'c1'), 'c1',
            'Conv1d', exc=TypeError)


@pytest.mark.parametrize('key,value', [('gamma', 2.5), ('gamma', 0), ('gamma', True),
                                       ('spatial_gamma', 0), ('spatial_gamma', 1.5)])
def test_rank_divisors_must_be_positive_integers(key, value):
    _raises(lambda: AdapterSpec(**{key: value}), key, repr(value), 'positive integer')


def test_train_path_must_be_known():
    _raises(lambda: AdapterSpec(train_path='fast'), "train_path='fast'", 'activation',
            'weight', 'auto')


def test_spatial_gamma_sets_the_spatial_rank_only():
    model = ConvNeXtBlock(channels=32)
    layers = inject_adapters(model, AdapterSpec(method='colora', gamma=4, spatial_gamma=8),
                             pairs=model.pairs, spatial=model.spatial)
    assert layers['dwconv'].adapter_branch.rank == 32 // 8
    assert layers['pwconv1'].adapter_branch.get_pair().r == 32 // 4
    _raises(lambda: inject_adapters(ConvNeXtBlock(channels=32),
                                    AdapterSpec(method='colora', spatial_gamma=64),
                                    pairs=model.pairs, spatial=model.spatial),
            'dwconv', '32 // 64', 'spatial_gamma')


def test_bitfit_injects_nothing_and_trains_biases_and_norms():
    from colora_mm.adapters import mark_trainable
    model = ConvNeXtBlock(channels=16)
    assert inject_adapters(model, AdapterSpec(method='bitfit'), pairs=model.pairs,
                           spatial=model.spatial) == {}
    mark_trainable(model, 'bitfit')
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {'dwconv.bias', 'norm.weight', 'norm.bias', 'pwconv1.bias',
                         'pwconv2.bias'}


@pytest.mark.parametrize('method', ['colora', 'lora', 'pissa', 'hira'])
def test_injecting_twice_names_the_adapted_layer(method):
    model = ConvNeXtBlock(channels=16)
    inject_adapters(model, AdapterSpec(method='colora', gamma=2), pairs=model.pairs,
                    spatial=model.spatial)
    before = {n: type(m) for n, m in model.named_modules()}
    msg = _raises(lambda: inject_adapters(model, AdapterSpec(method=method, gamma=2),
                                          pairs=model.pairs),
                  'pwconv1 (Linear, 16->64', 'already carries an adapter (colora)',
                  'inject once per layer')
    assert 'not a pointwise layer' not in msg
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_injecting_twice_into_a_parent_names_the_layer_there():
    outer = nn.Sequential(LinearPairNet())
    inject_adapters(outer[0], AdapterSpec(method='lora', gamma=2), pointwise=['fc1'])
    _raises(lambda: inject_adapters(outer, AdapterSpec(method='lora', gamma=2),
                                    pointwise=['0.fc1']),
            '0.fc1, adapted as fc1 (Linear, 12->20', 'already carries an adapter (lora)')


@pytest.mark.parametrize('key,value,fragments', [
    ('filter_lambda', float('nan'), ['filter_lambda=nan', 'finite']),
    ('filter_lambda', float('inf'), ['filter_lambda=inf', 'finite']),
    ('filter_lambda', float('-inf'), ['filter_lambda=-inf', 'finite']),
    ('scaling', 0, ['scaling=0', 'finite number > 0']),
    ('scaling', 0.0, ['scaling=0.0', '> 0']),
    ('scaling', -2.0, ['scaling=-2.0', '> 0']),
    ('scaling', float('nan'), ['scaling=nan', 'finite']),
    ('scaling', float('inf'), ['scaling=inf', 'finite'])])
def test_float_settings_must_be_finite_and_scaling_positive(key, value, fragments):
    for method in ('colora', 'lora', 'pissa'):
        _raises(lambda: AdapterSpec(method=method, **{key: value}), 'AdapterSpec',
                *fragments)
    model = LinearPairNet()
    _raises(lambda: inject_adapters(model, dict(method='lora', gamma=2, **{key: value}),
                                    pairs=model.pairs), *fragments)
    assert not list(iter_adapted_layers(model))


def test_zero_and_integer_floats_are_accepted():
    spec = AdapterSpec(method='colora', filter_lambda=0, share_ratio=1)
    assert (spec.filter_lambda, spec.share_ratio) == (0, 1)
    assert AdapterSpec(method='lora', scaling=1).scaling == 1
    AdapterSpec(method='colora', share_ratio=0)


@pytest.mark.parametrize('key,value,fragments', [
    ('use_filter', 'False', ["use_filter='False' (str)", 'True or False',
                             'write use_filter=False without quotes']),
    ('use_filter', 'false', ['write use_filter=False without quotes']),
    ('spatial', 'False', ["spatial='False' (str)", 'write spatial=False']),
    ('merged', 'no', ["merged='no' (str)", 'True or False',
                      'merged=True or merged=False without quotes']),
    ('use_filter', 1, ['use_filter=1 (int)', 'True or False']),
    ('share_ratio', '0.5', ["share_ratio='0.5' (str)", 'a number',
                            'write share_ratio=0.5 without quotes']),
    ('share_ratio', None, ['share_ratio=None (NoneType)', 'a number']),
    ('filter_lambda', '0.2', ["filter_lambda='0.2' (str)", 'a number']),
    ('scaling', True, ['scaling=True (bool)', 'a number']),
    ('act', 3, ['act=3 (int)', 'a string']),
    ('partner_policy', 1, ['partner_policy=1 (int)', 'a string']),
    ('gamma', '8', ["gamma='8' (str)", 'positive integer']),
])
def test_spec_values_must_have_their_types(key, value, fragments):
    _raises(lambda: AdapterSpec(**{key: value}), 'AdapterSpec', *fragments)
    _raises(lambda: AdapterSpec.from_dict({'method': 'colora', key: value}), *fragments)
    model = LinearPairNet()
    _raises(lambda: inject_adapters(model, {'method': 'colora', 'gamma': 2, key: value},
                                    pairs=model.pairs), *fragments)
    assert not list(iter_adapted_layers(model))


def test_numpy_scalars_are_taken_as_python_values():
    np = pytest.importorskip('numpy')
    spec = AdapterSpec(method='colora', gamma=np.int64(2), share_ratio=np.float32(0.5),
                       filter_lambda=np.float64(0), use_filter=np.bool_(False),
                       spatial_gamma=np.int32(4))
    plain = AdapterSpec(method='colora', gamma=2, share_ratio=0.5, filter_lambda=0.0,
                        use_filter=False, spatial_gamma=4)
    assert AdapterSpec(method='lora', scaling=np.float64(1.5)).scaling == 1.5
    assert spec == plain
    assert all(type(getattr(spec, k)) is type(getattr(plain, k))
               for k in ('gamma', 'share_ratio', 'use_filter', 'spatial_gamma'))
    _raises(lambda: AdapterSpec(gamma=np.float64(2.0)), 'gamma=2.0', 'positive integer')
    _raises(lambda: AdapterSpec(use_filter=np.int64(0)), 'use_filter=0 (int)',
            'True or False')


@pytest.mark.parametrize('method', ['bitfit', 'full', None])
@pytest.mark.parametrize('settings,fragments', [
    (dict(gamma=8), ['gamma=8 has no effect', 'Drop it']),
    (dict(use_filter=False, scaling=3.0), ['use_filter=False, scaling=3.0 have no effect',
                                           'Drop them']),
    (dict(train_path='weight'), ["train_path='weight'"]),
    (dict(merged=True), ['merged=True']),
])
def test_settings_without_an_adapter_give_a_warning(method, settings, fragments):
    name = 'full' if method is None else method
    for make in (lambda: AdapterSpec(method=method, **settings),
                 lambda: AdapterSpec.from_dict(dict(method=method, **settings))):
        with pytest.warns(UserWarning) as record:
            spec = make()
        assert spec.method == name
        msg = str(record[0].message)
        for fragment in (f'method={name!r} injects no adapter', *fragments,
                         f"adapter=dict(_delete_=True, method={name!r}, ...)"):
            assert fragment in msg, msg


def test_keys_an_adapter_method_does_not_read_give_a_warning():
    with pytest.warns(UserWarning) as record:
        spec = AdapterSpec(method='lora', gamma=8, share_ratio=0.9, use_filter=False)
    assert spec.share_ratio == 0.9                      # accepted, as before
    msg = str(record[0].message)
    for fragment in ("method='lora' does not read share_ratio=0.9, use_filter=False",
                     'it reads gamma, scaling', 'they have no effect'):
        assert fragment in msg, msg
    with pytest.warns(UserWarning, match=r"method='lora' does not read share_ratio=0\.3"):
        AdapterSpec(method='lora', overrides=[dict(pattern='fc1', share_ratio=0.3)])


@pytest.mark.parametrize('spec', [
    dict(method='bitfit'), dict(method='full', gamma=None, share_ratio=0.5),
    dict(method='lora', gamma=8, scaling=1.0, train_path='weight'),
    dict(method='colora', gamma=8, use_filter=False, spatial_gamma=16),
    dict(method='conv_adapter', act='gelu')])
def test_keys_the_method_reads_or_defaults_give_no_warning(spec):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        made = AdapterSpec.from_dict(spec)
        assert AdapterSpec.from_dict(made.to_dict()) == made


@pytest.mark.parametrize('method', ['lora', 'hira', 'colora'])
def test_input_of_the_wrong_width_names_the_layer(method):
    """Before the low-rank ops (whose matmul error would show their own, transposed
    shapes): the layer, the input's shape and the width the layer takes."""
    import torch
    net = ConvNeXtBlock(16) if method == 'colora' else LinearPairNet()
    inject_adapters(net, AdapterSpec(method=method, gamma=4), pairs=net.pairs,
                    spatial=net.spatial,
                    pointwise=[n for pair in net.pairs for n in pair])
    name, layer = next((n, m) for n, m in iter_adapted_layers(net) if not m.is_conv)
    x = torch.randn(2, 5, layer.in_channels + 1)
    _raises(lambda: layer(x), f'{name} (Linear', f'input {tuple(x.shape)} has '
            f'{layer.in_channels + 1} in its last dim', f'takes {layer.in_channels}')
    assert layer(torch.randn(2, 5, layer.in_channels)).shape[-1] == layer.out_channels
    if method == 'colora':
        name, conv = next((n, m) for n, m in iter_adapted_layers(net) if m.is_conv)
        x = torch.randn(1, conv.in_channels + 2, 8, 8)
        _raises(lambda: conv(x), f'{name} (Conv2d', 'in its channel dim',
                f'takes {conv.in_channels}')
        assert conv(torch.randn(1, conv.in_channels, 8, 8)).shape[1] == conv.out_channels


def test_targets_given_in_the_wrong_form_name_the_fix():
    """A flat pair or a lone string (which Python would read letter by letter) and a
    pattern that is not a regular expression are refused with the form to write."""
    net = ConvNeXtBlock(16)
    spec = AdapterSpec(method='colora', gamma=4)
    _raises(lambda: inject_adapters(net, spec, pairs=('pwconv1', 'pwconv2')),
            "pairs=[('pwconv1', 'pwconv2')]")
    _raises(lambda: inject_adapters(net, spec, pairs='pwconv1'), 'list of (W1, W2)')
    _raises(lambda: inject_adapters(net, spec, pairs=net.pairs, spatial='dwconv'),
            "spatial=['dwconv']")
    _raises(lambda: inject_adapters(net, AdapterSpec(method='lora', gamma=4),
                                    pointwise='pwconv1'), "pointwise=['pwconv1']")
    _raises(lambda: inject_adapters(net, spec, pairs=net.pairs, spatial=['dw[conv']),
            "'dw[conv'", 'regular expression', 're.escape')
    _raises(lambda: inject_adapters(net, spec, pairs=net.pairs, spatial=[3]),
            'spatial=[3]', '(str)')
    assert not list(iter_adapted_layers(net))
    layers = inject_adapters(net, spec, pairs=(p for p in net.pairs),
                             spatial=iter(net.spatial))
    assert sorted(layers) == ['dwconv', 'pwconv1', 'pwconv2']


def test_adapter_classes_used_directly_check_their_settings():
    from colora_mm.adapters import LoRA
    _raises(lambda: AdaptedLayer(nn.Linear(12, 20), lambda l: LoRA(l, 2.5), 'fc'),
            'fc (Linear', 'gamma=2.5', 'positive integer')
    _raises(lambda: AdaptedLayer(nn.Conv2d(4, 4, 3, padding=1, padding_mode='reflect'),
                                 lambda l: None, 'conv'),
            'conv (Conv2d', '4->4', "padding_mode='reflect'", 'leave this layer out')


@pytest.mark.parametrize('path', ['activation', 'weight'])
def test_input_of_another_dtype_is_refused_on_either_path(path):
    """As the upstream layer refuses it (outside autocast), whichever path the forward
    takes, with the layer, the dtypes and the fix."""
    import torch
    net = LinearPairNet()
    inject_adapters(net, AdapterSpec(method='lora', gamma=2, train_path=path),
                    pairs=net.pairs)
    _raises(lambda: net.fc1(torch.randn(3, 12, dtype=torch.float64)), 'fc1 (Linear',
            'torch.float64', 'torch.float32', 'model.to(dtype)', 'autocast')
    with pytest.raises(RuntimeError):
        nn.Linear(12, 20)(torch.randn(3, 12, dtype=torch.float64))


def test_an_unbatched_map_is_taken_as_nn_conv2d_takes_it():
    import torch
    from adapter_nets import randomize_adapters
    net = ConvNeXtBlock(16)
    inject_adapters(net, AdapterSpec(method='colora', gamma=4), pairs=net.pairs,
                    spatial=net.spatial)
    randomize_adapters(net)
    x = torch.randn(16, 9, 9)
    with torch.no_grad():
        assert torch.equal(net.dwconv(x), net.dwconv(x[None])[0])
