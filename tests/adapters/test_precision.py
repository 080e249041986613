"""The first backward pass from B = 0 is finite; deltas stay float32 under bf16 autocast."""
import pytest
import torch

from colora_mm.adapters import (AdapterSpec, inject_adapters, is_adapter_name,
                                iter_adapted_layers, mark_trainable,
                                reset_adapters_from_weights)

from adapter_nets import build, max_abs_diff, net_input, randomize_adapters

CASES = [
    ('linear_pair', dict(method='colora', gamma=2)),
    ('conv_pair', dict(method='colora', gamma=2, share_ratio=1.0)),
    ('mixed_pair', dict(method='colora', gamma=2, share_ratio=0.0)),
    ('convnext', dict(method='colora', gamma=4)),
    ('bottleneck', dict(method='colora', gamma=4)),
    ('bottleneck', dict(method='colora', gamma=4, use_filter=False)),
    ('convnext', dict(method='lora', gamma=4)),
    ('convnext', dict(method='pissa', gamma=4)),
    ('convnext', dict(method='hira', gamma=4)),
    ('convnext', dict(method='conv_adapter', act='gelu')),
    ('bottleneck', dict(method='conv_adapter')),
]


def _model(net, spec_kw, seed=0):
    model = build(net, seed)
    inject_adapters(model, AdapterSpec(**spec_kw), pairs=model.pairs, spatial=model.spatial)
    reset_adapters_from_weights(model)
    mark_trainable(model, spec_kw['method'])
    return model.train()


@pytest.mark.parametrize('net,spec_kw', CASES, ids=lambda v: str(v))
def test_first_backward_from_zero_b_is_finite(net, spec_kw):
    model = _model(net, spec_kw)
    x = net_input(model)
    model(x).square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for name, g in grads.items():
        if g is not None:
            assert torch.isfinite(g).all(), name
    # the zero-initialised factors do receive a gradient, or training could not start
    zero_init = [n for n in grads if is_adapter_name(n) and
                 (n.endswith(('.B1', '.B2', '.Bs', '.B', 'up.weight')))]
    assert zero_init
    for name in zero_init:
        if grads[name] is not None and grads[name].numel():
            assert grads[name].abs().max() > 0, name
    # and a second step from there stays finite
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.01 * p.grad
                p.grad = None
    model(x).square().mean().backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize('net,spec_kw', CASES, ids=lambda v: str(v))
def test_deltas_are_float32_under_bf16_autocast(net, spec_kw):
    model = _model(net, spec_kw)
    randomize_adapters(model, std=0.2)
    layers = dict(iter_adapted_layers(model))
    plain = {n: l.adapter_branch.delta_weight(l) for n, l in layers.items()}
    with torch.autocast('cpu', dtype=torch.bfloat16):
        for name, layer in layers.items():
            delta = layer.adapter_branch.delta_weight(layer)
            if delta is None:
                assert plain[name] is None
                continue
            assert delta.dtype == torch.float32, name
            assert torch.equal(delta, plain[name]), name
            if layer.foldable:
                assert layer.adapter_branch.fold_delta(layer).dtype == torch.float32
        x = net_input(model)
        out = model(x)                       # a training-mode forward under autocast
    out.float().square().mean().backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    for name, buf in model.named_buffers():
        if 'partner' in name:
            assert buf.dtype == torch.float32, name
    # autocast changes the big matmuls only: close to the fp32 output
    model.eval()
    with torch.no_grad():
        ref = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = model(x)
    assert max_abs_diff(low, ref) < 0.1 * max(ref.abs().max().item(), 1.0)


@pytest.mark.parametrize('net,spec_kw', [
    ('convnext', dict(method='colora', gamma=4)),     # spatial branch on the depthwise conv
    ('bottleneck', dict(method='lora', gamma=4, train_path='activation')),   # 1x1 convs
], ids=['colora-spatial', 'lora-activation'])
def test_one_low_precision_copy_of_a_conv_input_under_autocast(net, spec_kw):
    """Under autocast an adapted convolution casts its input once: the base conv and the
    adapter's own convs (a spatial branch's down-projection, the activation path's)
    save the same bf16 tensor for backward, not one copy each."""
    model = _model(net, spec_kw)
    randomize_adapters(model, std=0.2)
    x = net_input(model)
    layers = [layer for _, layer in iter_adapted_layers(model) if layer.is_conv]
    inputs = {}
    hooks = [layer.register_forward_pre_hook(
        lambda mod, args: inputs.__setitem__(id(mod), args[0].detach().to(torch.bfloat16)))
        for layer in layers]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = model(x)
    for h in hooks:
        h.remove()
    out.float().square().mean().backward()
    for layer in layers:
        low = inputs[id(layer)]                # the layer's input, cast
        copies = {t.untyped_storage().data_ptr() for t in saved
                  if t.dtype == torch.bfloat16 and t.shape == low.shape
                  and torch.equal(t, low)}
        assert len(copies) == 1, (layer.describe(), len(copies))


def test_autocast_query_on_torch_before_2_4(monkeypatch):
    """torch 2.1-2.3 (admitted by setup.py) has no device argument to
    ``is_autocast_enabled`` and no ``get_autocast_dtype``: the adapters' one query of
    the autocast state reads the per-device functions there."""
    from colora_mm.adapters.lowrank import autocast_dtype
    assert autocast_dtype('cpu') is None
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert autocast_dtype('cpu') == torch.bfloat16
        # the old API inside the context (torch.autocast itself needs the new one)
        monkeypatch.setattr(torch, 'is_autocast_enabled', lambda: False)   # CUDA's query
        monkeypatch.delattr(torch, 'get_autocast_dtype')
        try:
            assert autocast_dtype('cpu') == torch.bfloat16
            assert autocast_dtype('cuda') is None and autocast_dtype('xpu') is None
        finally:
            monkeypatch.undo()
    assert autocast_dtype('cpu') is None


@pytest.mark.parametrize('method', ['lora', 'colora'])
def test_frozen_linear_weight_kept_uncast_under_autocast(method):
    """An adapted frozen ``nn.Linear`` (ConvNeXt's pointwise layers) on the activation
    path keeps its float32 weight for backward under autocast and casts it again there,
    instead of keeping a bf16 copy of every weight: outputs and gradients bit for bit
    those of the same op given the cast weight (what it kept before)."""
    import copy

    from colora_mm.adapters import lowrank
    model = _model('convnext', dict(method=method, gamma=4, train_path='activation'))
    randomize_adapters(model, std=0.2)
    twin = copy.deepcopy(model)      # a step moves CoLoRA's effective partners
    x = net_input(model)
    linears = [layer for _, layer in iter_adapted_layers(model) if not layer.is_conv]
    assert linears and all(not layer.weight.requires_grad for layer in linears)
    shapes = {tuple(layer.weight.shape) for layer in linears}

    def step(model):
        params = [p for p in model.parameters() if p.requires_grad]
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t) or t, lambda t: t):
            with torch.autocast('cpu', dtype=torch.bfloat16):
                out = model(x)
        grads = torch.autograd.grad(out.float().square().mean(), params)
        return out, grads, saved

    out, grads, saved = step(model)
    assert all(layer.last_path == 'activation' for layer in linears)
    weight_copies = [t for t in saved if t.dtype == torch.bfloat16
                     and tuple(t.shape) in shapes]
    assert not weight_copies, [tuple(t.shape) for t in weight_copies]
    weights = {layer.weight.untyped_storage().data_ptr() for layer in linears}
    assert weights <= {t.untyped_storage().data_ptr() for t in saved}

    apply = lowrank.LinearLowRank.apply

    def apply_cast(x2, weight, *rest):         # the op as it was: given the cast weight
        return apply(x2, weight.to(x2.dtype), *rest)

    lowrank.LinearLowRank.apply = apply_cast
    try:
        ref_out, ref_grads, _ = step(twin)
    finally:
        lowrank.LinearLowRank.apply = apply
    assert torch.equal(out, ref_out)
    for g, r in zip(grads, ref_grads):
        assert torch.equal(g, r)
