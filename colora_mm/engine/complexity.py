"""Parameter and compute accounting for adapted models (appendix Table 1 of the paper).

FLOPs here are multiply-accumulates, the unit of the paper's Table 1 (a ``d -> d'``
pointwise layer on ``hw`` pixels costs ``hw d d'``). Two kinds of adapter overhead:

* weight updates (CoLoRA pairs, LoRA, PiSSA, HiRA): computed once per training step,
  independent of batch and resolution; Table 1's "FLOPs (train)" minus "FLOPs
  (inference)". For a pair ``W1 (d x d')``, ``W2 (d' x d'')`` of rank ``r = rl + rs``:

      CoLoRA        (r + rs + 2) d' (d + d'')
      LoRA, PiSSA   (r + 1) d' (d + d'')        i.e. (r + 1) d_in d_out per layer
      HiRA          (r + 2) d' (d + d'')        i.e. (r + 2) d_in d_out per layer

  (``rs d'(d + d'')`` is what CoLoRA's shared part adds over HiRA, appendix D); these
  fold away at inference.
* parallel branches (CoLoRA's spatial branch, Conv-Adapter): per image, counted from the
  shapes their convolutions and the range filter see in one forward pass. The filter
  is counted as appendix D states its cost, whatever kernels evaluate it: four
  Gaussian blurs of the ``r`` compressed channels, ``2k`` taps a pixel separable
  (``k^2`` otherwise), i.e. ``4 r hw 2k`` (``O(hw k^2 r)``).
"""
from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from colora_mm.adapters import (AdaptedLayer, CoLoRAPairLayer, ConvAdapter, HiRA, LoRA,
                                RangeKernelFilter, SpatialLowRankBranch, is_adapter_name,
                                iter_adapted_layers, norm_parameter_names)
from colora_mm.adapters.overrides import stage_of

PARTS = ('backbone adapters', 'backbone biases/norms', 'backbone other', 'neck', 'heads')


def parameter_parts(model: nn.Module) -> 'OrderedDict[str, Dict[str, int]]':
    """Trainable and total parameter counts per part of a segmentor/detector."""
    out = OrderedDict((p, dict(trainable=0, total=0)) for p in PARTS)
    norms = norm_parameter_names(model)
    for name, param in model.named_parameters():
        if name.startswith('backbone.'):
            if is_adapter_name(name):
                part = 'backbone adapters'
            elif name.endswith('.bias') or name in norms:
                part = 'backbone biases/norms'
            else:
                part = 'backbone other'
        elif name.startswith('neck.'):
            part = 'neck'
        else:
            part = 'heads'
        out[part]['total'] += param.numel()
        if param.requires_grad:
            out[part]['trainable'] += param.numel()
    return out


def describe_adapter(layer: AdaptedLayer) -> str:
    """The adapter's kind and rank, e.g. ``'pair g8 r=6 (rs=4, rl=2)'``, ``'lora r=4'``,
    ``'spatial r=6 +filter'``; '' for the second layer of a CoLoRA pair (described on
    its first layer)."""
    a = layer.adapter_branch
    if isinstance(a, CoLoRAPairLayer):
        if a.index:
            return ''
        p = a.get_pair()
        return f'pair g{p.gamma} r={p.r} (rs={p.rs}, rl={p.rl})'
    if isinstance(a, (LoRA, HiRA)):
        return f'{a.method} r={a.rank}'
    if isinstance(a, SpatialLowRankBranch):
        return f'spatial r={a.rank}' + (' +filter' if a.filter is not None else '')
    if isinstance(a, ConvAdapter):
        return f'conv_adapter w={a.width}'
    return type(a).__name__


def stage_summary(backbone: nn.Module) -> List[Dict]:
    """Per stage (:func:`colora_mm.adapters.overrides.stage_of`: ``stages.3``,
    ``layer4``...): its Linear/conv layers, how many carry an adapter, the adapters'
    kinds and ranks, and their parameter count. Stages whose layers carry no adapter
    (``method='none'`` overrides) are listed too, with zeros."""
    adapted = list(iter_adapted_layers(backbone))
    families = {stage_of(n).rstrip('0123456789') for n, _ in adapted}
    rows: 'OrderedDict[str, Dict]' = OrderedDict()
    for name, module in backbone.named_modules():
        if not name or is_adapter_name(name) or not isinstance(
                module, (nn.Linear, nn.Conv2d, AdaptedLayer)):
            continue
        stage = stage_of(name)
        if stage.rstrip('0123456789') not in families:
            continue
        row = rows.setdefault(stage, dict(stage=stage, layers=0, adapted=0,
                                          adapters=Counter(), params=0))
        row['layers'] += 1
        if isinstance(module, AdaptedLayer):
            row['adapted'] += 1
            row['params'] += sum(p.numel() for p in module.adapter_branch.parameters())
            kind = describe_adapter(module)
            if kind:
                row['adapters'][kind] += 1
    return [dict(row, adapters=dict(row['adapters'])) for row in rows.values()]


def format_stage_table(rows: Sequence[Dict]) -> str:
    """:func:`stage_summary` as a fixed-width table."""
    table = [('stage', 'adapted', 'adapters (count x kind, rank)', 'adapter params')]
    for row in rows:
        kinds = ', '.join(f'{n}x {k}' for k, n in row['adapters'].items()) or 'none'
        table.append((row['stage'], f"{row['adapted']}/{row['layers']}", kinds,
                      f"{row['params']:,}"))
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    lines = ['  '.join(c.rjust(w) if i in (1, 3) else c.ljust(w)
                       for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in table]
    lines.insert(1, '-' * max(len(line) for line in lines))
    return '\n'.join(lines)


def weight_update_flops(layer: AdaptedLayer) -> int:
    """Per-step cost of forming this layer's weight update (Table 1); 0 for branches.
    A CoLoRA pair is counted once, on its first layer."""
    adapter = layer.adapter_branch
    if isinstance(adapter, CoLoRAPairLayer):
        if adapter.index != 0:
            return 0
        p = adapter.get_pair()
        return (p.r + p.rs + 2) * p.d_mid * (p.d + p.d_out)
    d_in, d_out = layer.in_channels, layer.out_channels
    if isinstance(adapter, HiRA):
        return (adapter.rank + 2) * d_in * d_out
    if isinstance(adapter, LoRA):       # PiSSA included
        return (adapter.rank + 1) * d_in * d_out
    return 0


#: The total stride (input side / last stage side) of the backbones colora_mm adapts:
#: ConvNeXt (a /4 stem, three /2 downsamplings), ResNet and Swin.
DEFAULT_TOTAL_STRIDE = 32


def total_stride(backbone) -> int:
    """The total downsampling factor of a backbone, given as a built module or as its
    config dict: ``4 * 2 ** (stages - 1)`` for ConvNeXt (its arch's number of stages),
    :data:`DEFAULT_TOTAL_STRIDE` otherwise. An input side below it leaves the last
    stage without a pixel (ConvNeXt's unpadded stem and downsampling convolutions fail
    on it)."""
    if isinstance(backbone, nn.Module):
        if any('ConvNeXt' in c.__name__ for c in type(backbone).__mro__):
            stages = len(getattr(backbone, 'stages', ())) or 4
            return 4 * 2 ** (stages - 1)
        return DEFAULT_TOTAL_STRIDE
    if isinstance(backbone, dict) and 'ConvNeXt' in str(backbone.get('type', '')):
        arch = backbone.get('arch')
        depths = arch.get('depths') if isinstance(arch, dict) else None
        stages = len(depths) if isinstance(depths, (list, tuple)) and depths else 4
        return 4 * 2 ** (stages - 1)
    return DEFAULT_TOTAL_STRIDE


def check_input_size(size, minimum: int = DEFAULT_TOTAL_STRIDE) -> Tuple[int, int]:
    """``(H, W)`` of an image size given as an int (a square side) or a pair of ints,
    each side at least ``minimum`` (the backbone's :func:`total_stride`).

    Raises:
        ValueError: saying what is wrong with ``size``; the caller names itself and the
            setting.
    """
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if is_int(size):
        sides = (size, size)
    elif (isinstance(size, (list, tuple)) and len(size) == 2
          and all(is_int(v) for v in size)):
        sides = tuple(size)
    else:
        raise ValueError(f'{size!r} is not an image size: give an int (a square side) '
                         'or a pair (H, W) of ints')
    if min(sides) < minimum:
        raise ValueError(f'{size!r}: each side must be at least {minimum}, the '
                         "backbone's total stride (a smaller image leaves its last "
                         'stage without a pixel)')
    return sides


def _pixels(t: torch.Tensor, channels_last: bool) -> int:
    """Spatial positions per sample of a (N, C, H, W) or (N, ..., C) tensor."""
    if channels_last:
        return t.numel() // (t.shape[0] * t.shape[-1])
    return t.numel() // (t.shape[0] * t.shape[1])


@torch.no_grad()
def measure_flops(backbone: nn.Module, input_size: Sequence[int] = (512, 512),
                  in_channels: int = 3) -> Dict[str, float]:
    """Backbone and adapter cost for one ``in_channels x H x W`` image.

    Runs one forward pass in eval mode (no partner update, no BatchNorm statistics
    change) and restores every module's train/eval flag afterwards.

    Returns:
        dict: ``backbone`` (base layers, per image), ``branches`` (parallel adapter
        branches, per image), ``weight_updates`` (per training step), ``per_layer``
        (name -> its adapter's cost: weight update + branch).
    """
    modes = {m: m.training for m in backbone.modules()}
    adapter_modules = {m for name, m in backbone.named_modules() if is_adapter_name(name)}
    costs = dict(backbone=0, branches=0, weight_updates=0)
    per_layer: Dict[str, int] = {}
    owner: Dict[nn.Module, str] = {}
    for name, layer in iter_adapted_layers(backbone):
        for m in layer.adapter_branch.modules():
            owner[m] = name
        per_layer[name] = weight_update_flops(layer)
        costs['weight_updates'] += per_layer[name]

    def base_hook(module, inputs, output):
        weight = module.weight
        if isinstance(module, nn.Linear) or (isinstance(module, AdaptedLayer)
                                             and not module.is_conv):
            flops = _pixels(output, channels_last=True) * weight.numel()
        else:
            flops = output.shape[-2] * output.shape[-1] * weight.numel()
        costs['backbone'] += flops

    def branch_conv_hook(module, inputs, output):
        flops = output.shape[-2] * output.shape[-1] * module.weight.numel()
        costs['branches'] += flops
        per_layer[owner[module]] += flops

    def filter_hook(module, inputs, output):
        z = inputs[0]
        taps = 2 * module.window if module.separable else module.window ** 2
        flops = 4 * z.shape[1] * z.shape[-2] * z.shape[-1] * taps
        costs['branches'] += flops
        per_layer[owner[module]] += flops

    handles = []
    for m in backbone.modules():
        if m in adapter_modules:
            if isinstance(m, nn.Conv2d):
                handles.append(m.register_forward_hook(branch_conv_hook))
            elif isinstance(m, RangeKernelFilter):
                handles.append(m.register_forward_hook(filter_hook))
        elif isinstance(m, (nn.Conv2d, nn.Linear, AdaptedLayer)):
            handles.append(m.register_forward_hook(base_hook))
    param = next(backbone.parameters())
    try:
        backbone.eval()
        backbone(torch.zeros(1, in_channels, *input_size, device=param.device,
                             dtype=param.dtype))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return dict(costs, per_layer=per_layer)

