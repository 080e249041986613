"""torch.compile of adapted backbones: the adapters trace without graph breaks (one
graph, so a GPU step can be captured whole) and train exactly as in eager mode."""
import copy

import pytest
import torch

pytest.importorskip('mmpretrain')
pytest.importorskip('mmseg')

import colora_mm  # noqa: E402,F401
from colora_mm.adapters import reset_adapters_from_weights  # noqa: E402
from colora_mm.models import CoLoRAConvNeXt, SegCoLoRAResNet  # noqa: E402
from helpers_ckpt import REDUCED_CONVNEXT  # noqa: E402

ADAPTERS = {
    'colora': dict(method='colora'),
    'colora-frozen-nofilter': dict(method='colora', partner_policy='frozen',
                                   use_filter=False),
    'lora': dict(method='lora'),
    'hira': dict(method='hira'),
}


def build(adapter):
    torch.manual_seed(0)
    model = CoLoRAConvNeXt(arch=REDUCED_CONVNEXT, adapter=adapter, out_indices=[0, 1, 2, 3],
                           gap_before_final_norm=False, layer_scale_init_value=1.0)
    reset_adapters_from_weights(model)
    with torch.no_grad():                      # trained-looking adapters (B != 0)
        for name, p in model.named_parameters():
            if 'adapter_' in name:
                p.normal_(0, 0.02)
    return model.train()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize('name', list(ADAPTERS))
def test_forward_is_one_graph(name):
    model = build(ADAPTERS[name])
    explained = torch._dynamo.explain(model)(torch.randn(2, 3, 64, 64))
    reasons = [str(r.reason).splitlines()[0] for r in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize('adapter', [dict(method='colora', gamma=8),
                                     dict(method='lora', gamma=8)], ids=['colora', 'lora'])
def test_resnet_forward_is_one_graph(adapter):
    """1x1 and strided convolutions, the spatial branch on the 3x3 convs."""
    model = SegCoLoRAResNet(depth=50, base_channels=16, stem_channels=16,
                            adapter=adapter).train()
    reset_adapters_from_weights(model)
    explained = torch._dynamo.explain(model)(torch.randn(2, 3, 64, 64))
    assert explained.graph_break_count == 0, [str(r.reason).splitlines()[0]
                                              for r in explained.break_reasons]


@pytest.mark.parametrize('name', ['colora', 'lora'])
def test_compiled_training_equals_eager(name):
    """Three SGD steps in float64, compiled (AOTAutograd, no code generation) against
    eager: the losses, every gradient and the partner offsets ('effective' partners move
    each step, which changes their shapes once) agree to float64 rounding, so that a
    gradient the compiled graph loses or changes cannot hide in float32 noise (with the
    package's custom autograd functions traced, torch 2.11 dropped the bias and input
    gradients of the fused low-rank linear: the biases of whole blocks got zero)."""
    eager = build(ADAPTERS[name]).double()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend='aot_eager')
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05)
            for m in (eager, compiled_model)]
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for _ in range(3):
        losses = []
        for model, opt in zip((eager, compiled), opts):
            opt.zero_grad()
            loss = sum(o.square().mean() for o in model(x))
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-12)
        pairs = [(n, p_e.grad, p_c.grad) for (n, p_e), (_, p_c)
                 in zip(eager.named_parameters(), compiled_model.named_parameters())
                 if p_e.grad is not None]
        scale = max(g.abs().max().item() for _, g, _ in pairs)
        for param, g_eager, g_compiled in pairs:
            assert g_compiled is not None, param
            torch.testing.assert_close(g_compiled, g_eager, rtol=1e-9, atol=1e-12 * scale,
                                       msg=lambda m: f'{param}: {m}')
    for (name_e, b_e), (_, b_c) in zip(eager.named_buffers(),
                                       compiled_model.named_buffers()):
        assert b_c.shape == b_e.shape, name_e
        torch.testing.assert_close(b_c, b_e, rtol=1e-9, atol=1e-12,
                                   msg=lambda m: f'{name_e}: {m}')
