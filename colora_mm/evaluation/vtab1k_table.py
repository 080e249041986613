"""VTAB-1k results: per-task mean and standard deviation over seeds, group averages,
and a markdown table laid out like the CoLoRA paper's Tables 5-7 (appendix G).

The paper's conventions, which its own rows follow (checked in the tests: every group
mean, and 28 of the 30 group standard deviations, to the rounding of the printed
cells):

* a task's cell is ``mean±std`` of the top-1 accuracy over the seeds; the standard
  deviation is the population one (``ddof=0``);
* a group's "Average" is the mean of its tasks' means ``±`` the mean of their
  standard deviations, given only when every task of the group has a result.

Standard library only.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from colora_mm.datasets.vtab1k_layout import GROUPS, TASKS

METHOD_NAMES = {'full': 'FT', 'conv_adapter': 'Conv-Adapter', 'pissa': 'PiSSA',
                'hira': 'HiRA', 'colora': 'CoLoRA', 'lora': 'LoRA'}
BACKBONE_NAMES = {'resnet50': 'ResNet-50', 'convnext_s': 'ConvNeXt-S',
                  'convnext_b': 'ConvNeXt-B'}
TABLE_OF_GROUP = {'natural': 'Table 5', 'specialized': 'Table 6', 'structured': 'Table 7'}

#: The paper's Tables 5-7 as printed: (backbone, method) -> (#Param, natural row,
#: specialized row, structured row); each row is its tasks in column order, then the
#: group average, as ``mean±std``.
PAPER_VTAB1K: Dict[Tuple[str, str], Tuple[str, str, str, str]] = {
    ('resnet50', 'full'): (
        '23.5M',
        '89.49±0.19 30.82±0.16 64.41±0.67 89.35±0.34 84.43±0.46 31.00±0.17 82.51±0.03 67.43±0.29',  # noqa: E501
        '85.31±0.61 91.83±0.34 80.94±0.11 73.82±0.20 82.98±0.35',
        '43.27±0.58 55.21±0.48 45.67±0.14 80.18±0.82 41.93±0.56 80.59±1.11 26.54±0.16 48.21±1.55 52.70±0.67'),  # noqa: E501
    ('resnet50', 'conv_adapter'): (
        '1.4M',
        '86.98±0.13 27.22±0.32 64.40±0.59 82.21±0.19 88.98±0.08 32.67±0.06 51.31±0.78 61.97±0.31',  # noqa: E501
        '78.59±0.28 88.20±0.44 75.29±0.23 73.80±0.06 78.97±0.25',
        '35.94±0.05 44.98±1.55 35.40±0.36 41.50±0.62 15.29±0.95 69.95±1.04 14.72±0.12 38.21±0.79 37.00±0.67'),  # noqa: E501
    ('resnet50', 'pissa'): (
        '1.2M',
        '88.12±0.26 26.74±0.49 62.93±0.15 85.85±0.91 89.13±0.05 32.71±0.27 63.32±0.30 64.11±0.35',  # noqa: E501
        '81.59±0.58 90.25±0.55 78.47±0.56 73.82±0.15 81.03±0.46',
        '48.61±0.29 49.16±0.63 38.21±0.46 52.62±1.11 22.29±0.32 73.70±1.19 18.05±0.61 39.43±0.89 42.76±0.69'),  # noqa: E501
    ('resnet50', 'hira'): (
        '1.2M',
        '87.00±0.18 27.97±0.07 63.99±0.30 82.39±0.26 89.20±0.14 32.28±0.14 53.31±0.64 62.31±0.25',  # noqa: E501
        '79.07±0.10 89.10±0.03 75.42±0.11 73.85±0.02 79.36±0.07',
        '40.98±0.31 46.69±0.72 35.10±0.40 45.70±0.26 16.94±0.23 71.31±0.75 13.53±0.27 44.05±0.31 39.29±0.41'),  # noqa: E501
    ('resnet50', 'colora'): (
        '1.0M',
        '89.12±0.24 29.98±0.48 62.82±0.74 87.51±0.25 88.87±0.45 32.38±0.57 75.31±0.78 66.57±0.50',  # noqa: E501
        '82.60±0.58 92.16±0.20 81.08±0.26 74.30±0.19 82.54±0.31',
        '54.04±3.25 53.95±0.86 42.05±0.39 76.42±1.33 37.18±0.53 79.98±0.77 22.58±0.47 48.81±1.23 51.88±1.10'),  # noqa: E501
    ('convnext_s', 'full'): (
        '49.5M',
        '91.33±0.55 65.60±0.32 74.17±0.05 98.74±0.10 90.36±0.22 49.02±0.19 92.30±0.13 80.22±0.22',  # noqa: E501
        '87.95±0.45 95.98±0.06 85.98±0.75 76.83±0.27 86.69±0.38',
        '91.06±0.40 66.58±0.60 55.10±0.37 92.75±0.49 62.41±0.77 83.88±0.17 39.96±0.68 46.91±0.18 67.33±0.46'),  # noqa: E501
    ('convnext_s', 'conv_adapter'): (
        '2.8M',
        '90.94±0.45 68.52±0.36 75.37±0.40 99.12±0.07 91.13±0.09 49.91±0.06 90.35±0.36 80.76±0.26',  # noqa: E501
        '85.75±0.75 94.89±0.16 84.04±0.24 75.30±0.22 84.99±0.34',
        '87.82±0.65 66.06±0.62 48.68±0.67 94.11±0.25 61.30±0.47 85.04±0.46 37.29±0.54 49.14±0.45 66.18±0.52'),  # noqa: E501
    ('convnext_s', 'pissa'): (
        '3.0M',
        '90.93±0.12 69.22±0.40 75.62±0.10 99.06±0.04 91.29±0.16 51.96±0.29 90.27±0.29 81.19±0.20',  # noqa: E501
        '85.79±0.07 95.45±0.09 85.56±0.15 75.56±0.26 85.59±0.14',
        '91.51±0.54 67.04±0.90 51.35±0.49 94.47±0.30 61.47±0.65 82.79±0.07 37.24±0.46 49.15±0.05 66.88±0.43'),  # noqa: E501
    ('convnext_s', 'hira'): (
        '3.0M',
        '90.71±0.24 70.85±0.20 76.30±0.11 99.27±0.00 92.12±0.07 53.56±0.14 86.39±0.10 81.31±0.12',  # noqa: E501
        '84.29±0.20 94.85±0.07 84.91±0.06 75.85±0.12 84.97±0.11',
        '79.64±3.01 63.95±0.39 47.33±0.48 79.60±2.20 56.35±0.97 82.32±0.77 25.85±0.25 42.13±0.26 59.65±1.04'),  # noqa: E501
    ('convnext_s', 'colora'): (
        '2.6M',
        '91.60±0.11 66.34±0.55 75.00±0.60 98.89±0.06 90.43±0.27 49.94±0.33 92.08±0.21 80.61±0.31',  # noqa: E501
        '87.51±0.07 96.00±0.12 85.95±0.15 77.13±0.12 86.65±0.11',
        '91.71±0.18 65.57±0.08 54.59±0.61 92.94±0.52 62.28±0.88 83.82±0.40 40.71±0.67 48.95±0.40 67.57±0.47'),  # noqa: E501
}


def _cell(text: str) -> Tuple[float, float]:
    mean, std = text.split('±')
    return float(mean), float(std)


def paper_row(backbone: str, method: str) -> Optional[dict]:
    """The paper's numbers for one backbone and method, or None if the paper has no
    such row: ``{'params': '2.6M', 'tasks': {task: (mean, std)}, 'groups': {group:
    (mean, std)}}`` (the averages as printed)."""
    entry = PAPER_VTAB1K.get((backbone, method))
    if entry is None:
        return None
    params, *rows = entry
    tasks, groups = {}, {}
    for group, row in zip(GROUPS, rows):
        names = [t.name for t in TASKS if t.group == group]
        cells = [_cell(c) for c in row.split()]
        if len(cells) != len(names) + 1:
            raise ValueError(f'PAPER_VTAB1K[{backbone!r}, {method!r}] {group}: '
                             f'{len(cells)} cells for {len(names)} tasks + average.')
        tasks.update(zip(names, cells[:-1]))
        groups[group] = cells[-1]
    return dict(params=params, tasks=tasks, groups=groups)


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and population standard deviation (0 for one value)."""
    if not values:
        raise ValueError('mean_std: no values')
    mean = math.fsum(values) / len(values)
    var = math.fsum((v - mean) ** 2 for v in values) / len(values)
    return mean, math.sqrt(var)


def summarize(top1: Mapping[str, Mapping[int, float]]) -> dict:
    """Aggregate per-run top-1 accuracies.

    Args:
        top1: ``{task name: {seed: top-1 %}}`` (tasks without runs may be absent).

    Returns:
        dict: ``tasks``: ``{task: {'mean', 'std', 'seeds', 'values'}}``; ``groups``:
        ``{group: {'mean', 'std', 'tasks'}}`` for every group whose tasks all have a
        result (mean of the task means, mean of their standard deviations).
    """
    known = {t.name for t in TASKS}
    unknown = sorted(set(top1) - known)
    if unknown:
        raise ValueError(f'summarize: unknown VTAB-1k tasks {unknown}')
    tasks = {}
    for task in TASKS:
        runs = top1.get(task.name) or {}
        if not runs:
            continue
        seeds = sorted(runs)
        values = [float(runs[s]) for s in seeds]
        mean, std = mean_std(values)
        tasks[task.name] = dict(mean=mean, std=std, seeds=seeds, values=values)
    groups = {}
    for group in GROUPS:
        names = [t.name for t in TASKS if t.group == group]
        if all(n in tasks for n in names):
            groups[group] = dict(
                mean=math.fsum(tasks[n]['mean'] for n in names) / len(names),
                std=math.fsum(tasks[n]['std'] for n in names) / len(names),
                tasks=len(names))
    return dict(tasks=tasks, groups=groups)


def _fmt(cell: Optional[Tuple[float, float]]) -> str:
    return '-' if cell is None else f'{cell[0]:.2f}±{cell[1]:.2f}'


def format_params(params: Optional[int]) -> str:
    """``2.6M`` as the paper prints #Param (``12.3K`` below 0.1M)."""
    if params is None:
        return '-'
    return f'{params / 1e6:.1f}M' if params >= 100_000 else f'{params / 1e3:.1f}K'


def format_markdown(summary: dict, backbone: Optional[str], method: Optional[str],
                    params: Optional[int], groups: Iterable[str] = GROUPS,
                    with_paper: bool = False, label: Optional[str] = None) -> str:
    """One markdown table per group, columns in the paper's order, the group average
    last; our row, and the paper's row for the same backbone and method beside it if
    ``with_paper`` and the paper has one.

    Args:
        summary (dict): From :func:`summarize`.
        backbone (str, optional): ``'resnet50'``, ``'convnext_s'``, ``'convnext_b'``.
        method (str, optional): The adapter method (``'colora'``, ``'full'``...).
        params (int, optional): Trainable backbone parameters (#Param).
        groups: The groups to show. Defaults to all three.
        with_paper (bool): Add the paper's row. Defaults to False.
        label (str, optional): Our row's method cell. Defaults to the method's name
            and the number of seeds.
    """
    paper = paper_row(backbone, method) if with_paper and backbone and method else None
    bb_name = BACKBONE_NAMES.get(backbone, backbone or '?')
    name = METHOD_NAMES.get(method, method or '?')
    seeds = sorted({len(t['seeds']) for t in summary['tasks'].values()})
    if label is None:
        runs = '/'.join(str(s) for s in seeds) if seeds else '0'
        label = f'{name} (ours, {runs} seed{"" if seeds == [1] else "s"})'
    blocks = []
    for group in groups:
        names = [t for t in TASKS if t.group == group]
        header = ['Backbone', 'Method', '#Param'] + [t.column for t in names] + ['Average']
        ours = [bb_name, label, format_params(params)]
        for t in names:
            r = summary['tasks'].get(t.name)
            ours.append(_fmt(None if r is None else (r['mean'], r['std'])))
        g = summary['groups'].get(group)
        ours.append(_fmt(None if g is None else (g['mean'], g['std'])))
        rows = [ours]
        if paper is not None:
            rows.append([bb_name, f'{name} (paper)', paper['params']]
                        + [_fmt(paper['tasks'][t.name]) for t in names]
                        + [_fmt(paper['groups'][group])])
        lines = [f'### VTAB-1k {group.capitalize()} ({TABLE_OF_GROUP[group]}), '
                 'top-1 accuracy (%)', '',
                 '| ' + ' | '.join(header) + ' |',
                 '| ' + ' | '.join(['---'] * 2 + ['---:'] * (len(header) - 2)) + ' |']
        lines += ['| ' + ' | '.join(r) + ' |' for r in rows]
        blocks.append('\n'.join(lines))
    return '\n\n'.join(blocks) + '\n'


def group_of_tasks(task_names: Iterable[str]) -> List[str]:
    """The groups (in order) that hold any of the given tasks."""
    wanted = set(task_names)
    return [g for g in GROUPS if any(t.name in wanted for t in TASKS if t.group == g)]
