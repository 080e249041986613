"""Trainable parameters and FLOPs of CoLoRA and the baselines, from the paper's
appendix Table 1 formulas and counted on the built backbone, side by side.

    python tools/analysis/param_flops.py                       # the paper's grid:
        # ResNet-50, ConvNeXt-S, ConvNeXt-B x CoLoRA, LoRA, PiSSA, HiRA, Conv-Adapter,
        # full, plus the Table 8 ConvNeXt-B sweep
    python tools/analysis/param_flops.py --backbone convnext_s --method colora lora
    python tools/analysis/param_flops.py --backbone convnext_b --method colora \\
        --gamma 8 --share-ratio 0.8
    python tools/analysis/param_flops.py --method colora --spatial-gamma gamma
    python tools/analysis/param_flops.py configs/ade20k/upernet_hira_r50_*.py
    python tools/analysis/param_flops.py --params-only configs/ade20k/*colora*convnext*.py
    python tools/analysis/param_flops.py --per-stage configs/ade20k/upernet_colora-*per-stage*.py

CoLoRA's spatial branch has its own rank divisor (``AdapterSpec.spatial_gamma``, rank
``C // spatial_gamma``). The built-in grid uses what the paper-reproduction configs set:
``spatial_gamma = 2 * gamma`` on ConvNeXt (the rank that reproduces the paper's
ConvNeXt #Param figures, Tables 5-8) and the spec's default (``gamma``) on ResNet-50.
``--spatial-gamma`` changes it: an integer, ``gamma`` (the spec's default everywhere)
or ``paper`` (the default). A config is analysed with its own adapter dict as is.

Columns (FLOPs are multiply-accumulates, Table 1's unit; G = 1e9, M = 1e6):

* ``adapters``: adapter parameters, counted on the model (the adapters' own
  ``num_trainable()``, checked against the parameters' ``numel``) and from the closed
  form (Table 1 for the pointwise layers; the branches' shapes, as
  ``colora_mm/adapters/spatial.py`` and ``conv_adapter.py`` build them, for the spatial
  branches and Conv-Adapter, which Table 1 does not list);
* ``trainable``: what the optimiser updates in the backbone (adapters + every bias +
  every norm for PEFT, everything for ``full``) and its share of the backbone;
* ``paper``: the appendix's #Param (Tables 5-7 for ResNet-50/ConvNeXt-S on VTAB,
  Table 8 for the ConvNeXt-B sweep) and ``trainable / paper - 1``;
* ``dW``: the cost of forming every weight update once, i.e. each adapter's
  ``delta_weight`` and ``W + dW``: what a training step pays for a layer on the weight
  path (``x (W + dW)``) and what ``merge_adapters`` bakes. Formula = Table 1's "FLOPs
  (train)" minus "FLOPs (inference)" (``(r+1) d'(d+d'')`` LoRA/PiSSA, ``(r+2)`` HiRA,
  ``(r+rs+2)`` CoLoRA); counted = the matmuls + element-wise ops that run. A layer
  trained on the activation path (``base(x) + (x L) R``, chosen per layer by
  :mod:`colora_mm.adapters.paths`) forms no ``dW`` in a training step; this column does
  not price that path;
* ``branch/img``: parallel branches (CoLoRA's spatial branch with its range filter,
  Conv-Adapter) per image, closed form vs counted (the unmerged forward, run with every
  low-rank layer on the weight path, minus the plain backbone minus ``dW``);
* ``infer/img``: the backbone after ``merge_adapters`` (what folds is folded), counted,
  and its ratio to the plain backbone; the formula is the plain backbone plus the
  branches that do not fold (Table 1: pointwise updates cost nothing at inference).

With ``--per-stage`` (always for a config whose adapter has per-layer ``overrides``),
each variant is followed by a table per backbone stage: adapted layers, the adapters'
kinds and ranks, and their parameter count.

Counting runs the model once per variant on fake tensors (shapes only), so ConvNeXt-B
at 512x512 takes seconds; ``--params-only`` skips the FLOPs. A config whose ConvNeXt
has its own ``arch`` dict (the demo's) is reported as ``convnext_custom``. A missing
config or an ``--input-size`` side below the backbone's total stride (32) ends the run
with one ``error:`` line, exit status 2. Nothing here re-derives an adapter from key
strings: the adapters are found as :class:`AdaptedLayer` objects and asked through
their contract.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os.path as osp
import sys
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

from colora_mm.adapters import (AdaptedLayer, AdapterSpec, ConvAdapter, CoLoRAPairLayer,
                                HiRA, LoRA, SpatialLowRankBranch, is_adapter_name,
                                iter_adapted_layers, merge_adapters, trainable_report)
from colora_mm.engine.complexity import (DEFAULT_TOTAL_STRIDE, format_stage_table,
                                         stage_summary, total_stride,
                                         weight_update_flops)

BACKBONES = {
    'resnet50': dict(type='CoLoRAResNet', depth=50, deep_stem=False),
    'convnext_s': dict(type='CoLoRAConvNeXt', arch='small', out_indices=(0, 1, 2, 3)),
    'convnext_b': dict(type='CoLoRAConvNeXt', arch='base', out_indices=(0, 1, 2, 3)),
    'swin_t': dict(type='CoLoRASwin', embed_dims=96, depths=(2, 2, 6, 2),
                   num_heads=(3, 6, 12, 24), window_size=7),
}
BASELINES = ('colora', 'lora', 'pissa', 'hira', 'conv_adapter', 'full')


class CLIError(ValueError):
    """A user error: the command line prints it as one ``error:`` line and exits with
    status 2 (a ValueError for the functions' other callers)."""


#: The appendix's #Param (millions), keyed by (backbone, method, gamma, share_ratio);
#: gamma None = the method's default. Tables 5-7 (VTAB-1k) and Table 8 (ADE20K).
PAPER_PARAMS = {
    ('resnet50', 'full', None, None): 23.5,
    ('resnet50', 'conv_adapter', None, None): 1.4,
    ('resnet50', 'pissa', None, None): 1.2,
    ('resnet50', 'hira', None, None): 1.2,
    ('resnet50', 'colora', 16, 0.5): 1.0,
    ('convnext_s', 'full', None, None): 49.5,
    ('convnext_s', 'conv_adapter', None, None): 2.8,
    ('convnext_s', 'pissa', None, None): 3.0,
    ('convnext_s', 'hira', None, None): 3.0,
    ('convnext_s', 'colora', 16, 0.5): 2.6,
    ('convnext_b', 'full', None, None): 87.6,
    ('convnext_b', 'colora', 16, 0.5): 4.6,
    ('convnext_b', 'colora', 8, 0.8): 5.7,
    ('convnext_b', 'colora', 8, 0.5): 8.8,
    ('convnext_b', 'colora', 4, 0.8): 11.1,
    ('convnext_b', 'colora', 4, 0.5): 17.3,
    ('convnext_b', 'colora', 4, 0.4): 19.5,
    ('convnext_b', 'colora', 2, 0.9): 17.7,
    ('convnext_b', 'colora', 2, 0.8): 21.9,
}
TABLE8_SWEEP = ((16, 0.5), (8, 0.8), (8, 0.5), (4, 0.8), (4, 0.5), (4, 0.4), (2, 0.9),
                (2, 0.8))

#: CoLoRA's spatial rank divisor in units of gamma, by backbone, as the paper's counts
#: imply and the paper-reproduction configs set: ConvNeXt ``spatial_gamma = 2 gamma``
#: (rank ``C // (2 gamma)``). Backbones not listed (ResNet-50) keep the spec's default
#: (``gamma``): no spatial rank alone reproduces the paper's ResNet-50 figure.
PAPER_SPATIAL_FACTOR = {'convnext_s': 2, 'convnext_b': 2}

SpatialChoice = Union[int, str, None]


def spatial_gamma_for(kind: str, gamma: int, choice: SpatialChoice = 'paper'
                      ) -> Optional[int]:
    """The ``spatial_gamma`` of a CoLoRA row: ``'paper'`` (or None) the paper's rule for
    the backbone (:data:`PAPER_SPATIAL_FACTOR`; None = the spec's default), ``'gamma'``
    None (the spec's default, ``gamma``), an integer itself."""
    if choice is None or choice == 'paper':
        factor = PAPER_SPATIAL_FACTOR.get(kind)
        return None if factor is None else factor * gamma
    if choice == 'gamma':
        return None
    if isinstance(choice, bool) or not isinstance(choice, int) or choice <= 0:
        raise ValueError(f'spatial_gamma: {choice!r}; expected a positive integer, '
                         "'gamma' or 'paper'.")
    return choice


def paper_params(backbone: str, adapter: dict) -> Optional[float]:
    method = adapter.get('method', 'full')
    if method == 'colora':
        key = (backbone, method, adapter.get('gamma') or 16, adapter.get('share_ratio', 0.5))
    elif adapter.get('gamma') is None:
        key = (backbone, method, None, None)
    else:
        from colora_mm.adapters import DEFAULT_GAMMA
        default = DEFAULT_GAMMA.get(method)
        key = (backbone, method, None, None) if adapter['gamma'] == default else None
    return PAPER_PARAMS.get(key) if key else None


# ---------------------------------------------------------------------- counting
_ELEMENTWISE = {getattr(torch.ops.aten, n) for n in
                ('add', 'add_', 'sub', 'sub_', 'mul', 'mul_', 'div', 'div_')}


class OpCounter(TorchDispatchMode):
    """Multiply-accumulates of matmuls and convolutions (PyTorch's FLOP formulas / 2)
    and the number of element-wise add/sub/mul/div results, for every op that runs."""

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0
        self.elementwise = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in flop_counter.flop_registry:
            self.macs += flop_counter.flop_registry[packet](*args, **kwargs,
                                                            out_val=out) // 2
        elif packet in _ELEMENTWISE and isinstance(out, torch.Tensor):
            self.elementwise += out.numel()
        return out


@contextlib.contextmanager
def weight_path(model: nn.Module):
    """Every adapted layer applies its low-rank update through the weight,
    ``x (W + dW)``, for the duration: a forward pass then costs the plain backbone +
    forming every ``dW`` + the parallel branches."""
    layers = [layer for _, layer in iter_adapted_layers(model)]
    saved = [getattr(layer, 'train_path', None) for layer in layers]
    for layer in layers:
        layer.train_path = 'weight'
    try:
        yield
    finally:
        for layer, path in zip(layers, saved):
            layer.train_path = path


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode
    return FakeTensorMode(allow_non_fake_inputs=True)


@torch.no_grad()
def count_forward(model: nn.Module, input_size: Sequence[int],
                  shapes: Optional[Dict[str, Tuple]] = None) -> int:
    """MACs of one eval-mode forward pass on a ``1 x 3 x H x W`` image (fake tensors).
    ``shapes``, if given, receives ``name -> (H_in, W_in, H_out, W_out)`` of every
    adapted layer."""
    handles = []
    if shapes is not None:
        for name, layer in iter_adapted_layers(model):
            def hook(module, inputs, output, name=name):
                x = inputs[0]
                if module.is_conv:
                    shapes[name] = (x.shape[-2], x.shape[-1], output.shape[-2],
                                    output.shape[-1])
                else:   # channels-last Linear: pixels = numel / (N * C)
                    hw = x.numel() // (x.shape[0] * x.shape[-1])
                    shapes[name] = (hw, 1, hw, 1)
            handles.append(layer.register_forward_hook(hook))
    modes = {m: m.training for m in model.modules()}
    model.train(False)
    counter = OpCounter()
    try:
        with counter, _fake_mode():
            model(torch.zeros(1, 3, *input_size))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return counter.macs


@torch.no_grad()
def count_weight_updates(model: nn.Module) -> Tuple[int, int]:
    """``(matmul MACs, element-wise ops)`` of forming every weight update once, as a
    training step does: each adapter's ``delta_weight`` and the ``W + dW`` add."""
    counter = OpCounter()
    with counter, _fake_mode():
        for _, layer in iter_adapted_layers(model):
            delta = layer.adapter_branch.delta_weight(layer)
            if delta is not None:
                layer.weight + delta.to(layer.weight.dtype)
    return counter.macs, counter.elementwise


# ---------------------------------------------------------------------- formulas
def formula_update_flops(layer: AdaptedLayer) -> int:
    """Table 1's per-step weight-update cost; a CoLoRA pair is counted on its first
    layer (``(r + rs + 2) d'(d + d'')``), LoRA/PiSSA ``(r + 1)`` and HiRA ``(r + 2)``
    times ``d_in d_out`` per layer: the same figure the report hook prints."""
    return weight_update_flops(layer)


def formula_params(layer: AdaptedLayer) -> int:
    """Closed-form adapter parameters: Table 1 for pointwise layers (a pair's
    ``r(d + d'') + 2 rl d'`` on its first layer; ``r(d_in + d_out)`` per LoRA/PiSSA/HiRA
    layer, i.e. ``r(d + 2d' + d'')`` per pair), the branches' shapes for the rest."""
    adapter = layer.adapter_branch
    c_in, c_out = layer.in_channels, layer.out_channels
    if isinstance(adapter, CoLoRAPairLayer):
        if adapter.index:
            return 0
        p = adapter.get_pair()
        return p.r * (p.d + p.d_out) + 2 * p.rl * p.d_mid
    if isinstance(adapter, (LoRA, HiRA)):
        return adapter.rank * (c_in + c_out)
    if isinstance(adapter, SpatialLowRankBranch):
        r = adapter.rank
        # A: 1x1 C_in -> r; B: 3x3 r -> C with groups r (9 C) or 1x1 r -> C_out.
        return c_in * r + (9 * c_out if adapter.style == 'depthwise' else r * c_out)
    if isinstance(adapter, ConvAdapter):
        kh, kw = layer.kernel_size
        # down: k x k, C_in -> w, groups w (C_in k^2); up: 1x1 w -> C_out; alpha: C_out.
        return c_in * kh * kw + adapter.width * c_out + c_out
    raise TypeError(f'{layer.describe()}: no closed form for {type(adapter).__name__}.')


def formula_branch_flops(layer: AdaptedLayer, shape: Tuple[int, int, int, int]) -> int:
    """Per-image MACs of a parallel branch from its shapes; 0 for weight updates. The
    range filter is four depthwise Gaussian passes over the r compressed channels:
    ``4 r hw 2k`` separable (``4 r hw k^2`` on the 2-D path), appendix D."""
    adapter = layer.adapter_branch
    h_in, w_in, h_out, w_out = shape
    hw_in, hw_out = h_in * w_in, h_out * w_out
    c_in, c_out = layer.in_channels, layer.out_channels
    if isinstance(adapter, SpatialLowRankBranch):
        r = adapter.rank
        flops = hw_in * c_in * r
        if adapter.filter is not None:
            k = adapter.filter.window
            flops += 4 * r * hw_in * (2 * k if adapter.filter.separable else k * k)
        flops += hw_out * (9 * c_out if adapter.style == 'depthwise' else r * c_out)
        return flops
    if isinstance(adapter, ConvAdapter):
        kh, kw = layer.kernel_size
        return hw_out * (c_in * kh * kw + adapter.width * c_out)
    return 0


# ---------------------------------------------------------------------- one row
@dataclass
class Row:
    name: str
    backbone: str
    method: str
    gamma: Optional[int]
    share_ratio: Optional[float]
    #: CoLoRA's spatial rank divisor in effect (``spatial_gamma``, else gamma)
    spatial_gamma: Optional[int] = None
    backbone_params: int = 0
    adapters: int = 0
    adapters_formula: int = 0
    trainable: int = 0
    trainable_other: int = 0
    paper_m: Optional[float] = None
    update_formula: int = 0
    update_counted: int = 0
    update_counted_matmul: int = 0
    branch_formula: int = 0
    branch_counted: int = 0
    infer_plain: int = 0
    infer_formula: int = 0
    infer_merged: int = 0
    unfolded: List[str] = field(default_factory=list)
    #: adapted layer -> (H_in, W_in, H_out, W_out) at the analysed input size
    layer_shapes: Dict[str, Tuple] = field(default_factory=dict)
    #: per backbone stage: adapted layers, adapter kinds and ranks, parameters
    stages: List[Dict] = field(default_factory=list)
    #: the adapter has per-layer overrides
    overrides: bool = False

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.backbone_params

    @property
    def paper_diff(self) -> Optional[float]:
        if self.paper_m is None:
            return None
        return 100.0 * (self.trainable / (self.paper_m * 1e6) - 1.0)


def analyse(backbone: nn.Module, name: str, backbone_kind: str, adapter: dict,
            input_size: Sequence[int] = (512, 512), plain_macs: Optional[int] = None,
            flops: bool = True) -> Row:
    """Counts and formulas for one built backbone (no pretrained weights needed);
    ``flops=False``: the parameter columns only."""
    method = adapter.get('method', 'full')
    row = Row(name, backbone_kind, method, adapter.get('gamma'), adapter.get('share_ratio')
              if method == 'colora' else None)
    if method == 'colora':
        row.spatial_gamma = AdapterSpec.from_dict(adapter).spatial_rank_divisor
    report = trainable_report(backbone)
    row.backbone_params = report['base']
    row.trainable, row.trainable_other = report['trainable'], report['trainable_other']
    row.overrides = bool(adapter.get('overrides'))
    # A per-layer setting is not one of the paper's variants.
    row.paper_m = (paper_params(backbone_kind, adapter) if backbone_kind
                   and not row.overrides else None)
    row.stages = stage_summary(backbone)

    layers = list(iter_adapted_layers(backbone))
    for lname, layer in layers:
        own = layer.adapter_branch
        counted = (own.get_pair().num_trainable() if isinstance(own, CoLoRAPairLayer)
                   and own.index == 0 else 0 if isinstance(own, CoLoRAPairLayer)
                   else own.num_trainable())
        row.adapters += counted
        row.adapters_formula += formula_params(layer)
    numel = sum(p.numel() for n, p in backbone.named_parameters() if is_adapter_name(n))
    if numel != row.adapters:
        raise RuntimeError(f'{name}: adapters report {row.adapters} trainable parameters '
                           f'through num_trainable() but hold {numel}.')
    if not flops:
        return row

    shapes = row.layer_shapes
    with weight_path(backbone):
        unmerged = count_forward(backbone, input_size, shapes)
    upd_macs, upd_elem = count_weight_updates(backbone)
    row.update_counted_matmul = upd_macs
    row.update_counted = upd_macs + upd_elem
    row.update_formula = sum(formula_update_flops(layer) for _, layer in layers)
    row.branch_formula = sum(formula_branch_flops(layer, shapes[n]) for n, layer in layers)

    merged = copy.deepcopy(backbone)
    row.unfolded = merge_adapters(merged)
    row.infer_merged = count_forward(merged, input_size)
    del merged
    if plain_macs is None:
        plain = copy.deepcopy(backbone)
        for lname, layer in layers:       # the same network without any adapter
            parent, _, child = lname.rpartition('.')
            base = (nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                              layer.stride, layer.padding, layer.dilation, layer.groups,
                              bias=layer.bias is not None, device='meta')
                    if layer.is_conv else
                    nn.Linear(layer.in_channels, layer.out_channels,
                              bias=layer.bias is not None, device='meta'))
            base.weight, base.bias = layer.weight, layer.bias
            setattr(plain.get_submodule(parent) if parent else plain, child, base)
        plain_macs = count_forward(plain, input_size)
    row.infer_plain = plain_macs
    row.branch_counted = unmerged - plain_macs - upd_macs
    row.infer_formula = plain_macs + sum(
        formula_branch_flops(dict(layers)[n], shapes[n]) for n in row.unfolded)
    return row


# ---------------------------------------------------------------------- building
def _registry(scope: str):
    import colora_mm.models  # noqa: F401  (registers the backbones)
    from mmengine.registry import init_default_scope
    init_default_scope(scope)
    if scope == 'mmdet':
        from mmdet.registry import MODELS
    elif scope == 'mmpretrain':
        from mmpretrain.registry import MODELS
    else:
        from mmseg.registry import MODELS
    return MODELS


def build_backbone(kind: str, adapter: dict) -> nn.Module:
    cfg = dict(BACKBONES[kind], adapter=dict(adapter))
    return _registry('mmseg').build(cfg)


def kind_of(backbone_cfg: dict) -> str:
    """The backbone's name in the tables: ``convnext_s``, ``resnet50``...; a ConvNeXt
    with an arch dict (its own depths and channels) is ``convnext_custom``."""
    t = backbone_cfg.get('type', '')
    if 'ConvNeXt' in t:
        arch = backbone_cfg.get('arch')
        if isinstance(arch, dict):
            return 'convnext_custom'
        return {'small': 'convnext_s', 'base': 'convnext_b'}.get(arch, f'convnext_{arch}')
    if 'ResNet' in t:
        return f'resnet{backbone_cfg.get("depth")}'
    if 'Swin' in t:
        return 'swin_t' if backbone_cfg.get('embed_dims') == 96 and list(
            backbone_cfg.get('depths', ())) == [2, 2, 6, 2] else 'swin'
    return t


def backbone_from_config(path: str) -> Tuple[nn.Module, dict, str]:
    """The backbone of an mmseg/mmdet config, built without pretrained weights."""
    from mmengine.config import Config
    if not osp.isfile(path):
        raise CLIError(f'config file {path} ' + ('is a folder; give a config file'
                       if osp.isdir(path) else 'does not exist'))
    try:
        cfg = Config.fromfile(path)
        cfg.model.backbone
    except Exception as err:  # noqa: BLE001 - not an mmengine model config
        raise CLIError(f'{path} is not an mmseg/mmdet/mmpretrain model config '
                       f'({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ""}'
                       '); give a config with model.backbone')
    backbone_cfg = copy.deepcopy(cfg.model.backbone.to_dict()
                                 if hasattr(cfg.model.backbone, 'to_dict')
                                 else dict(cfg.model.backbone))
    backbone_cfg.pop('init_cfg', None)
    backbone_cfg.pop('pretrained', None)
    norm = backbone_cfg.get('norm_cfg')
    if norm and norm.get('type') == 'SyncBN':      # a CPU build cannot run SyncBN
        backbone_cfg['norm_cfg'] = dict(norm, type='BN')
    scope = cfg.get('default_scope', 'mmseg')
    try:
        model = _registry(scope).build(backbone_cfg)
    except (ValueError, TypeError, KeyError, AssertionError, IndexError) as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CLIError(f'{path}: model.backbone ({backbone_cfg.get("type")}) does not '
                       f'build: {text}; fix the config') from None
    return model, dict(backbone_cfg.get('adapter') or dict(method='full')), kind_of(
        backbone_cfg)


# ---------------------------------------------------------------------- printing
def _m(x: float) -> str:
    return f'{x / 1e6:.3f}M'


def _g(x: float) -> str:
    return f'{x / 1e9:.3f}G'


PARAM_HEADER = ('| variant | adapters counted | adapters formula | trainable | '
                '% backbone | paper #Param | vs paper |')
HEADER = (PARAM_HEADER + ' dW formula | dW counted | branch/img formula | '
          'branch/img counted | infer/img formula | infer/img counted (merged) | '
          'merged / plain |')


def format_row(row: Row, params_only: bool = False) -> str:
    paper = f'{row.paper_m:.1f}M' if row.paper_m is not None else '-'
    diff = f'{row.paper_diff:+.1f}%' if row.paper_diff is not None else '-'
    line = (f'| {row.name} | {_m(row.adapters)} | {_m(row.adapters_formula)} | '
            f'{_m(row.trainable)} | {row.percent:.2f}% | {paper} | {diff} |')
    if params_only:
        return line
    return line + (f' {_g(row.update_formula)} | {_g(row.update_counted)} | '
                   f'{_g(row.branch_formula)} | {_g(row.branch_counted)} | '
                   f'{_g(row.infer_formula)} | {_g(row.infer_merged)} | '
                   f'{row.infer_merged / row.infer_plain:.4f} |')


def print_table(rows: Sequence[Row], input_size: Sequence[int], out=None,
                params_only: bool = False) -> None:
    out = out or sys.stdout
    header = PARAM_HEADER if params_only else HEADER
    if params_only:
        print('Trainable backbone parameters; M = 1e6.', file=out)
    else:
        print(f'Input {input_size[0]}x{input_size[1]}, one image; FLOPs are multiply-'
              'accumulates; dW = forming every weight update once (delta_weight and '
              'W + dW: the weight path, what merge bakes).', file=out)
    print(header, file=out)
    print('|' + '---|' * (header.count('|') - 1), file=out)
    for row in rows:
        print(format_row(row, params_only), file=out)


def print_stage_tables(rows: Sequence[Row], out=None) -> None:
    out = out or sys.stdout
    for row in rows:
        print(f'\n{row.name}: adapters per stage', file=out)
        print(format_stage_table(row.stages), file=out)


# ---------------------------------------------------------------------- main
def _colora(kind: str, gamma: int, share_ratio: float,
            spatial_gamma: SpatialChoice) -> dict:
    adapter = dict(method='colora', gamma=gamma, share_ratio=share_ratio)
    sg = spatial_gamma_for(kind, gamma, spatial_gamma)
    if sg is not None:
        adapter['spatial_gamma'] = sg
    return adapter


def default_variants(backbones: Sequence[str], methods: Sequence[str],
                     gamma: Optional[int], share_ratio: Optional[float],
                     sweep: bool, spatial_gamma: SpatialChoice = 'paper',
                     ) -> List[Tuple[str, dict]]:
    """``(backbone, adapter dict)`` of the grid; CoLoRA rows carry ``spatial_gamma`` as
    :func:`spatial_gamma_for` gives it."""
    variants = []
    for kind in backbones:
        for method in methods:
            if method == 'colora':
                adapter = _colora(kind, 16 if gamma is None else gamma,
                                  0.5 if share_ratio is None else share_ratio,
                                  spatial_gamma)
            else:
                adapter = dict(method=method)
                if gamma is not None and method != 'full':
                    adapter['gamma'] = gamma
            variants.append((kind, adapter))
        if sweep and kind == 'convnext_b' and 'colora' in methods:
            for g, sr in TABLE8_SWEEP:
                if (g, sr) == (16, 0.5) and 'colora' in methods and gamma is None:
                    continue
                variants.append((kind, _colora(kind, g, sr, spatial_gamma)))
    return variants


def variant_name(kind: str, adapter: dict) -> str:
    method = adapter.get('method', 'full')
    name = f'{kind} {method}'
    if method == 'colora':
        name += f' g{adapter.get("gamma", 16)} sr{adapter.get("share_ratio", 0.5)}'
        if adapter.get('spatial_gamma') is not None:
            name += f' sg{adapter["spatial_gamma"]}'
    elif adapter.get('gamma') is not None:
        name += f' g{adapter["gamma"]}'
    return name


def check_input_size(input_size: Sequence[int], stride: int = DEFAULT_TOTAL_STRIDE,
                     what: str = 'ConvNeXt, ResNet and Swin') -> None:
    """``--input-size H W``: each side at least the backbone's total stride."""
    if min(input_size) < stride:
        raise CLIError(f'--input-size {input_size[0]} {input_size[1]}: each side must be '
                       f'at least {stride}, the total stride of {what} (a smaller image '
                       'leaves the last stage without a pixel); e.g. --input-size 512 '
                       '512, the default')


def _spatial_choice(text: str) -> SpatialChoice:
    if text in ('gamma', 'paper'):
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r}: a positive integer, gamma or paper')
    if value <= 0:
        raise argparse.ArgumentTypeError(f'{text!r}: a positive integer, gamma or paper')
    return value


@torch.no_grad()     # counting only; the caller's grad mode is left as it was
def main(argv: Optional[Sequence[str]] = None) -> List[Row]:
    """Print the table and return its rows; a user error raises :class:`CLIError`
    (:func:`cli` prints it as one line)."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('configs', nargs='*', help='mmseg/mmdet configs (their backbone '
                        'is analysed); none: the --backbone x --method grid')
    parser.add_argument('--backbone', nargs='+', choices=sorted(BACKBONES),
                        default=['resnet50', 'convnext_s', 'convnext_b'])
    parser.add_argument('--method', nargs='+', choices=BASELINES, default=list(BASELINES))
    parser.add_argument('--gamma', type=int, default=None,
                        help="rank divisor; default: each method's own")
    parser.add_argument('--share-ratio', type=float, default=None,
                        help='CoLoRA rs / (rs + rl); default 0.5')
    parser.add_argument('--spatial-gamma', type=_spatial_choice, default=None,
                        metavar='{N,gamma,paper}',
                        help="CoLoRA's spatial rank divisor (rank C // N) in the grid; "
                        "'gamma': the spec's default (= gamma); 'paper' (default): "
                        '2 gamma on ConvNeXt, as the paper-reproduction configs set, '
                        "the spec's default on ResNet-50. Configs keep their own")
    parser.add_argument('--no-sweep', action='store_true',
                        help='leave out the Table 8 ConvNeXt-B sweep')
    parser.add_argument('--params-only', action='store_true',
                        help='parameter columns only (no FLOPs counting)')
    parser.add_argument('--input-size', type=int, nargs=2, default=(512, 512),
                        metavar=('H', 'W'))
    parser.add_argument('--per-stage', action='store_true',
                        help='also print each variant per backbone stage (ranks, '
                        'counts); always on for configs with per-layer overrides')
    parser.add_argument('--json', default=None, help='also write the rows here')
    args = parser.parse_args(argv)
    if args.configs and args.spatial_gamma is not None:
        parser.error('--spatial-gamma sets the built-in grid; a config is analysed with '
                     'its own adapter dict (edit the config instead).')
    input_size = tuple(args.input_size)
    flops = not args.params_only
    for path in args.configs:
        if not osp.isfile(path):
            raise CLIError(f'config file {path} ' + ('is a folder; give a config file'
                           if osp.isdir(path) else 'does not exist'))
    if args.json and osp.isdir(args.json):
        raise CLIError(f'--json {args.json} is a folder; name a file (e.g. '
                       f'{osp.join(args.json, "param_flops.json")})')
    if args.json and not osp.isdir(osp.dirname(osp.abspath(args.json))):
        raise CLIError(f'--json {args.json}: its folder does not exist')
    check_input_size(input_size)

    rows: List[Row] = []
    plain_cache: Dict[str, int] = {}
    if args.configs:
        for path in args.configs:
            model, adapter, kind = backbone_from_config(path)
            check_input_size(input_size, total_stride(model),
                             f'the backbone of {path}')
            rows.append(analyse(model, osp.splitext(osp.basename(path))[0], kind, adapter,
                                input_size, flops=flops))
    else:
        sweep = (not args.no_sweep and args.gamma is None and args.share_ratio is None
                 and not isinstance(args.spatial_gamma, int))
        for kind, adapter in default_variants(args.backbone, args.method, args.gamma,
                                              args.share_ratio, sweep,
                                              args.spatial_gamma):
            try:
                model = build_backbone(kind, adapter)
            except CLIError:
                raise
            except (ValueError, TypeError, AssertionError) as err:
                raise CLIError(f'{variant_name(kind, adapter)}: '
                               f'{str(err).splitlines()[0] if str(err) else err!r}')
            row = analyse(model, variant_name(kind, adapter), kind, adapter, input_size,
                          plain_cache.get(kind), flops=flops)
            if flops:
                plain_cache[kind] = row.infer_plain
            rows.append(row)
            del model
    print_table(rows, input_size, params_only=args.params_only)
    per_stage = [r for r in rows if r.stages and (args.per_stage or r.overrides)]
    if per_stage:
        print_stage_tables(per_stage)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump([dict(asdict(r), percent=r.percent, paper_diff=r.paper_diff,
                            layer_shapes=None) for r in rows], f, indent=1)
    return rows


def run_cli(main_fn, argv: Optional[Sequence[str]] = None) -> int:
    """Run ``main_fn(argv)``: a :class:`CLIError` becomes one ``error:`` line and exit
    status 2 (shared by the analysis tools)."""
    try:
        main_fn(argv)
    except CLIError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(main, argv)


if __name__ == '__main__':
    sys.exit(cli())
