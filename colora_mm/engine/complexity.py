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

from collections import OrderedDict
from typing import Dict, Sequence

import torch
import torch.nn as nn

from colora_mm.adapters import (AdaptedLayer, CoLoRAPairLayer, HiRA, LoRA,
                                RangeKernelFilter, is_adapter_name, iter_adapted_layers,
                                norm_parameter_names)

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

