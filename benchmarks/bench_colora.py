"""CoLoRA speed and memory, side by side in one run, as ratios.

    python benchmarks/bench_colora.py                        # CPU, every table
    python benchmarks/bench_colora.py --only filter deltas   # some tables
    python benchmarks/bench_colora.py --device cuda --amp    # on a GPU, fp16 autocast
    python benchmarks/bench_colora.py --only train --profile lora colora   # + profiles

Tables:

1. ``train``: one training step (data preprocessing, forward, loss, backward, AdamW
   update) of an mmseg UperNet on ``CoLoRAConvNeXt`` with full fine-tuning, LoRA, HiRA
   and CoLoRA; time (median of ``--repeats`` steps after warm-up) and peak memory. On
   CPU each method's memory is measured in a fresh subprocess as the growth of the
   process's peak resident set over the training steps (Linux: the peak mark
   ``VmHWM`` is reset through ``/proc/self/clear_refs`` after the model and its inputs
   are built, and read after the steps), i.e. what training adds on top of the built
   model (activations, gradients, optimiser state); on CUDA as
   ``torch.cuda.max_memory_allocated`` after a reset, minus what was allocated before.
2. ``filter``: the range filter's separable path against its 2-D path (and the naive
   double loop of Eq. 7 on the smallest map), forward and forward + backward, on the
   compressed maps the spatial branch of a ConvNeXt-T sees at 512x512.
3. ``merge``: inference of the merged model against the plain backbone, alternating
   the two models run by run: ResNet-50 with ``use_filter=False`` (folds completely),
   ResNet-50 and ConvNeXt-T with the filter (the spatial branch stays).
4. ``deltas``: the per-step cost of forming every weight update of the ConvNeXt-T
   backbone (each adapter's ``delta_weight``, forward and backward), per method, and as
   a share of the training step of table 1.

Ratios are taken within one run. Timings are medians (``--repeats``) after warm-up;
use ``--threads`` to pin the thread count (``torch.get_num_threads()`` otherwise).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

METHODS = ('full', 'lora', 'hira', 'colora')
#: Extra CoLoRA rows of table 1 that attribute its cost: without the range filter,
#: and the correlated pairs alone (no spatial branch).
BREAKDOWN = {'colora-nofilter': dict(method='colora', use_filter=False),
             'colora-pairs': dict(method='colora', spatial=False)}


def adapter_of(name: str) -> dict:
    return dict(BREAKDOWN.get(name, dict(method=name)))


# ---------------------------------------------------------------------- helpers
def sync(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


def timeit(fn: Callable, device: str, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns: Dict[str, Callable], device: str, repeats: int,
                warmup: int = 2) -> Dict[str, float]:
    """Median times of several callables run in turn (A B A B ...), so that a change
    in machine load hits all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def machine(device: str) -> str:
    if device == 'cuda':
        return f'{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}'
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    return f'{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads'


def table(title: str, header: List[str], rows: List[List[str]]) -> None:
    print(f'\n{title}')
    print('| ' + ' | '.join(header) + ' |')
    print('|' + '---|' * len(header))
    for row in rows:
        print('| ' + ' | '.join(row) + ' |')


def registry():
    import colora_mm.models  # noqa: F401  (registers CoLoRAConvNeXt / CoLoRAResNet)
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS
    init_default_scope('mmseg')
    return MODELS


# ---------------------------------------------------------------------- 1. train step
def upernet_cfg(method: str, arch: str, size: int, channels: int) -> dict:
    """mmseg's UperNet-ConvNeXt (upernet_convnext.py) with CoLoRAConvNeXt, BN instead of
    SyncBN, ``channels`` in the heads, 150 classes, no pretrained weights."""
    dims = dict(atto=40, femto=48, pico=64, nano=80, tiny=96, small=96, base=128)[arch]
    in_channels = [dims, dims * 2, dims * 4, dims * 8]
    norm_cfg = dict(type='BN', requires_grad=True)
    adapter = adapter_of(method)
    return dict(
        type='EncoderDecoder',
        data_preprocessor=dict(type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53],
                               std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_val=0,
                               seg_pad_val=255, size=(size, size)),
        backbone=dict(type='CoLoRAConvNeXt', arch=arch, out_indices=[0, 1, 2, 3],
                      drop_path_rate=0.0, layer_scale_init_value=1.0,
                      gap_before_final_norm=False, adapter=adapter),
        decode_head=dict(type='UPerHead', in_channels=in_channels, in_index=[0, 1, 2, 3],
                         pool_scales=(1, 2, 3, 6), channels=channels, dropout_ratio=0.1,
                         num_classes=150, norm_cfg=norm_cfg, align_corners=False,
                         loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False,
                                          loss_weight=1.0)),
        auxiliary_head=dict(type='FCNHead', in_channels=in_channels[2], in_index=2,
                            channels=channels // 2, num_convs=1, concat_input=False,
                            dropout_ratio=0.1, num_classes=150, norm_cfg=norm_cfg,
                            align_corners=False,
                            loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False,
                                             loss_weight=0.4)),
        train_cfg=dict(), test_cfg=dict(mode='whole'))


def make_batch(batch: int, size: int, seed: int = 0) -> dict:
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    g = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for _ in range(batch):
        inputs.append(torch.randint(0, 256, (3, size, size), generator=g,
                                    dtype=torch.uint8))
        s = SegDataSample()
        s.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, size, size), generator=g))
        s.set_metainfo(dict(img_shape=(size, size), ori_shape=(size, size),
                            pad_shape=(size, size)))
        samples.append(s)
    return dict(inputs=inputs, data_samples=samples)


def build_trainer(method: str, args) -> tuple:
    from mmengine.optim import AmpOptimWrapper, OptimWrapper
    from colora_mm.adapters import reset_adapters_from_weights
    torch.manual_seed(0)
    model = registry().build(upernet_cfg(method, args.arch, args.size, args.head_channels))
    reset_adapters_from_weights(model)          # what init_weights() does after loading
    model.to(args.device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
    if args.amp:
        wrapper = AmpOptimWrapper(optimizer=optimizer, loss_scale='dynamic')
    else:
        wrapper = OptimWrapper(optimizer=optimizer)
    data = make_batch(args.batch, args.size)
    step = lambda: model.train_step(data, wrapper)  # noqa: E731
    trainable = sum(p.numel() for p in params)
    return model, step, trainable


def _proc_status_kib(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise RuntimeError(f'/proc/self/status has no {field}')


def memory_worker(method: str, args) -> None:
    """Run in a fresh process: peak memory that training steps add."""
    model, step, trainable = build_trainer(method, args)
    if args.device == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(args.memory_steps):
            step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        out = dict(delta=peak - before, peak=peak, kind='cuda max_memory_allocated')
    else:
        # Reset the kernel's peak-RSS mark (VmHWM) so that only the training steps
        # count: building the model can peak higher than training a small one.
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        before = _proc_status_kib('VmRSS') * 1024
        for _ in range(args.memory_steps):
            step()
        peak = _proc_status_kib('VmHWM') * 1024
        out = dict(delta=peak - before, peak=peak,
                   kind='peak RSS growth (VmHWM after reset, Linux)')
    print('MEMORY ' + json.dumps(out))


def measure_memory(method: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), '--memory-worker', method,
           '--device', args.device, '--arch', args.arch, '--size', str(args.size),
           '--batch', str(args.batch), '--head-channels', str(args.head_channels),
           '--memory-steps', str(args.memory_steps)]
    if args.amp:
        cmd.append('--amp')
    if args.threads:
        cmd += ['--threads', str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    for line in res.stdout.splitlines():
        if line.startswith('MEMORY '):
            return json.loads(line[len('MEMORY '):])
    raise RuntimeError(f'memory worker for {method} failed:\n{res.stderr[-3000:]}')


def bench_train(args, results: dict) -> None:
    names = list(args.methods) + ([] if args.no_breakdown else list(BREAKDOWN))
    steps, trainables = {}, {}
    for method in names:
        model, step, trainables[method] = build_trainer(method, args)
        steps[method] = step
    times = interleaved(steps, args.device, args.repeats, warmup=1)
    results['train_step_s'] = times
    del steps, model
    memory = {m: measure_memory(m, args) for m in names}
    results['train_memory'] = memory
    full_t, lora_t = times.get('full'), times.get('lora')
    full_m = memory['full']['delta'] if 'full' in memory else None
    ratio = lambda a, b: f'{a / b:.2f}' if b else '-'  # noqa: E731
    rows = []
    for m in names:
        rows.append([m, f'{trainables[m] / 1e6:.2f}M', f'{times[m] * 1e3:.0f}',
                     ratio(times[m], full_t), ratio(times[m], lora_t),
                     f'{memory[m]["delta"] / 2 ** 20:.0f}',
                     ratio(memory[m]['delta'], full_m),
                     f'{memory[m]["peak"] / 2 ** 20:.0f}'])
    table(f'1. Training step, UperNet + CoLoRAConvNeXt-{args.arch} (head channels '
          f'{args.head_channels}), batch {args.batch} x {args.size}x{args.size}, '
          f'{"AMP fp16" if args.amp else "fp32"}; memory: {memory[names[0]]["kind"]}, '
          'fresh process per method',
          ['method', 'trainable', 'step ms', 'vs full', 'vs LoRA', 'train mem MiB',
           'mem vs full', 'peak MiB'], rows)


def bench_profile(args, results: dict) -> None:
    """torch.profiler tables of one training step per method (self time per op)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if args.device == 'cuda' else [])
    sort = 'self_cuda_time_total' if args.device == 'cuda' else 'self_cpu_time_total'
    for method in args.profile:
        model, step, _ = build_trainer(method, args)
        step()
        step()
        with profile(activities=activities) as prof:
            step()
        print(f'\nProfile of one training step, {method} (top ops by self time)')
        print(prof.key_averages().table(sort_by=sort, row_limit=args.profile_rows))
        del model, step


# ---------------------------------------------------------------------- 2. filter
def naive_filter(z, window=11, sigma=1.0, eps=1e-5):
    """Eq. 7 by a loop over pixels (channels vectorised)."""
    n, c, h, w = z.shape
    k = window // 2
    x = torch.arange(window, dtype=z.dtype, device=z.device) - k
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    ks = torch.outer(g, g)
    gamma = math.pi / (2 * (z.flatten(2).amax(-1) - z.flatten(2).amin(-1)).clamp_min(1e-5))
    zp = F.pad(z, (k, k, k, k), mode='reflect')
    out = torch.empty_like(z)
    for i in range(h):
        for j in range(w):
            patch = zp[:, :, i:i + window, j:j + window]
            centre = z[:, :, i, j]
            kr = torch.cos(gamma[..., None, None] * (centre[..., None, None] - patch))
            wgt = ks * kr
            out[:, :, i, j] = (wgt * patch).sum((-1, -2)) / (wgt.sum((-1, -2)) + eps)
    return out


def bench_filter(args, results: dict) -> None:
    from colora_mm.adapters import RangeKernelFilter
    dev = args.device
    # ConvNeXt-T at 512x512, batch 2: stage i has C = 96 * 2^i channels at 128 / 2^i
    # pixels; the branch compresses to r = C // 16. Plus one detection-sized map.
    shapes = [(2, 6, 128, 128), (2, 12, 64, 64), (2, 24, 32, 32), (2, 48, 16, 16),
              (2, 6, 200, 336)]
    sep = RangeKernelFilter(separable=True).to(dev)
    dense = RangeKernelFilter(separable=False).to(dev)
    rows, out = [], []
    for shape in shapes:
        z = torch.randn(*shape, device=dev)
        zg = z.clone().requires_grad_(True)
        with torch.no_grad():
            fwd = interleaved({'sep': lambda: sep(z), '2d': lambda: dense(z)}, dev,
                              args.repeats)
        both = interleaved({'sep': lambda: sep(zg).sum().backward(),
                            '2d': lambda: dense(zg).sum().backward()}, dev, args.repeats)
        naive = float('nan')
        if shape == (2, 48, 16, 16):
            with torch.no_grad():
                naive = timeit(lambda: naive_filter(z), dev, 1, warmup=0)
        out.append(dict(shape=shape, fwd=fwd, fwd_bwd=both, naive=naive))
        rows.append([str(shape), f'{fwd["sep"] * 1e3:.2f}', f'{fwd["2d"] * 1e3:.2f}',
                     f'{fwd["2d"] / fwd["sep"]:.1f}x', f'{both["sep"] * 1e3:.2f}',
                     f'{both["2d"] * 1e3:.2f}', f'{both["2d"] / both["sep"]:.1f}x',
                     f'{naive * 1e3:.0f}' if naive == naive else '-'])
    results['filter'] = out
    table('2. Range filter (Eq. 11), median ms; naive = double loop of Eq. 7',
          ['input (N, r, H, W)', 'sep fwd', '2-D fwd', '2-D / sep', 'sep fwd+bwd',
           '2-D fwd+bwd', '2-D / sep', 'naive fwd'], rows)


# ---------------------------------------------------------------------- 3. merge
def bench_merge(args, results: dict) -> None:
    from colora_mm.adapters import merge_adapters, reset_adapters_from_weights
    models = registry()
    dev = args.device
    size = args.merge_size
    cases = [
        ('ResNet-50, use_filter=False', dict(type='CoLoRAResNet', depth=50),
         dict(use_filter=False)),
        ('ResNet-50, filter on', dict(type='CoLoRAResNet', depth=50), dict()),
        ('ConvNeXt-T, filter on', dict(type='CoLoRAConvNeXt', arch='tiny',
                                       out_indices=(0, 1, 2, 3)), dict()),
    ]
    x = torch.randn(args.merge_batch, 3, size, size, device=dev)
    rows, out = [], []
    plain_cache = {}
    for name, cfg, extra in cases:
        torch.manual_seed(0)
        adapted = models.build(dict(cfg, adapter=dict(method='colora', **extra)))
        reset_adapters_from_weights(adapted)
        with torch.no_grad():                   # a trained-looking, non-zero update
            for pname, p in adapted.named_parameters():
                if 'adapter_' in pname:
                    p.normal_(0, 0.02)
        adapted.to(dev).eval()
        key = cfg['type'] + str(cfg.get('arch', cfg.get('depth')))
        if key not in plain_cache:
            torch.manual_seed(0)
            plain = models.build(dict(cfg, adapter=dict(method='full')))
            plain.to(dev).eval()
            plain_cache[key] = plain
        plain = plain_cache[key]
        merged = copy.deepcopy(adapted)
        unfolded = merge_adapters(merged)
        with torch.no_grad():
            diff = max((a - b).abs().max().item()
                       for a, b in zip(adapted(x), merged(x)))
            ctx = torch.autocast(dev, dtype=torch.float16) if args.amp \
                else contextlib.nullcontext()
            with ctx:
                t = interleaved({'plain': lambda: plain(x), 'merged': lambda: merged(x),
                                 'unmerged': lambda: adapted(x)}, dev,
                                args.repeats * 2)
        out.append(dict(case=name, times=t, unfolded=len(unfolded), max_abs_diff=diff))
        rows.append([name, str(len(unfolded)), f'{t["plain"] * 1e3:.1f}',
                     f'{t["merged"] * 1e3:.1f}', f'{t["merged"] / t["plain"]:.3f}',
                     f'{t["unmerged"] / t["plain"]:.3f}', f'{diff:.1e}'])
    results['merge'] = out
    table(f'3. Inference, backbone only, batch {args.merge_batch} x {size}x{size}, '
          'median ms (plain / merged / unmerged run in turn)',
          ['model', 'layers left unfolded', 'plain', 'merged', 'merged / plain',
           'unmerged / plain', 'max |merged - unmerged|'], rows)


# ---------------------------------------------------------------------- 4. deltas
def bench_deltas(args, results: dict) -> None:
    from colora_mm.adapters import iter_adapted_layers, reset_adapters_from_weights
    models = registry()
    dev = args.device
    rows, out = [], {}
    for method in ('lora', 'hira', 'colora'):
        torch.manual_seed(0)
        backbone = models.build(dict(type='CoLoRAConvNeXt', arch=args.arch,
                                     adapter=dict(method=method)))
        reset_adapters_from_weights(backbone)
        with torch.no_grad():                   # trained-looking adapters, B != 0
            for pname, p in backbone.named_parameters():
                if 'adapter_' in pname:
                    p.normal_(0, 0.02)
        backbone.to(dev).train()
        layers = [layer for _, layer in iter_adapted_layers(backbone)]

        def deltas():
            total = 0
            for layer in layers:
                d = layer.adapter_branch.delta_weight(layer)
                if d is not None:
                    total = total + d.sum()
            total.backward()
        t = timeit(deltas, dev, args.repeats)
        out[method] = t
        step = results.get('train_step_s', {}).get(method)
        rows.append([method, f'{t * 1e3:.2f}',
                     f'{100 * t / step:.1f}%' if step else '-'])
        if method == 'colora':
            pairs = [layer.adapter_branch.get_pair() for layer in layers
                     if getattr(layer.adapter_branch, 'index', None) == 0]
            check_fused(pairs)
            t = timeit(lambda: sum(sum(d.sum() for d in fused_pair_deltas(p))
                                   for p in pairs).backward(), dev, args.repeats)
            out['colora-fused-sketch'] = t
            rows.append(['colora-fused-sketch', f'{t * 1e3:.2f}', '-'])
    results['deltas_s'] = out
    rows = [r + [f'{out[r[0]] / out["lora"]:.2f}'] for r in rows]
    table(f'4. Forming every weight update of CoLoRAConvNeXt-{args.arch} once '
          '(delta_weight forward + backward), median ms',
          ['method', 'ms per step', 'share of the training step', 'vs LoRA'], rows)


def fused_pair_deltas(pair) -> tuple:
    """Eqs. 14-15 regrouped (a sketch for this benchmark, checked against the
    implementation by :func:`check_fused`): each delta is one GEMM of inner width
    ``r``, ``[s1 A1 | s As] @ [B1 ; Bs W2^T]``, so the scalings multiply the thin
    factors and no full-size product or sum is formed or saved for backward."""
    A1, B1, A2, B2 = pair.A1, pair.B1, pair.A2, pair.B2
    As, Bs = pair.As, pair.Bs
    rl, rs = pair.rl, pair.rs
    norm = (rs * pair.n) ** 0.25
    C1 = Bs @ pair.partner_w2.t()                       # rs x d'
    C2 = pair.partner_w1.t() @ As                       # d' x rs
    s1 = 1.0 / (math.sqrt(rl) * (A1.std() + B1.std()))
    s2 = 1.0 / (math.sqrt(rl) * (A2.std() + B2.std()))
    t1 = 1.0 / (norm * (C1.std() + As.std()))
    t2 = 1.0 / (norm * (C2.std() + Bs.std()))
    d1 = torch.cat([A1 * s1, As * t1], 1) @ torch.cat([B1, C1], 0)
    d2 = torch.cat([A2 * s2, C2 * t2], 1) @ torch.cat([B2, Bs], 0)
    return d1, d2


@torch.no_grad()
def check_fused(pairs) -> None:
    for pair in pairs[:3]:
        d1, d2 = fused_pair_deltas(pair)
        for ours, ref in ((d1, pair.delta(0)), (d2, pair.delta(1))):
            err = (ours - ref).abs().max().item()
            if err > 1e-5 * max(1.0, ref.abs().max().item()):
                raise AssertionError(f'fused sketch differs from CoLoRAPair.delta by {err}')


# ---------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--amp', action='store_true',
                        help='fp16 autocast (AmpOptimWrapper); for --device cuda')
    parser.add_argument('--only', nargs='+', default=['train', 'filter', 'merge', 'deltas'],
                        choices=['train', 'filter', 'merge', 'deltas'])
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--threads', type=int, default=None)
    parser.add_argument('--arch', default='tiny', help='ConvNeXt arch of tables 1 and 4')
    parser.add_argument('--size', type=int, default=256, help='training crop (table 1)')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--head-channels', type=int, default=128,
                        help='UperNet channels (upstream: 512)')
    parser.add_argument('--memory-steps', type=int, default=2)
    parser.add_argument('--methods', nargs='+', default=list(METHODS),
                        help='adapter methods of table 1, any of '
                        'colora_mm.adapters.METHODS (default: %(default)s)')
    parser.add_argument('--no-breakdown', action='store_true',
                        help='table 1 without the colora-nofilter / colora-pairs rows')
    parser.add_argument('--merge-size', type=int, default=224)
    parser.add_argument('--merge-batch', type=int, default=2)
    parser.add_argument('--profile', nargs='*', default=[],
                        help='also print a torch.profiler table of one training step '
                             'for these methods (e.g. lora colora)')
    parser.add_argument('--profile-rows', type=int, default=15)
    parser.add_argument('--json', default=None, help='also write the numbers here')
    parser.add_argument('--memory-worker', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.amp and args.device != 'cuda':
        parser.error('--amp needs --device cuda (mmengine AMP on CPU is not supported).')
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device visible.')
    if args.memory_worker:
        memory_worker(args.memory_worker, args)
        return {}

    print(f'device: {args.device} ({machine(args.device)}); torch {torch.__version__}; '
          f'repeats {args.repeats}')
    print('command: python ' + ' '.join([os.path.relpath(__file__)] + sys.argv[1:]))
    results: dict = dict(machine=machine(args.device), args=vars(args))
    for name in ('train', 'filter', 'merge', 'deltas'):
        if name in args.only:
            dict(train=bench_train, filter=bench_filter, merge=bench_merge,
                 deltas=bench_deltas)[name](args, results)
            sys.stdout.flush()
    if args.profile:
        bench_profile(args, results)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1, default=str)
    return results


if __name__ == '__main__':
    main()
