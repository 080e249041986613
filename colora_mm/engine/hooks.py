"""Training hooks: a report of what trains and what it costs, and periodic merge-and-reinit.

Both are registered in mmengine's root ``HOOKS`` registry, so mmseg and mmdet configs use
them as ``custom_hooks=[dict(type='CoLoRAReportHook'), dict(type='MergeReinitHook',
interval=1000)]``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from colora_mm.adapters import iter_adapted_layers

from .complexity import (DEFAULT_TOTAL_STRIDE, check_input_size, format_stage_table,
                         measure_flops, parameter_parts, stage_summary, total_stride)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if is_model_wrapper(model) else model


def _human(n: float) -> str:
    for unit, scale in (('G', 1e9), ('M', 1e6), ('K', 1e3)):
        if abs(n) >= scale:
            return f'{n / scale:.3f}{unit}'
    return f'{n:.0f}'


def format_report(parts: dict, flops: Optional[dict], input_size: Sequence[int]) -> str:
    """The report as a fixed-width table."""
    rows = [('part', 'trainable', 'total', 'trainable %')]
    trainable = total = 0
    for part, c in parts.items():
        trainable += c['trainable']
        total += c['total']
        pct = f"{100.0 * c['trainable'] / c['total']:.2f}" if c['total'] else '-'
        rows.append((part, f"{c['trainable']:,}", f"{c['total']:,}", pct))
    rows.append(('all', f'{trainable:,}', f'{total:,}',
                 f'{100.0 * trainable / total:.2f}' if total else '-'))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ['  '.join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, '-' * len(lines[0]))
    lines.insert(len(lines) - 1, '-' * len(lines[0]))
    if flops is not None:
        base = flops['backbone']
        h, w = input_size

        def pct(x):
            return f' ({100.0 * x / base:.2f}% of the backbone)' if base else ''

        lines += [
            f'FLOPs (multiply-accumulates, appendix Table 1), one {h}x{w} image:',
            f"  backbone forward                        {_human(base)}",
            f"  adapter branches, per image             {_human(flops['branches'])}"
            + pct(flops['branches']),
            f"  adapter weight updates, per train step  {_human(flops['weight_updates'])}"
            + pct(flops['weight_updates']),
        ]
    return '\n'.join(lines)


def stage_of(name: str) -> str:
    """``stages.2`` for ``stages.2.5.pointwise_conv1``, ``layer3`` for
    ``layer3.1.conv1``: the group a layer is reported under."""
    parts = name.split('.')
    if parts[0][-1:].isdigit() or len(parts) < 2:
        return parts[0]
    return '.'.join(parts[:2])


def path_report(model: nn.Module) -> Dict[str, Dict[str, int]]:
    """``{stage: {'activation': n, 'weight': m}}``: the training path each adapted
    layer's low-rank update took in its last forward pass."""
    out: Dict[str, Dict[str, int]] = {}
    for name, layer in iter_adapted_layers(model):
        if layer.last_path is None:
            continue
        count = out.setdefault(stage_of(name), {})
        count[layer.last_path] = count.get(layer.last_path, 0) + 1
    return out


def format_path_report(paths: Dict[str, Dict[str, int]]) -> str:
    lines = ['training path of the low-rank updates in the first iteration '
             '(activation: base(x) + (x L) R; weight: x (W + L R)):']
    for stage, count in paths.items():
        lines.append(f'  {stage}: ' + ', '.join(f'{n} {path}' for path, n in
                                               sorted(count.items())))
    return '\n'.join(lines)


@HOOKS.register_module()
class CoLoRAReportHook(Hook):
    """At the start of training, print and log trainable vs total parameters per part
    (backbone adapters, backbone biases/norms, other backbone weights, neck, heads),
    the adapters' FLOPs overhead (appendix Table 1) measured on one image, and per
    backbone stage the adapted layers, their adapters' ranks and parameter counts
    (what per-layer ``overrides`` change). After the first iteration, the training
    path (activation or weight) each stage's low-rank updates took.

    Args:
        input_size (int | tuple[int, int]): ``(H, W)`` of the image the FLOPs are
            counted on, or one int for a square; each side at least the backbone's
            total stride (32). Defaults to (512, 512).
        in_channels (int): Image channels. Defaults to 3.
        count_flops (bool): Run the one-image forward pass for the FLOPs part.
            Defaults to True.
    """

    priority = 'VERY_LOW'

    def __init__(self, input_size: Sequence[int] = (512, 512), in_channels: int = 3,
                 count_flops: bool = True) -> None:
        self.input_size = self._checked_size(input_size, DEFAULT_TOTAL_STRIDE)
        self.in_channels = in_channels
        self.count_flops = count_flops
        self.report: Optional[dict] = None
        #: ``{stage: {path: count}}`` after the first training iteration.
        self.paths: Optional[Dict[str, Dict[str, int]]] = None

    @staticmethod
    def _checked_size(size, minimum):
        try:
            return check_input_size(size, minimum)
        except ValueError as err:
            raise ValueError(f'CoLoRAReportHook: input_size={err}; set it to the '
                             'training crop, e.g. input_size=(512, 512) (or count_flops='
                             'False to skip the FLOPs count).') from None

    def before_train(self, runner) -> None:
        model = _unwrap(runner.model)
        parts = parameter_parts(model)
        flops = None
        if self.count_flops:
            backbone = getattr(model, 'backbone', model)
            # A backbone of a larger stride than the default (a five-stage ConvNeXt).
            self._checked_size(self.input_size, total_stride(backbone))
            flops = measure_flops(backbone, self.input_size, self.in_channels)
        table = format_report(parts, flops, self.input_size)
        stages = stage_summary(getattr(model, 'backbone', model))
        if stages:
            table += '\nAdapters per stage:\n' + format_stage_table(stages)
        self.report = dict(parts=parts, flops=flops, stages=stages, table=table)
        print_log('CoLoRA report\n' + table, logger='current')
        trainable = sum(c['trainable'] for c in parts.values())
        runner.message_hub.update_info('colora/trainable_params', trainable)
        if flops is not None:
            runner.message_hub.update_info('colora/adapter_branch_flops',
                                           flops['branches'])
            runner.message_hub.update_info('colora/adapter_update_flops',
                                           flops['weight_updates'])

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        if self.paths is not None:          # once per run, after its first iteration
            return
        model = _unwrap(runner.model)
        self.paths = paths = path_report(getattr(model, 'backbone', model))
        if paths:
            print_log('CoLoRA report\n' + format_path_report(paths), logger='current')


def _trains(layer) -> bool:
    """Whether any parameter of ``layer``'s adapter trains (a CoLoRA pair's live on
    the pair, which its second layer does not register)."""
    adapter = layer.adapter_branch
    owner = adapter.get_pair() if hasattr(adapter, 'get_pair') else adapter
    return any(p.requires_grad for p in owner.parameters())


@torch.no_grad()
def fold_independent_parts(model: nn.Module) -> List[nn.Parameter]:
    """Fold every trained adapter's independent low-rank part into its base weight and
    re-initialise it (``Adapter.fold_independent_``); returns the re-initialised
    parameters. Adapters that do not train (a frozen stage's) are left as they are,
    and the re-initialised parameters lose any gradient accumulated for their old
    values (gradient accumulation across a merge)."""
    params: List[nn.Parameter] = []
    for _, layer in iter_adapted_layers(model):
        if _trains(layer):
            params.extend(layer.adapter_branch.fold_independent_(layer))
    for p in params:
        p.grad = None
    return params


def reset_optimizer_state(optim_wrapper, params: Sequence[nn.Parameter]) -> int:
    """Drop the optimizer state (moments, step) of ``params`` in every optimizer of an
    ``OptimWrapper`` or ``OptimWrapperDict``; returns how many states were dropped."""
    wrappers = (optim_wrapper.values() if hasattr(optim_wrapper, 'values')
                else [optim_wrapper])
    dropped = 0
    for wrapper in wrappers:
        state = wrapper.optimizer.state
        for p in params:
            if p in state:
                del state[p]
                dropped += 1
    return dropped


@torch.no_grad()
def sync_from_rank0(model: nn.Module, params: Sequence[nn.Parameter]) -> None:
    """In distributed training, make every rank hold rank 0's re-initialised adapter
    parameters and folded base weights: re-initialisation draws from each rank's own
    random generator, and DDP does not re-broadcast parameters after construction."""
    from mmengine.dist import broadcast, get_world_size
    if get_world_size() == 1:
        return
    for p in params:
        broadcast(p.data, src=0)
    for _, layer in iter_adapted_layers(model):
        broadcast(layer.weight.data, src=0)


@HOOKS.register_module()
class MergeReinitHook(Hook):
    """Every ``interval`` training iterations, fold the adapters' independent low-rank
    parts into the base weights, re-initialise them as when they were built (B = 0;
    PiSSA from the SVD of the new weight, its principal part taken out of the weight
    again), so the model's output does not change, and reset their optimizer state.
    Under distributed training the result is broadcast from rank 0, so that every
    replica stays identical.

    It needs adapters with a layer-independent low-rank part (CoLoRA with
    ``share_ratio < 1``, LoRA, PiSSA, HiRA): on any other model (full fine-tuning,
    Conv-Adapter, CoLoRA with ``share_ratio=1``) it would never fold anything, and
    ``before_train`` (and ``tools/train.py``'s checks, before any work) raises.

    Args:
        interval (int): Iterations between merges. Defaults to 1000.
    """

    priority = 'LOW'

    def __init__(self, interval: int = 1000) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int):
            raise TypeError(f'MergeReinitHook: interval={interval!r} '
                            f'({type(interval).__name__}) must be an int, the training '
                            'iterations between merges, e.g. interval=1000.')
        if interval <= 0:
            raise ValueError(f'MergeReinitHook: interval={interval} must be positive, '
                             'the training iterations between merges, e.g. '
                             'interval=1000.')
        self.interval = interval

    def before_train(self, runner) -> None:
        self.check_model(_unwrap(runner.model))

    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` when ``model`` (a whole model or its backbone) has no
        adapter this hook could fold. ``tools/train.py`` calls it on the backbone it
        builds for its checks, before any work directory exists."""
        layers = list(iter_adapted_layers(model))
        if any(layer.adapter_branch.has_independent_part for _, layer in layers):
            return
        if layers:
            kinds = sorted({type(layer.adapter_branch).__name__ for _, layer in layers})
            what = (f'no adapter of the model has a layer-independent low-rank part '
                    f'(its adapters: {", ".join(kinds)})')
        else:
            what = 'the model has no adapters (full fine-tuning)'
        raise ValueError(f'MergeReinitHook: {what}, so there is nothing to fold and '
                         f're-initialise every {self.interval} iterations. Remove '
                         'MergeReinitHook from custom_hooks; it applies to CoLoRA '
                         '(share_ratio < 1), LoRA, PiSSA and HiRA.')

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        if not self.every_n_train_iters(runner, self.interval):
            return
        model = _unwrap(runner.model)
        params = fold_independent_parts(model)
        sync_from_rank0(model, params)
        dropped = reset_optimizer_state(runner.optim_wrapper, params)
        print_log(f'MergeReinitHook: iter {runner.iter + 1}: folded and re-initialised '
                  f'{len(params)} adapter tensors, reset {dropped} optimizer states.',
                  logger='current')
