"""Lemma 3.1 (appendix A) and the kaiming-uniform initialisation it assumes.

For ``A (d x r)`` with i.i.d. ``U(-a, a)`` entries (``sigma^2 = a^2 / 3``) and
``T = A A^T``: ``Var[T_ij] = r sigma^4`` off the diagonal and ``4/5 r sigma^4`` on it.
"""
import math
import time

import pytest
import torch

from colora_mm.adapters import (AdapterSpec, CoLoRAPair, inject_adapters,
                                reset_adapters_from_weights)

from adapter_nets import Bottleneck, ConvNeXtBlock, LinearPairNet


def _check_lemma(A, a):
    """A: (samples, d, r) i.i.d. U(-a, a). Per-element Monte-Carlo variance of A A^T."""
    d, r = A.shape[1:]
    T = A @ A.transpose(1, 2)                        # (samples, d, d)
    var = T.var(dim=0)                               # per element, over the samples
    sigma4 = (a * a / 3.0) ** 2
    eye = torch.eye(d, dtype=torch.bool)
    off, diag = var[~eye] / (r * sigma4), var[eye] / (0.8 * r * sigma4)
    assert (off - 1).abs().max() < 0.05, off
    assert (diag - 1).abs().max() < 0.05, diag
    # the two cases really differ (4/5): the estimate can tell them apart
    assert (var[eye].mean() / var[~eye].mean() - 0.8).abs() < 0.04


@pytest.mark.parametrize('d,r', [(6, 4), (5, 9)])
def test_lemma_3_1_variance_of_a_at(d, r):
    start = time.perf_counter()
    a = 1.0 / math.sqrt(d)                  # kaiming-uniform (a = sqrt(5)) for fan_in d
    g = torch.Generator().manual_seed(d * 100 + r)
    A = (torch.rand(40000, d, r, generator=g, dtype=torch.float64) * 2 - 1) * a
    _check_lemma(A, a)
    assert time.perf_counter() - start < 2.0


def test_lemma_3_1_on_the_pairs_own_initialisation():
    """The same estimate on the A matrices CoLoRAPair draws: A2 (d' x rl), fan_in d'."""
    start = time.perf_counter()
    torch.manual_seed(0)
    samples, d, rl = 40000, 6, 4
    pair = CoLoRAPair(16, samples * d, 16, gamma=2, share_ratio=0.5)
    assert pair.rl == rl
    A = pair.A2.detach().double().reshape(samples, d, rl)
    _check_lemma(A, 1.0 / math.sqrt(samples * d))
    assert time.perf_counter() - start < 2.0


def _check_uniform(t, fan_in, name):
    bound = 1.0 / math.sqrt(fan_in)
    assert t.abs().max() <= bound + 1e-7, name
    assert t.abs().max() > 0.97 * bound, name             # fills the interval
    assert abs(t.std().item() / (bound / math.sqrt(3)) - 1) < 0.06, name
    assert abs(t.mean().item()) < 0.08 * bound, name


def test_pair_a_matrices_are_kaiming_uniform_for_their_fan_in():
    torch.manual_seed(0)
    pair = CoLoRAPair(256, 128, 192, gamma=4, share_ratio=0.5)   # r=32, rs=rl=16
    _check_uniform(pair.A1, 256, 'A1 (d x rl)')
    _check_uniform(pair.A2, 128, "A2 (d' x rl)")
    _check_uniform(pair.As, 256, 'As (d x rs)')
    for name in ('B1', 'B2', 'Bs'):
        assert torch.count_nonzero(getattr(pair, name)) == 0, name


def test_other_a_matrices_are_kaiming_uniform_and_b_zero():
    torch.manual_seed(0)
    model = LinearPairNet(128, 256, 96)
    inject_adapters(model, AdapterSpec(method='lora', gamma=2), pairs=model.pairs)
    _check_uniform(model.fc1.adapter_branch.A, 128, 'lora fc1 A')
    _check_uniform(model.fc2.adapter_branch.A, 256, 'lora fc2 A')
    assert torch.count_nonzero(model.fc1.adapter_branch.B) == 0
    model = LinearPairNet(128, 256, 96)
    inject_adapters(model, AdapterSpec(method='hira', gamma=2), pairs=model.pairs)
    _check_uniform(model.fc1.adapter_branch.A, 128, 'hira fc1 A')
    assert torch.count_nonzero(model.fc2.adapter_branch.B) == 0

    block = ConvNeXtBlock(64)
    inject_adapters(block, AdapterSpec(method='colora', gamma=2), pairs=block.pairs,
                    spatial=block.spatial)
    branch = block.dwconv.adapter_branch
    _check_uniform(branch.down.weight, 64, 'spatial A')
    assert torch.count_nonzero(branch.up.weight) == 0
    res = Bottleneck(64, 64)
    inject_adapters(res, AdapterSpec(method='colora', gamma=2), pairs=res.pairs,
                    spatial=res.spatial)
    _check_uniform(res.conv2.adapter_branch.down.weight, 64, 'dense A')
    assert torch.count_nonzero(res.conv2.adapter_branch.up.weight) == 0


def test_conv_adapter_starts_at_zero_with_unit_scale():
    block = ConvNeXtBlock(16)
    inject_adapters(block, AdapterSpec(method='conv_adapter', act='gelu'),
                    spatial=block.spatial)
    adapter = block.dwconv.adapter_branch
    assert torch.count_nonzero(adapter.up.weight) == 0
    assert torch.equal(adapter.alpha, torch.ones(16))


def test_hira_scaling_is_s_expect():
    """HiRA: dW = s_expect * W0 (.) (B A), s_expect = 1 / (sqrt(r) sigma_A) with
    sigma_A = (1 / sqrt(in)) / sqrt(3)."""
    torch.manual_seed(0)
    model = LinearPairNet(12, 20, 8)
    layers = inject_adapters(model, AdapterSpec(method='hira', gamma=2), pairs=model.pairs)
    reset_adapters_from_weights(model)
    for name, layer in layers.items():
        adapter = layer.adapter_branch
        with torch.no_grad():
            adapter.A.normal_()
            adapter.B.normal_()
        r, fan_in = adapter.A.shape
        s_expect = 1.0 / (math.sqrt(r) * (1.0 / math.sqrt(fan_in)) / math.sqrt(3.0))
        want = s_expect * layer.weight.double() * (adapter.B.double() @ adapter.A.double())
        got = layer.get_delta_weight()
        assert (got.double() - want).abs().max() < 1e-5 * want.abs().max(), name
