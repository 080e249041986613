"""Weight-update correlation of adjacent pointwise layers (appendix B of the CoLoRA
paper, figures 1-2).

For a series of checkpoints of one model and every block's pointwise pair ``(W1, W2)``
(ConvNeXt ``pointwise_conv1``/``pointwise_conv2``; ResNet bottleneck ``conv1``/``conv3``)
it computes, for each pair of consecutive checkpoints, the mean singular value of
``dW = W_new - W_old`` for both layers. Similar curves for ``W1`` and ``W2`` across the
fine-tuning run are the paper's evidence that the updates of the two layers are
correlated.

Adapted models are measured on their effective weights ``W + dW_adapter`` (asked from
each layer through the adapter contract, ``AdaptedLayer.get_delta_weight``, in eval
semantics); plain models on their weights.

    # checkpoints of an mmseg/mmdet run, model from its config (no pretrained download)
    python tools/analysis/correlation.py work_dirs/run --config configs/ade20k/X.py \\
        --out-dir work_dirs/run/correlation
    # explicit files; a backbone spec instead of a config
    python tools/analysis/correlation.py iter_16000.pth iter_32000.pth iter_48000.pth \\
        --backbone convnext_b --method full --out-dir out/

A directory argument expands to its ``iter_*.pth`` / ``epoch_*.pth`` files in numeric
order. A missing file, fewer than two checkpoints, a checkpoint of another model or an
``--out-dir`` that is a file ends the run with one ``error:`` line, exit status 2,
before anything is written. Writes ``mean_singular_values.csv`` (one row per interval and block) and
``mean_singular_values.png`` (one small subplot per block, curves W1 and W2), and prints
the median over blocks of the Pearson correlation of the two curves (from four
checkpoints on: three intervals; with fewer the curves are too short for it).
"""
from __future__ import annotations

import argparse
import csv
import glob
import math
import os
import os.path as osp
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from colora_mm.adapters import AdaptedLayer
from colora_mm.adapters.colora_pair import state_dict_differences

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from param_flops import (BACKBONES, CLIError, _registry,  # noqa: E402
                         build_backbone, run_cli)


# ---------------------------------------------------------------------- the pairs
def find_backbone(model: nn.Module) -> nn.Module:
    return getattr(model, 'backbone', model)


def pointwise_pairs(model: nn.Module) -> List[Tuple[str, nn.Module, nn.Module]]:
    """``(block name, W1 layer, W2 layer)`` for every block, in network order.

    CoLoRA backbones name their pairs (``adapter_targets``); plain mmpretrain ConvNeXt
    blocks and ResNet bottlenecks are recognised by their layers."""
    backbone = find_backbone(model)
    prefix = 'backbone.' if backbone is not model else ''
    out = []
    if hasattr(backbone, 'adapter_targets'):
        for n1, n2 in backbone.adapter_targets()[0]:
            block = n1.rpartition('.')[0]
            out.append((prefix + block, backbone.get_submodule(n1),
                        backbone.get_submodule(n2)))
        return out
    for name, module in backbone.named_modules():
        if hasattr(module, 'pointwise_conv1') and hasattr(module, 'pointwise_conv2'):
            out.append((prefix + name, module.pointwise_conv1, module.pointwise_conv2))
        elif all(hasattr(module, a) for a in ('conv1', 'conv2', 'conv3')):
            out.append((prefix + name, module.conv1, module.conv3))
    if not out:
        raise ValueError(f'{type(backbone).__name__}: no ConvNeXt block '
                         '(pointwise_conv1/2) or bottleneck (conv1/conv3) found.')
    return out


@torch.no_grad()
def effective_weight(layer: nn.Module) -> torch.Tensor:
    """The weight the layer applies, as an ``(out, in)`` matrix: ``W + dW`` for an
    unmerged adapted layer (through its contract), ``W`` otherwise."""
    weight = layer.weight.detach()
    if isinstance(layer, AdaptedLayer) and not layer.merged:
        weight = weight + layer.get_delta_weight()
    return weight.reshape(weight.shape[0], -1).clone()


# ---------------------------------------------------------------------- checkpoints
def _number(path: str) -> Tuple[int, str]:
    m = re.search(r'(\d+)(?=\.pth$)', osp.basename(path))
    return (int(m.group(1)) if m else -1, osp.basename(path))


def expand_checkpoints(paths: Sequence[str]) -> List[str]:
    """Files as given; a directory becomes its iter_*/epoch_* checkpoints in order.

    Raises:
        CLIError: a path that does not exist, a folder without checkpoints, fewer than
            two checkpoints in all.
    """
    out = []
    for path in paths:
        if osp.isdir(path):
            found = [p for pat in ('iter_*.pth', 'epoch_*.pth')
                     for p in glob.glob(osp.join(path, pat))]
            if not found:
                raise CLIError(f'folder {path} holds no iter_*.pth or epoch_*.pth '
                               'checkpoint; give the work dir of a run, or the files')
            out.extend(sorted(found, key=_number))
        elif osp.isfile(path):
            out.append(path)
        else:
            raise CLIError(f'checkpoint {path} does not exist')
    if len(out) < 2:
        raise CLIError(f'need at least two checkpoints (the study compares consecutive '
                       f'ones), got {len(out)}: {", ".join(out)}; give two or more files '
                       'in training order, or a work dir holding them')
    return out


def checkpoint_label(path: str, ckpt: dict) -> str:
    """``'iter N'`` or ``'epoch N'`` from the checkpoint's meta, by the file's kind:
    mmengine records both counters in every checkpoint, and an epoch-based run's
    ``epoch_N.pth`` is labelled by its epoch; else the file name."""
    meta = ckpt.get('meta', {}) if isinstance(ckpt, dict) else {}
    keys = (('epoch', 'iter') if osp.basename(path).startswith('epoch_')
            else ('iter', 'epoch'))
    for key in keys:
        if isinstance(meta, dict) and meta.get(key) is not None:
            return f'{key} {meta[key]}'
    return osp.splitext(osp.basename(path))[0]


def load_into(model: nn.Module, path: str) -> str:
    """Load an mmengine checkpoint (or a bare state dict) into ``model``, strictly for
    the model's tensors; a segmentor/detector checkpoint loads into a bare backbone.
    Returns the checkpoint's label (its iteration or epoch when recorded)."""
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as err:   # not a checkpoint: pickle, zip or torch errors
        raise CLIError(f'cannot read checkpoint {path}: '
                       f'{str(err).splitlines()[0] if str(err) else type(err).__name__}')
    state = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else ckpt
    if not isinstance(state, dict):
        raise CLIError(f'{path} holds no state dict ({type(state).__name__})')
    state = {k[7:] if k.startswith('module.') else k: v for k, v in state.items()}
    own = model.state_dict()
    if not any(k in own for k in state) and any(k.startswith('backbone.') for k in state):
        state = {k[9:]: v for k, v in state.items() if k.startswith('backbone.')}
    # up to what loading adapts (the partner offsets of a trained CoLoRA pair)
    missing, unexpected, reshaped = state_dict_differences(own, state)
    missing, unexpected = sorted(missing), sorted(unexpected)
    if missing or unexpected:
        raise CLIError(
            f'{path} does not match the model ({type(model).__name__}): missing '
            f'{missing[:5]}{"..." if len(missing) > 5 else ""}, unexpected '
            f'{unexpected[:5]}{"..." if len(unexpected) > 5 else ""}. Build the model '
            'the checkpoint was trained with (--config, or --backbone/--method/--gamma).')
    reshaped = [f'{k} {tuple(state[k].shape)} (model {tuple(own[k].shape)})'
                for k in reshaped]
    if reshaped:
        raise CLIError(
            f'{path} does not match the model ({type(model).__name__}): other shapes, '
            f'{"; ".join(reshaped[:3])}{"..." if len(reshaped) > 3 else ""}. Build the '
            'model the checkpoint was trained with (--config, or '
            '--backbone/--method/--gamma/--share-ratio).')
    model.load_state_dict(state, strict=True)
    return checkpoint_label(path, ckpt)


# ---------------------------------------------------------------------- the study
def mean_singular_value(delta: torch.Tensor, dtype=torch.float64) -> float:
    return torch.linalg.svdvals(delta.to(dtype)).mean().item()


@torch.no_grad()
def weight_update_study(model: nn.Module, checkpoints: Sequence[str],
                        dtype=torch.float64) -> List[Dict]:
    """One row per interval and block: ``interval, from, to, block, W1, W2`` (the mean
    singular values of the two layers' updates between consecutive checkpoints)."""
    model.eval()
    pairs = pointwise_pairs(model)
    rows: List[Dict] = []
    previous: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None
    prev_label = None
    for index, path in enumerate(checkpoints):
        label = load_into(model, path)
        current = [(effective_weight(l1), effective_weight(l2)) for _, l1, l2 in pairs]
        if previous is not None:
            for (block, _, _), (w1, w2), (o1, o2) in zip(pairs, current, previous):
                rows.append({'interval': index, 'from': prev_label, 'to': label,
                             'block': block,
                             'W1': mean_singular_value(w1 - o1, dtype),
                             'W2': mean_singular_value(w2 - o2, dtype)})
        previous, prev_label = current, label
    return rows


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    if len(x) < 2:
        return float('nan')
    a, b = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    den = (a.norm() * b.norm()).item()
    return (a @ b).item() / den if den > 0 else float('nan')


def per_block(rows: Sequence[Dict]) -> Dict[str, Dict[str, List]]:
    out: Dict[str, Dict[str, List]] = {}
    for row in rows:
        entry = out.setdefault(row['block'], {'interval': [], 'W1': [], 'W2': []})
        for key in entry:
            entry[key].append(row[key])
    return out


def write_csv(rows: Sequence[Dict], path: str) -> None:
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=['interval', 'from', 'to', 'block', 'W1',
                                               'W2'])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f'{v:.9g}' if isinstance(v, float) else v)
                             for k, v in row.items()})


def plot_grid(rows: Sequence[Dict], path: str, title: str = '') -> None:
    """One small subplot per block with the W1 and W2 curves (figures 1-2 style)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401
    blocks = per_block(rows)
    n = len(blocks)
    cols = min(6, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(2.2 * cols, 1.7 * nrows),
                             squeeze=False)
    for ax, (block, data) in zip(axes.flat, blocks.items()):
        ax.plot(data['interval'], data['W1'], color='tab:blue', lw=1.2, label='W1')
        ax.plot(data['interval'], data['W2'], color='tab:orange', lw=1.2, label='W2')
        ax.set_title(block, fontsize=7)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.tick_params(labelsize=5)
    for ax in list(axes.flat)[n:]:
        ax.axis('off')
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc='upper right', fontsize=7)
    fig.suptitle(title or 'mean singular value of dW between consecutive checkpoints',
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------- main
def build_model(args) -> nn.Module:
    """The model the checkpoints load into; bad settings are one CLIError."""
    try:
        return _build_model(args)
    except CLIError:
        raise
    except (ValueError, TypeError, AssertionError, KeyError) as err:
        where = f'config {args.config}' if args.config else (
            f'--backbone {args.backbone} --method {args.method}')
        raise CLIError(f'{where}: {str(err).splitlines()[0] if str(err) else err!r}')


def _build_model(args) -> nn.Module:
    if args.config:
        from mmengine.config import Config
        if not osp.isfile(args.config):
            raise CLIError(f'config file {args.config} does not exist')
        cfg = Config.fromfile(args.config)
        model_cfg = cfg.model
        if model_cfg.get('backbone') is not None:
            model_cfg.backbone.pop('init_cfg', None)
            norm = model_cfg.backbone.get('norm_cfg')
            if norm is not None and norm.get('type') == 'SyncBN':
                model_cfg.backbone.norm_cfg = dict(norm, type='BN')
        return _registry(cfg.get('default_scope', 'mmseg')).build(model_cfg)
    adapter = dict(method=args.method)
    if args.gamma is not None:
        adapter['gamma'] = args.gamma
    if args.share_ratio is not None:
        adapter['share_ratio'] = args.share_ratio
    if args.backbone in BACKBONES:
        return build_backbone(args.backbone, adapter)
    if args.backbone.startswith('convnext_'):
        return _registry('mmseg').build(dict(type='CoLoRAConvNeXt',
                                             arch=args.backbone[len('convnext_'):],
                                             adapter=adapter))
    raise CLIError(f'--backbone {args.backbone}: use {", ".join(sorted(BACKBONES))} or '
                   'convnext_<mmpretrain arch>, or give --config')


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    """Run the study, write its files, return its rows; a user error raises
    :class:`CLIError` (:func:`cli` prints it as one line)."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('checkpoints', nargs='+',
                        help='checkpoint files in training order, or a work dir')
    parser.add_argument('--config', help='the config the checkpoints were trained with')
    parser.add_argument('--backbone', default='convnext_b',
                        help='without --config: resnet50, convnext_s, convnext_b or '
                             'convnext_<mmpretrain arch>')
    parser.add_argument('--method', default='full')
    parser.add_argument('--gamma', type=int, default=None)
    parser.add_argument('--share-ratio', type=float, default=None)
    parser.add_argument('--out-dir', default='.')
    parser.add_argument('--float32', action='store_true',
                        help='SVDs in float32 (faster; default float64)')
    args = parser.parse_args(argv)

    checkpoints = expand_checkpoints(args.checkpoints)
    if osp.exists(args.out_dir) and not osp.isdir(args.out_dir):
        raise CLIError(f'--out-dir {args.out_dir} is a file; name a folder (made if '
                       'missing)')
    model = build_model(args)
    rows = weight_update_study(model, checkpoints,
                               torch.float32 if args.float32 else torch.float64)
    os.makedirs(args.out_dir, exist_ok=True)
    csv_path = osp.join(args.out_dir, 'mean_singular_values.csv')
    png_path = osp.join(args.out_dir, 'mean_singular_values.png')
    write_csv(rows, csv_path)
    plot_grid(rows, png_path)
    blocks = per_block(rows)
    print(f'{len(checkpoints)} checkpoints, {len(blocks)} blocks: wrote {csv_path} and '
          f'{png_path}')
    print(correlation_summary(blocks))
    return rows


def correlation_summary(blocks: Dict[str, Dict[str, List]]) -> str:
    """The line on the Pearson r of each block's W1 and W2 curves: their median (the
    mean of the middle two for an even count), min and max; a curve needs three points
    (three intervals, four checkpoints) for r to say anything, two points always giving
    +-1."""
    import statistics
    intervals = max((len(d['W1']) for d in blocks.values()), default=0)
    if intervals < 3:
        return (f'{intervals} interval(s) per block: too few for a correlation of the '
                'W1 and W2 curves (two points always give r = +-1); give four or more '
                'checkpoints for Pearson r')
    corr = sorted(c for c in (pearson(d['W1'], d['W2']) for d in blocks.values())
                  if not math.isnan(c))
    if not corr:
        return 'Pearson r of the W1 and W2 curves: undefined (a curve is constant)'
    return (f'Pearson r of the W1 and W2 curves over {len(corr)} blocks: median '
            f'{statistics.median(corr):.3f}, min {corr[0]:.3f}, max {corr[-1]:.3f}')


def cli(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(main, argv)


if __name__ == '__main__':
    sys.exit(cli())
