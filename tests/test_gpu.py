"""On a CUDA device: mixed-precision training of UperNet + CoLoRAConvNeXt (fp16 and bf16
through mmengine's AmpOptimWrapper), the range filter on CUDA against the CPU, merged
against unmerged on CUDA, and a checkpoint written from CUDA loaded on the CPU.

Marked ``gpu`` and skipped without CUDA: ``pytest -m gpu tests/test_gpu.py`` on a GPU
node (benchmarks/gpu_check.sh runs them after the offline install).

The checks go through public behaviour only: model outputs and losses, the parameters'
and buffers' dtypes (every buffer whose name contains ``partner``), each adapted layer's
``get_delta_weight()`` and each correlated pair's ``delta(i)``.
"""
import copy

import pytest
import torch

pytest.importorskip('mmseg')

import colora_mm  # noqa: E402,F401  (registers the backbones, applies colora_mm.compat)
from colora_mm.adapters import (CoLoRAPairLayer, RangeKernelFilter,  # noqa: E402
                                is_adapter_name, iter_adapted_layers, merge_adapters,
                                reset_adapters_from_weights)
from colora_mm.adapters.base import exact_fp32  # noqa: E402
from helpers_ckpt import REDUCED_CONVNEXT  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device'),
]

#: Where the tests run (a module constant: their logic can be exercised elsewhere).
DEVICE = 'cuda'
SEG_KW = dict(out_indices=[0, 1, 2, 3], gap_before_final_norm=False,
              layer_scale_init_value=1.0, drop_path_rate=0.0)


def upernet(adapter, arch='small', channels=128, size=128):
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS
    init_default_scope('mmseg')
    dims = dict(small=96, base=128)[arch]
    in_channels = [dims, dims * 2, dims * 4, dims * 8]
    norm_cfg = dict(type='BN', requires_grad=True)
    return MODELS.build(dict(
        type='EncoderDecoder',
        data_preprocessor=dict(type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53],
                               std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_val=0,
                               seg_pad_val=255, size=(size, size)),
        backbone=dict(type='CoLoRAConvNeXt', arch=arch, adapter=adapter, **SEG_KW),
        decode_head=dict(type='UPerHead', in_channels=in_channels, in_index=[0, 1, 2, 3],
                         pool_scales=(1, 2, 3, 6), channels=channels, dropout_ratio=0.1,
                         num_classes=150, norm_cfg=norm_cfg, align_corners=False,
                         loss_decode=dict(type='CrossEntropyLoss', loss_weight=1.0)),
        auxiliary_head=dict(type='FCNHead', in_channels=in_channels[2], in_index=2,
                            channels=channels // 2, num_convs=1, concat_input=False,
                            dropout_ratio=0.1, num_classes=150, norm_cfg=norm_cfg,
                            align_corners=False,
                            loss_decode=dict(type='CrossEntropyLoss', loss_weight=0.4)),
        train_cfg=dict(), test_cfg=dict(mode='whole')))


def seg_batch(batch=2, size=128, seed=0):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    g = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for _ in range(batch):
        inputs.append(torch.randint(0, 256, (3, size, size), generator=g,
                                    dtype=torch.uint8))
        sample = SegDataSample()
        sample.gt_sem_seg = PixelData(
            data=torch.randint(0, 150, (1, size, size), generator=g))
        sample.set_metainfo(dict(img_shape=(size, size), ori_shape=(size, size),
                                 pad_shape=(size, size)))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def backbone(adapter=dict(method='colora'), arch=REDUCED_CONVNEXT, seed=0):
    from colora_mm.models import CoLoRAConvNeXt
    torch.manual_seed(seed)
    model = CoLoRAConvNeXt(arch=arch, adapter=adapter, **SEG_KW)
    reset_adapters_from_weights(model)
    return model


@torch.no_grad()
def randomize_adapters(model, std=0.05, seed=3):
    """Non-zero values in every adapter parameter, B matrices included (a trained
    state; fresh adapters contribute nothing, which would hide a wrong delta)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if is_adapter_name(name):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def pairs_of(model):
    return [layer.adapter_branch.get_pair() for _, layer in iter_adapted_layers(model)
            if isinstance(layer.adapter_branch, CoLoRAPairLayer)]


# --------------------------------------------------------------------- AMP training
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=['fp16', 'bf16'])
def test_amp_training_step(dtype):
    from mmengine.optim import AmpOptimWrapper
    if (DEVICE == 'cuda' and dtype is torch.bfloat16
            and not torch.cuda.is_bf16_supported()):
        pytest.skip('this GPU has no bf16')
    torch.manual_seed(0)
    model = upernet(dict(method='colora'))
    reset_adapters_from_weights(model)
    model.to(DEVICE).train()
    params = [p for p in model.parameters() if p.requires_grad]
    wrapper = AmpOptimWrapper(optimizer=torch.optim.AdamW(params, lr=1e-3),
                              loss_scale='dynamic', dtype=dtype)
    adapters = {n: p.detach().clone() for n, p in model.named_parameters()
                if is_adapter_name(n)}
    assert adapters
    data = seg_batch()
    changed = []
    for step in range(8):  # fp16's dynamic loss scale skips steps until it fits
        log_vars = model.train_step(data, wrapper)
        assert torch.isfinite(torch.as_tensor(log_vars['loss'])), (step, log_vars)
        changed = [n for n, p in model.named_parameters()
                   if n in adapters and not torch.equal(p.detach(), adapters[n])]
        if changed and step >= 1:
            break
    # the adapters trained, and stayed float32 (AMP keeps the master weights)
    assert changed, f'no adapter parameter changed in {step + 1} AMP steps'
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name
        assert torch.isfinite(p).all(), name
    for name, buf in model.named_buffers():
        if 'partner' in name:
            assert buf.dtype == torch.float32, name
            assert torch.isfinite(buf).all(), name
    # the weight updates and their scalings are formed in float32 under autocast
    layers = list(iter_adapted_layers(model.backbone))
    assert layers
    with torch.autocast(DEVICE, dtype=dtype):
        for name, layer in layers:
            if layer.foldable:
                delta = layer.get_delta_weight()
                assert delta.dtype == torch.float32, name
                assert torch.isfinite(delta).all(), name
        pairs = pairs_of(model.backbone)
        assert pairs
        for pair in pairs:
            for i in (0, 1):
                delta = pair.delta(i)
                assert delta.dtype == torch.float32
                assert torch.isfinite(delta).all()
                assert delta.abs().max() > 0       # B != 0 after training
    for module in model.modules():
        scaling = getattr(module, 'scaling', None)
        if isinstance(scaling, torch.Tensor):
            assert scaling.dtype == torch.float32, type(module).__name__
    # an autocast forward of the trained model is finite
    model.eval()
    with torch.no_grad(), torch.autocast(DEVICE, dtype=dtype):
        feats = model.extract_feat(torch.randn(1, 3, 128, 128, device=DEVICE))
    assert all(torch.isfinite(f.float()).all() for f in feats)


# --------------------------------------------------------------------- range filter
@pytest.mark.parametrize('separable', [True, False], ids=['separable', '2d'])
@pytest.mark.parametrize('shape', [(2, 6, 40, 56), (1, 4, 24, 300)],
                         ids=['map', 'long-axis'])
def test_range_filter_cuda_equals_cpu(separable, shape):
    if not separable and shape[-1] > 256:
        pytest.skip('the 2-D path on a long axis adds nothing over the map case')
    torch.manual_seed(0)
    z = torch.randn(*shape) * 3
    results = {}
    with exact_fp32():
        for device in ('cpu', DEVICE):
            f = RangeKernelFilter(separable=separable).to(device)
            zd = z.to(device).detach().requires_grad_(True)   # a leaf on each device
            out = f(zd)
            (out * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)) \
                .sum().backward()
            results[device] = out.detach().cpu(), zd.grad.cpu()
    (out_cpu, grad_cpu), (out_cuda, grad_cuda) = results['cpu'], results[DEVICE]
    torch.testing.assert_close(out_cuda, out_cpu, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_cuda, grad_cpu, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------- merge
@pytest.mark.parametrize('adapter', [dict(method='colora'),
                                     dict(method='colora', use_filter=False),
                                     dict(method='lora'), dict(method='hira')],
                         ids=['colora', 'colora-nofilter', 'lora', 'hira'])
def test_merged_equals_unmerged_on_cuda(adapter):
    model = backbone(adapter)
    randomize_adapters(model)
    model.to(DEVICE).train()
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    with exact_fp32():
        with torch.no_grad():
            model(x)            # a training forward: partner snapshots as in training
        model.eval()
        merged = copy.deepcopy(model)
        merge_adapters(merged)
        with torch.no_grad():
            ref, out = model(x), merged(x)
    assert all(t.device.type == DEVICE for t in out)
    for a, b in zip(out, ref):
        scale = max(b.abs().max().item(), 1.0)
        assert (a - b).abs().max().item() < 1e-4 * scale


# --------------------------------------------------------------------- checkpoint
def test_checkpoint_from_cuda_loads_on_cpu(tmp_path):
    from mmengine.runner.checkpoint import load_checkpoint, save_checkpoint
    model = backbone()
    randomize_adapters(model)
    model.to(DEVICE).train()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(x.to(DEVICE))          # partner snapshots taken on the GPU
    model.eval()
    with exact_fp32(), torch.no_grad():
        ref = [t.cpu() for t in model(x.to(DEVICE))]
    path = tmp_path / 'cuda.pth'
    save_checkpoint(dict(state_dict=model.state_dict(), meta=dict(device=DEVICE)),
                    str(path))
    on_cpu = backbone(seed=1)   # other initial values: all must come from the file
    load_checkpoint(on_cpu, str(path), map_location='cpu', strict=True)
    on_cpu.eval()
    for name, t in list(on_cpu.state_dict().items()):
        assert t.device.type == 'cpu', name
    saved = model.state_dict()
    for name, t in on_cpu.state_dict().items():
        assert torch.equal(t, saved[name].cpu()), name
    with torch.no_grad():
        out = on_cpu(x)
    for a, b in zip(out, ref):
        scale = max(b.abs().max().item(), 1.0)
        assert (a - b).abs().max().item() < 1e-4 * scale


# ------------------------------------------------------------- fused scalings
@pytest.mark.parametrize('zero', [(), ('y0',), ('x1', 'y1')], ids=['random', 'B=0', 'zero'])
def test_fused_scalings_on_cuda_equal_the_plain_ops(zero):
    """The scalings' one autograd op (constants cached on the device) against the plain
    ops on CUDA: the same forward values, the same gradients."""
    from colora_mm.adapters.scaling import plain_scaled, scaled_columns
    g = torch.Generator().manual_seed(0)
    terms = []
    for j, (rows, width, cols, k) in enumerate([(96, 3, 384, 1.7), (96, 3, 96, 4.1)]):
        x, y = torch.randn(rows, width, generator=g), torch.randn(width, cols, generator=g)
        x = torch.zeros_like(x) if f'x{j}' in zero else x
        y = torch.zeros_like(y) if f'y{j}' in zero else y
        terms.append((x.to(DEVICE).requires_grad_(), y.to(DEVICE).requires_grad_(), k))
    grad = torch.randn(96, 6, generator=g).to(DEVICE)
    cache, results = {}, []
    for fn in (lambda: scaled_columns(terms, cache),
               lambda: torch.cat([plain_scaled(x, y, k) for x, y, k in terms], 1)):
        for x, y, _ in terms:
            x.grad = y.grad = None
        out = fn()
        out.backward(grad)
        results.append([out.detach()] + [t.grad.clone() for x, y, _ in terms for t in (x, y)])
    assert torch.equal(results[0][0], results[1][0])
    for got, want in zip(*results):
        assert torch.isfinite(got).all()
        assert (got - want).abs().max() <= 1e-5 * max(want.abs().max().item(), 1.0)
    assert list(cache) == [(terms[0][0].device, torch.float32)]


def test_colora_training_step_on_cuda_equals_cpu():
    """One fp32 training step of CoLoRAConvNeXt (activation path, effective partners)
    on CUDA (the pair factors' Python formulation, fused scalings) and on the CPU (each
    pair side one C++ autograd node where the extension builds): the same adapter
    gradients and partner offsets, TF32 off."""
    cpu = backbone()
    randomize_adapters(cpu)
    gpu = copy.deepcopy(cpu).to(DEVICE)
    cpu.train()
    gpu.train()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with exact_fp32():
        for model, inp in ((cpu, x), (gpu, x.to(DEVICE))):
            sum(o.square().mean() for o in model(inp)).backward()
    grads = {n: p.grad for n, p in gpu.named_parameters() if p.grad is not None}
    assert grads
    for name, p in cpu.named_parameters():
        if name in grads:
            want = p.grad
            scale = max(want.abs().max().item(), 1e-6)
            assert (grads[name].cpu() - want).abs().max() <= 1e-4 * scale, name
    bufs = dict(gpu.named_buffers())
    for name, b in cpu.named_buffers():
        if 'partner' in name:
            assert bufs[name].shape == b.shape, name
            assert (bufs[name].cpu() - b).abs().max() <= 1e-4 * max(b.abs().max().item(), 1e-6)
