"""Per-layer settings (``AdapterSpec.overrides``): which layer takes which setting, the
ranks and counts that follow, merging with mixed settings, and the inputs refused
without building anything."""
import copy
import math

import pytest
import torch
import torch.nn as nn

from colora_mm.adapters import (AdaptedLayer, AdapterSpec, CoLoRAPairLayer, HiRA, LoRA,
                                SpatialLowRankBranch, inject_adapters, is_adapter_name,
                                iter_adapted_layers, merge_adapters)
from colora_mm.adapters.overrides import stage_glob, stage_of

from adapter_nets import ConvNeXtBlock, max_abs_diff, randomize_adapters


class Staged(nn.Module):
    """Four stages of ConvNeXt blocks, widths 8 / 16 / 32 / 64, 1 / 2 / 2 / 1 blocks,
    with strided downsampling convs between them (not adapted)."""

    widths = (8, 16, 32, 64)
    depths = (1, 2, 2, 1)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, self.widths[0], 2, stride=2)
        self.downsample = nn.ModuleList(
            nn.Conv2d(a, b, 2, stride=2) for a, b in zip(self.widths, self.widths[1:]))
        self.stages = nn.ModuleList(
            nn.Sequential(*[ConvNeXtBlock(c) for _ in range(d)])
            for c, d in zip(self.widths, self.depths))
        self.eval()

    @property
    def pairs(self):
        return [(f'stages.{i}.{j}.pwconv1', f'stages.{i}.{j}.pwconv2')
                for i, d in enumerate(self.depths) for j in range(d)]

    @property
    def spatial(self):
        return [f'stages.{i}.{j}.dwconv' for i, d in enumerate(self.depths)
                for j in range(d)]

    def forward(self, x):
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            if i:
                x = self.downsample[i - 1](x)
            x = stage(x)
        return x


MIXED = [dict(pattern='stages.3.*', gamma=4, share_ratio=0.75),
         dict(pattern='stages.0.*', method='none')]


def inject(spec, model=None, **targets):
    model = model or Staged()
    targets.setdefault('pairs', model.pairs)
    targets.setdefault('spatial', model.spatial)
    return model, inject_adapters(model, spec, **targets)


def _raises(fn, *fragments):
    with pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    for fragment in fragments:
        assert fragment in msg, f'{fragment!r} not in: {msg}'
    return msg


def _structure(model):
    return [(n, type(m)) for n, m in model.named_modules()]


# ------------------------------------------------------------------ semantics
def test_mixed_settings_give_each_stage_its_ranks():
    model, layers = inject(dict(method='colora', gamma=8, share_ratio=0.5,
                                overrides=MIXED))
    # stage 0: no adapter at all, its layers are the plain ones
    assert not any(n.startswith('stages.0.') for n in layers)
    assert type(model.stages[0][0].pwconv1) is nn.Linear
    assert type(model.stages[0][0].dwconv) is nn.Conv2d
    for i, (c, depth) in enumerate(zip(Staged.widths, Staged.depths)):
        if i == 0:
            continue
        gamma, share = (4, 0.75) if i == 3 else (8, 0.5)
        r = c // gamma          # n = min(C, 4C, C) = C
        rs = math.floor(r * share)
        for j in range(depth):
            pair = model.stages[i][j].pwconv1.adapter_branch.get_pair()
            assert (pair.r, pair.rs, pair.rl) == (r, rs, r - rs), (i, j)
            assert pair.gamma == gamma and pair.share_ratio == share
            assert pair.num_trainable() == r * 2 * c + 2 * (r - rs) * 4 * c
            branch = model.stages[i][j].dwconv.adapter_branch
            assert isinstance(branch, SpatialLowRankBranch) and branch.rank == c // gamma
    # every adapter tensor counted once, and it matches the closed forms above
    expected = sum(
        (c // g) * 2 * c + 2 * (c // g - math.floor(c // g * s)) * 4 * c   # pair
        + c * (c // g) + 9 * c                                              # spatial
        for i, (c, d) in enumerate(zip(Staged.widths, Staged.depths)) if i
        for g, s in [((4, 0.75) if i == 3 else (8, 0.5))] for _ in range(d))
    assert sum(p.numel() for n, p in model.named_parameters()
               if is_adapter_name(n)) == expected


def test_first_match_wins():
    spec = dict(method='colora', gamma=8, overrides=[
        dict(pattern='stages.2.1.*', gamma=2),
        dict(pattern='stages.[23].*', gamma=4)])
    model, _ = inject(spec, spatial=())
    assert model.stages[2][1].pwconv1.adapter_branch.get_pair().gamma == 2
    assert model.stages[2][0].pwconv1.adapter_branch.get_pair().gamma == 4
    assert model.stages[3][0].pwconv1.adapter_branch.get_pair().gamma == 4
    assert model.stages[1][0].pwconv1.adapter_branch.get_pair().gamma == 8


def test_a_pair_takes_one_setting_when_the_pattern_names_either_layer():
    model, _ = inject(dict(method='colora', gamma=8,
                           overrides=[dict(pattern='*.1.pwconv2', share_ratio=1.0)]),
                      spatial=())
    first = model.stages[1][1].pwconv1.adapter_branch
    second = model.stages[1][1].pwconv2.adapter_branch
    assert first.get_pair() is second.get_pair()
    assert first.get_pair().rl == 0 and first.get_pair().share_ratio == 1.0
    assert model.stages[1][0].pwconv1.adapter_branch.get_pair().share_ratio == 0.5


def test_spatial_branch_per_stage():
    """Global spatial=False, the last stage alone gets the branch (filter off)."""
    model, layers = inject(dict(method='colora', gamma=8, spatial=False, overrides=[
        dict(pattern='stages.3.*', spatial=True, use_filter=False, spatial_gamma=16)]))
    spatial = [n for n, m in layers.items()
               if isinstance(m.adapter_branch, SpatialLowRankBranch)]
    assert spatial == ['stages.3.0.dwconv']
    branch = model.stages[3][0].dwconv.adapter_branch
    assert branch.rank == 64 // 16 and branch.filter is None


@pytest.mark.parametrize('method,cls', [('lora', LoRA), ('hira', HiRA)])
def test_pointwise_methods_take_overrides(method, cls):
    extra = dict(scaling=0.5) if method == 'lora' else {}    # HiRA has no scaling
    model, layers = inject(dict(method=method, gamma=8, overrides=[
        dict(pattern='stages.3.0.pwconv1', gamma=2, **extra),
        dict(pattern='stages.0.*', method='none')]))
    assert not any(n.startswith('stages.0.') for n in layers)
    a = model.stages[3][0].pwconv1.adapter_branch
    assert isinstance(a, cls) and a.rank == 64 // 2
    if method == 'lora':
        assert a.scaling == 0.5
        assert model.stages[3][0].pwconv2.adapter_branch.scaling == 2.0
    assert model.stages[3][0].pwconv2.adapter_branch.rank == 64 // 8


def test_conv_adapter_takes_overrides():
    model, layers = inject(dict(method='conv_adapter', overrides=[
        dict(pattern='stages.1.*', gamma=8), dict(pattern='stages.3.*', method='none')]))
    assert sorted(layers) == ['stages.0.0.dwconv', 'stages.1.0.dwconv',
                              'stages.1.1.dwconv', 'stages.2.0.dwconv', 'stages.2.1.dwconv']
    assert model.stages[1][0].dwconv.adapter_branch.width == 16 // 8
    assert model.stages[2][0].dwconv.adapter_branch.width == 32 // 4


def test_partner_policy_train_path_and_filter_lambda_take_overrides():
    """Settings no tensor shape shows, overridden for stage 2 alone: its pairs keep
    frozen partners, its layers train through the weight, its filters take lambda 0.5;
    every other stage keeps the global values."""
    model, layers = inject(dict(method='colora', gamma=8, overrides=[
        dict(pattern='stages.2.*', partner_policy='frozen', train_path='weight',
             filter_lambda=0.5)]))
    spec = AdapterSpec(method='colora')
    assert (spec.partner_policy, spec.train_path, spec.filter_lambda) == \
        ('effective', 'auto', 0.2)
    seen = set()
    for name, layer in layers.items():
        stage2 = name.startswith('stages.2.')
        seen.add(stage2)
        branch = layer.adapter_branch
        if isinstance(branch, SpatialLowRankBranch):
            assert branch.filter is not None, name
            assert branch.filter_lambda == (0.5 if stage2 else 0.2), name
        else:
            assert isinstance(branch, CoLoRAPairLayer), name
            assert branch.get_pair().partner_policy == \
                ('frozen' if stage2 else 'effective'), name
            assert layer.train_path == ('weight' if stage2 else 'auto'), name
    assert seen == {True, False}
    # and the frozen stage's partners stay where a training step found them
    randomize_adapters(model, std=0.1)
    pairs = {i: model.stages[i][0].pwconv1.adapter_branch.get_pair() for i in (1, 2)}
    before = {i: pair.partner_w1.clone() for i, pair in pairs.items()}
    model.train()(torch.randn(1, 3, 32, 32))
    assert torch.equal(pairs[2].partner_w1, before[2])
    assert not torch.equal(pairs[1].partner_w1, before[1])
    assert model.stages[2][0].pwconv1.last_path == 'weight'


@pytest.mark.parametrize('method', ['lora', 'pissa'])
def test_pointwise_train_path_takes_overrides(method):
    """LoRA and PiSSA layers of stage 3 train through the weight, the others through
    the activations, as the global spec says."""
    _, layers = inject(dict(method=method, gamma=8, train_path='activation', overrides=[
        dict(pattern='stages.3.*', train_path='weight')]))
    for name, layer in layers.items():
        assert layer.train_path == ('weight' if name.startswith('stages.3.')
                                    else 'activation'), name


def test_conv_adapter_act_takes_overrides():
    """GELU in stage 1's Conv-Adapters, the global ReLU everywhere else."""
    model, layers = inject(dict(method='conv_adapter', act='relu', overrides=[
        dict(pattern='stages.1.*', act='gelu')]))
    assert len(layers) == 6
    for name, layer in layers.items():
        act = layer.adapter_branch.act
        assert type(act) is (nn.GELU if name.startswith('stages.1.') else nn.ReLU), name


def test_fresh_injection_with_overrides_is_the_base_model():
    base = Staged()
    model, _ = inject(dict(method='colora', gamma=8, overrides=MIXED))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize('spec,unfolded', [
    (dict(method='colora', gamma=8, overrides=MIXED),
     [f'stages.{i}.{j}.dwconv' for i in (1, 2, 3) for j in range(Staged.depths[i])]),
    (dict(method='colora', gamma=8, use_filter=False, overrides=[
        dict(pattern='stages.3.*', spatial=False), dict(pattern='stages.0.*', gamma=2)]),
     [f'stages.{i}.{j}.dwconv' for i in (0, 1, 2) for j in range(Staged.depths[i])]),
    (dict(method='lora', gamma=8, overrides=[
        dict(pattern='stages.3.*', gamma=4, scaling=1.0),
        dict(pattern='stages.0.*', method='none')]), []),
])
def test_merge_equals_unmerged_with_mixed_settings(spec, unfolded):
    model, _ = inject(spec)
    randomize_adapters(model, std=0.1)
    model.train()
    model(torch.randn(2, 3, 32, 32))      # effective partners move away from W
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        assert sorted(merge_adapters(model)) == sorted(unfolded)
        merged = model(x)
    assert max_abs_diff(merged, reference) < 1e-5
    assert [n for n, _ in iter_adapted_layers(model)] == unfolded


def test_state_dict_round_trip_with_mixed_settings():
    """A checkpoint of a model with overrides loads strictly into the same build."""
    spec = dict(method='colora', gamma=8, overrides=MIXED)
    model, _ = inject(spec)
    randomize_adapters(model)
    again, _ = inject(spec)
    again.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
    other, _ = inject(dict(method='colora', gamma=8))   # same layers, other ranks
    with pytest.raises(RuntimeError, match='size mismatch'):
        other.load_state_dict(model.state_dict(), strict=True)


def test_spec_round_trips_through_a_dict():
    spec = AdapterSpec.from_dict(dict(method='colora', gamma=8, overrides=MIXED))
    assert spec.overrides == tuple(MIXED)
    again = AdapterSpec.from_dict(spec.to_dict())
    assert again == spec


def test_stage_helpers():
    assert stage_of('stages.3.0.pointwise_conv1') == 'stages.3'
    assert stage_of('layer4.2.conv1') == 'layer4'
    assert stage_of('stages.2.blocks.1.ffn.layers.0.0') == 'stages.2'
    assert stage_glob('stages.3.0.pwconv1') == 'stages.3.*'
    assert stage_glob('fc1') == 'fc1'


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize('overrides,fragments', [
    ([dict(gamma=8)], ["overrides[0]", "needs pattern='...'"]),
    ([dict(pattern='stages.3.*')], ['overrides[0]', 'sets nothing']),
    ([dict(pattern='stages.3.*', merged=True)], ["cannot set ['merged']", 'gamma']),
    ([dict(pattern='stages.3.*', gama=8)], ["cannot set ['gama']"]),
    ([dict(pattern='stages.0.*', method='none'),
      dict(pattern='stages.3.*', share_ratio=1.5)],
     ["overrides[1] (pattern 'stages.3.*')", 'share_ratio=1.5', '[0, 1]']),
    ([dict(pattern='stages.3.*', gamma=0)], ["pattern 'stages.3.*'", 'gamma=0',
                                             'positive integer']),
    ([dict(pattern='stages.3.*', method='lora')],
     ["method='lora'", "spec's method is 'colora'", "method='none'"]),
    (dict(pattern='stages.3.*', gamma=8), ['list of dicts']),
])
def test_bad_overrides_are_refused_when_the_spec_is_made(overrides, fragments):
    _raises(lambda: AdapterSpec.from_dict(dict(method='colora', overrides=overrides)),
            *fragments)


def test_overrides_with_full_finetuning_are_refused():
    _raises(lambda: AdapterSpec(method='full', overrides=[dict(pattern='*', gamma=2)]),
            "method='full'", 'no adapter')


def test_pattern_matching_nothing_names_the_pattern_and_real_names():
    model = Staged()
    before = _structure(model)
    msg = _raises(lambda: inject(dict(method='colora', gamma=8, overrides=[
        dict(pattern='stages.0.*', method='none'), dict(pattern='stage.3.*', gamma=4)]),
        model), "overrides[1] (pattern 'stage.3.*') matches no adapted layer",
        'stages.0.0.pwconv1', 'stages.3.0.pwconv1', "'stages.0.*' selects a whole stage")
    assert 'carr' not in msg
    assert _structure(model) == before


def test_override_for_a_module_without_adapter():
    model = Staged()
    before = _structure(model)
    _raises(lambda: inject(dict(method='colora', gamma=8, overrides=[
        dict(pattern='downsample.*', gamma=2)]), model),
        "pattern 'downsample.*'", "'downsample.0', 'downsample.1', 'downsample.2'",
        'carry no adapter', 'stages.0.0.pwconv1')
    _raises(lambda: inject(dict(method='colora', gamma=8, spatial=False, overrides=[
        dict(pattern='*.norm', gamma=2)]), model, spatial=()),
        "'stages.0.0.norm'", 'no adapter')
    assert _structure(model) == before
    assert not list(iter_adapted_layers(model))


def test_shadowed_override_is_an_error():
    _raises(lambda: inject(dict(method='colora', gamma=8, overrides=[
        dict(pattern='stages.*', gamma=4), dict(pattern='stages.3.*', gamma=2)])),
        "overrides[1] (pattern 'stages.3.*') never applies",
        "matched first by overrides[0] (pattern 'stages.*')", 'more specific pattern first')


def test_gamma_too_large_for_a_narrow_stage_builds_nothing():
    """gamma 16 suits the wide stages, not the 8-channel first one."""
    model = Staged()
    before = _structure(model)
    state = copy.deepcopy(model.state_dict())
    _raises(lambda: inject(dict(method='colora', gamma=16), model),
            'CoLoRA pair (stages.0.0.pwconv1, stages.0.0.pwconv2: 8 -> 32 -> 8)',
            'block width n=8', '8 // 16 = 0', "the spec's gamma=16", 'gamma <= 8',
            "dict(pattern='stages.0.*', gamma=8)", "method='none'")
    # from an override, on the last stage: the earlier stages were wrapped already
    msg = _raises(lambda: inject(dict(method='lora', gamma=4, overrides=[
        dict(pattern='stages.3.*', gamma=128)]), model),
        'stages.3.0.pwconv1 (64->256)', 'min(in, out) // gamma = 64 // 128 = 0',
        "gamma=128 from overrides[0] (pattern 'stages.3.*')", 'gamma <= 64')
    _raises(lambda: inject(dict(method='colora', gamma=4, overrides=[
        dict(pattern='stages.1.*', spatial_gamma=32)]), model),
        'stages.1.0.dwconv (16->16)', 'spatial rank r = C_in // gamma = 16 // 32 = 0',
        "spatial_gamma=32 from overrides[0]", 'spatial_gamma <= 16')
    # the spec's own spatial_gamma on layers an override takes for another key
    _raises(lambda: inject(dict(method='colora', gamma=4, spatial_gamma=32, overrides=[
        dict(pattern='stages.1.*', use_filter=False)]), model),
        'stages.0.0.dwconv (8->8)', "the spec's spatial_gamma=32",
        'spatial_gamma <= 8')
    _raises(lambda: inject(dict(method='colora', gamma=4, spatial_gamma=16, overrides=[
        dict(pattern='stages.0.*', use_filter=False)]), model),
        'stages.0.0.dwconv (8->8)', "the spec's spatial_gamma=16; overrides[0] (pattern "
        "'stages.0.*'), which takes these layers, does not set spatial_gamma",
        'spatial_gamma <= 8')
    assert msg
    assert _structure(model) == before
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_a_failing_adapter_rolls_back_the_whole_injection():
    """An error raised by an adapter itself (the depthwise branch needs r | C), after
    other layers were wrapped, leaves the model as it was."""
    model = Staged()
    before = _structure(model)
    _raises(lambda: inject(dict(method='colora', gamma=8, overrides=[
        dict(pattern='stages.3.*', spatial_gamma=5)]), model),
        'stages.3.0.dwconv', 'C=64', 'r=12')
    assert _structure(model) == before
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())


def test_pair_adapters_are_the_colora_pair_everywhere_else():
    model, layers = inject(dict(method='colora', gamma=8, overrides=MIXED), spatial=())
    assert all(isinstance(m.adapter_branch, CoLoRAPairLayer) for m in layers.values())
    assert len(layers) == 2 * sum(Staged.depths[1:])


@pytest.mark.parametrize('override,fragments', [
    (dict(use_filter='false'), ["use_filter='false' (str)", 'True or False',
                                'write use_filter=False without quotes']),
    (dict(spatial='False'), ["spatial='False' (str)", 'True or False']),
    (dict(share_ratio='0.75'), ["share_ratio='0.75' (str)", 'must be a number',
                                'write share_ratio=0.75 without quotes']),
    (dict(gamma=True), ['gamma=True (bool)', 'positive integer']),
    (dict(filter_lambda=float('nan')), ['filter_lambda=nan', 'finite']),
    (dict(filter_lambda=float('inf')), ['filter_lambda=inf', 'finite']),
    (dict(scaling=0), ['scaling=0', '> 0']),
    (dict(method='none', gamma='8'), ["gamma='8' (str)", 'positive integer']),
])
def test_override_values_are_checked_like_the_spec(override, fragments):
    overrides = [dict(pattern='stages.3.*', **override)]
    _raises(lambda: AdapterSpec.from_dict(dict(method='colora', overrides=overrides)),
            "overrides[0] (pattern 'stages.3.*')", *fragments)


def test_override_values_from_numpy_are_kept_as_python_values():
    np = pytest.importorskip('numpy')
    spec = AdapterSpec(method='colora', overrides=[
        dict(pattern='stages.3.*', gamma=np.int64(8), share_ratio=np.float32(0.75),
             use_filter=np.bool_(False))])
    assert spec.overrides == (dict(pattern='stages.3.*', gamma=8, share_ratio=0.75,
                                   use_filter=False),)
    assert type(spec.overrides[0]['gamma']) is int


@pytest.mark.parametrize('spec,fragments', [
    # the spatial rank comes from spatial_gamma where that is set
    (dict(method='colora', gamma=8, spatial_gamma=4, overrides=[
        dict(pattern='*.dwconv', gamma=2)]),
     ["overrides[0] (pattern '*.dwconv') sets gamma, which the spatial branches it "
      'applies to do not read (a spatial branch takes its rank from spatial_gamma',
      'They read filter_lambda, spatial, spatial_gamma, use_filter']),
    (dict(method='colora', gamma=8, overrides=[dict(pattern='*.dwconv', share_ratio=1.0)]),
     ['sets share_ratio, which the spatial branches']),
    (dict(method='colora', gamma=8, overrides=[dict(pattern='*.pwconv1', use_filter=False,
                                                    spatial_gamma=4)]),
     ['sets spatial_gamma, use_filter, which the CoLoRA pairs it applies to do not read',
      'They read gamma, partner_policy, share_ratio, train_path']),
    (dict(method='hira', gamma=8, overrides=[dict(pattern='stages.3.*', scaling=0.5)]),
     ['sets scaling, which the pointwise layers']),
    (dict(method='colora', gamma=8, overrides=[
        dict(pattern='stages.0.*', method='none', gamma=2)]),
     ['sets gamma', 'They read nothing']),
])
def test_an_override_its_layers_do_not_read_is_refused(spec, fragments):
    """Every override must change something: a key no layer it applies to reads is
    an error naming the key, the kind of layers and what they read."""
    with pytest.raises(ValueError) as err:
        inject(spec)
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)


def test_a_pair_override_shadowed_by_the_other_layer_of_the_pair_is_named():
    """A pair is one target: a rule matching its second layer takes it before a later
    rule matching its first."""
    with pytest.raises(ValueError) as err:
        inject(dict(method='colora', gamma=8, overrides=[
            dict(pattern='*.pwconv2', gamma=2), dict(pattern='*.pwconv1', gamma=4)]))
    message = str(err.value)
    assert "overrides[1] (pattern '*.pwconv1') never applies" in message, message
    assert "matched first by overrides[0] (pattern '*.pwconv2')" in message, message
