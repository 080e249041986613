"""The demo's results: parameter counts, the table (console and markdown) and the figure
of target images, ground truth and predictions."""
from __future__ import annotations

import glob
import json
import os
import os.path as osp
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from .data import CLASSES, PALETTE


@dataclass
class Row:
    """One line of the results table."""

    method: str
    trainable_backbone: Optional[int]    # None: not a training run (merged model)
    backbone_total: Optional[int]        # parameters of the plain (unadapted) backbone
    miou: float
    train_seconds: Optional[float] = None
    seconds_per_iter: Optional[float] = None
    note: str = ''
    extra: Dict[str, float] = field(default_factory=dict)

    @property
    def backbone_percent(self) -> Optional[float]:
        if self.trainable_backbone is None or not self.backbone_total:
            return None
        return 100.0 * self.trainable_backbone / self.backbone_total


def count_parameters(config: str, cfg_options: Optional[dict] = None) -> Dict[str, int]:
    """Trainable backbone parameters, the plain backbone's size and the heads' trainable
    parameters of the model a config builds (no weights loaded)."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    import colora_mm  # noqa: F401  (registers CoLoRAConvNeXt)
    from colora_mm.adapters import is_adapter_name
    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    from mmseg.registry import MODELS
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    out = dict(trainable_backbone=0, backbone_plain=0, trainable_heads=0)
    for name, p in model.named_parameters():
        if name.startswith('backbone.'):
            if not is_adapter_name(name):
                out['backbone_plain'] += p.numel()
            if p.requires_grad:
                out['trainable_backbone'] += p.numel()
        elif p.requires_grad:
            out['trainable_heads'] += p.numel()
    return out


def write_parameter_counts(path: str, configs: Dict[str, str]) -> None:
    """:func:`count_parameters` of every ``name -> config``, written to ``path`` as
    JSON (run by ``tools/demo.py`` in a tool process)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        counts = {name: count_parameters(config) for name, config in configs.items()}
    with open(path, 'w') as f:
        json.dump(counts, f, indent=1)
    print(json.dumps(counts, indent=1))


def read_miou(work_dir: str) -> float:
    """mIoU (in %) from the ``metrics.json`` that ``tools/test.py`` writes."""
    with open(osp.join(work_dir, 'metrics.json')) as f:
        metrics = json.load(f)
    return float(metrics['mIoU'])


def read_seconds_per_iter(work_dir: str) -> Optional[float]:
    """Mean training iteration time from mmengine's ``vis_data/scalars.json`` (the
    logged ``time`` values, each a mean over the logging window), or None."""
    paths = sorted(glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json')))
    if not paths:
        return None
    times = []
    with open(paths[-1]) as f:
        for line in f:
            entry = json.loads(line)
            if 'time' in entry and 'loss' in entry:
                times.append(float(entry['time']))
    return float(np.mean(times)) if times else None


def _fmt_int(n: Optional[int]) -> str:
    return '-' if n is None else f'{n:,}'


def _fmt(x: Optional[float], digits: int = 2, suffix: str = '') -> str:
    return '-' if x is None else f'{x:.{digits}f}{suffix}'


HEADER = ('method', 'trainable backbone params', '% of backbone', 'target mIoU',
          'training time')


def table_cells(rows: Sequence[Row]) -> List[List[str]]:
    cells = []
    for r in rows:
        time = '-'
        if r.train_seconds is not None:
            time = f'{r.train_seconds:.0f} s'
            if r.seconds_per_iter is not None:
                time += f' ({1000 * r.seconds_per_iter:.0f} ms/iter)'
        cells.append([r.method, _fmt_int(r.trainable_backbone),
                      _fmt(r.backbone_percent, 2), f'{r.miou:.2f}', time])
    return cells


def format_console(rows: Sequence[Row]) -> str:
    cells = [list(HEADER)] + table_cells(rows)
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    lines = ['  '.join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, '-' * len(lines[0]))
    return '\n'.join(lines)


def format_markdown(rows: Sequence[Row]) -> str:
    lines = ['| ' + ' | '.join(HEADER) + ' |',
             '|' + '|'.join(['---'] + ['---:'] * (len(HEADER) - 1)) + '|']
    lines += ['| ' + ' | '.join(c) + ' |' for c in table_cells(rows)]
    return '\n'.join(lines)


def write_results(out_dir: str, rows: Sequence[Row], header: str, footer: str) -> str:
    """``results.md`` (the table with what produced it) and ``results.json``."""
    md = osp.join(out_dir, 'results.md')
    with open(md, 'w') as f:
        f.write(header.rstrip() + '\n\n' + format_markdown(rows) + '\n\n'
                + footer.rstrip() + '\n')
    with open(osp.join(out_dir, 'results.json'), 'w') as f:
        json.dump([dict(asdict(r), backbone_percent=r.backbone_percent) for r in rows],
                  f, indent=1)
    return md


# ------------------------------------------------------------------ figure
def colorize(label: np.ndarray) -> np.ndarray:
    """PNG label values (0 = unlabelled, k = class k - 1) as RGB."""
    lut = np.zeros((256, 3), np.uint8)
    for k, colour in enumerate(PALETTE):
        lut[k + 1] = colour
    return lut[label]


def prediction_figure(path: str, data_root: str, columns: Dict[str, str],
                      num_images: int = 6) -> str:
    """A grid: target image, ground truth, then one column per prediction folder
    (``tools/test.py --out``: PNGs with ADE label values, named as the images).

    Args:
        path (str): PNG to write.
        data_root (str): The target domain's dataset root.
        columns (dict): Column title -> folder of predicted label PNGs.
        num_images (int): Rows (the first images of the validation split).
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from PIL import Image

    img_dir = osp.join(data_root, 'images', 'validation')
    ann_dir = osp.join(data_root, 'annotations', 'validation')
    names = sorted(os.listdir(img_dir))[:num_images]
    titles = ['target image', 'ground truth'] + list(columns)
    fig, axes = plt.subplots(len(names), len(titles),
                             figsize=(1.9 * len(titles), 1.9 * len(names) + 0.7),
                             squeeze=False)
    for i, name in enumerate(names):
        stem = osp.splitext(name)[0]
        panels = [np.asarray(Image.open(osp.join(img_dir, name)).convert('RGB')),
                  colorize(np.asarray(Image.open(osp.join(ann_dir, stem + '.png'))))]
        for folder in columns.values():
            panels.append(colorize(np.asarray(Image.open(osp.join(folder,
                                                                  stem + '.png')))))
        for j, panel in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(panel, interpolation='nearest')
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=9)
    handles = [Patch(color=np.array(c) / 255.0, label=n) for n, c in zip(CLASSES, PALETTE)]
    handles.append(Patch(color='black', label='unlabelled (ignored)'))
    fig.legend(handles=handles, loc='lower center', ncol=len(handles), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
