"""VTAB-1k: the 19 tasks, their groups and class counts, the folder layout, and the
checks of a dataset root. Standard library only (``tools/data/check_data.py`` loads this
file without importing the package).

Layout (the one the PEFT literature distributes, e.g. NOAH's ``vtab-1k`` archive)::

    <root>/<task folder>/train800val200.txt    train800.txt   val200.txt   test.txt
    <root>/<task folder>/<images, any sub-folders>

Every line of a split file is ``relative/path label``: the image path relative to the
task folder and an integer class in ``0 .. num_classes - 1``.

Tasks are listed in the order of the CoLoRA paper's Tables 5-7 (appendix G).
"""
from __future__ import annotations

import os.path as osp
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Iterable, List, Sequence, Tuple

GROUPS = ('natural', 'specialized', 'structured')
SPLITS = ('train800val200', 'train800', 'val200', 'test')
#: Images per split in the VTAB-1k protocol (the test splits differ per task).
SPLIT_SIZES = {'train800val200': 1000, 'train800': 800, 'val200': 200}


@dataclass(frozen=True)
class VTABTask:
    """One VTAB-1k task.

    Attributes:
        name (str): The task folder under the VTAB-1k root, also its name on the
            command line.
        column (str): Its column title in the paper's tables.
        group (str): ``'natural'``, ``'specialized'`` or ``'structured'``.
        num_classes (int): Classes of its label (VTAB's task definition).
    """

    name: str
    column: str
    group: str
    num_classes: int


TASKS: Tuple[VTABTask, ...] = (
    VTABTask('caltech101', 'Caltech101', 'natural', 102),
    VTABTask('cifar', 'CIFAR-100', 'natural', 100),
    VTABTask('dtd', 'DTD', 'natural', 47),
    VTABTask('oxford_flowers102', 'Flowers102', 'natural', 102),
    VTABTask('oxford_iiit_pet', 'Pets', 'natural', 37),
    VTABTask('sun397', 'Sun397', 'natural', 397),
    VTABTask('svhn', 'SVHN', 'natural', 10),
    VTABTask('patch_camelyon', 'Camelyon', 'specialized', 2),
    VTABTask('eurosat', 'EuroSAT', 'specialized', 10),
    VTABTask('resisc45', 'Resisc45', 'specialized', 45),
    VTABTask('diabetic_retinopathy', 'Retinopathy', 'specialized', 5),
    VTABTask('clevr_count', 'Clevr-Count', 'structured', 8),
    VTABTask('clevr_dist', 'Clevr-Dist', 'structured', 6),
    VTABTask('dmlab', 'DMLab', 'structured', 6),
    VTABTask('dsprites_loc', 'dSpr-Loc', 'structured', 16),
    VTABTask('dsprites_ori', 'dSpr-Ori', 'structured', 16),
    VTABTask('kitti', 'KITTI-Dist', 'structured', 4),
    VTABTask('smallnorb_azi', 'sNORB-Azim', 'structured', 18),
    VTABTask('smallnorb_ele', 'sNORB-Elev', 'structured', 9),
)
TASKS_BY_NAME: Dict[str, VTABTask] = OrderedDict((t.name, t) for t in TASKS)


class VTABLayoutError(ValueError):
    """A VTAB-1k root that does not have the expected layout; the message names the
    file (and line) and the fix."""


def _lookup() -> Dict[str, VTABTask]:
    table = {}
    for task in TASKS:
        for key in (task.name, task.column):
            table[key.lower()] = task
    return table


def get_task(name: str) -> VTABTask:
    """The task called ``name`` (its folder name or its paper column, any case).

    Raises:
        VTABLayoutError: unknown name.
    """
    task = _lookup().get(str(name).lower())
    if task is None:
        raise VTABLayoutError(
            f'unknown VTAB-1k task {name!r}; the tasks are '
            f'{", ".join(t.name for t in TASKS)} (or a group: {", ".join(GROUPS)}, all)')
    return task


def resolve_tasks(names: Iterable[str]) -> List[VTABTask]:
    """Tasks from command-line words: ``all``, a group name, or task names; in the
    paper's order, each once.

    Raises:
        VTABLayoutError: an unknown word.
    """
    wanted = set()
    for word in names:
        key = str(word).lower()
        if key == 'all':
            wanted.update(t.name for t in TASKS)
        elif key in GROUPS:
            wanted.update(t.name for t in TASKS if t.group == key)
        else:
            wanted.add(get_task(word).name)
    if not wanted:
        raise VTABLayoutError('no VTAB-1k task selected; give all, a group '
                              f'({", ".join(GROUPS)}) or task names')
    return [t for t in TASKS if t.name in wanted]


def split_file(root: str, task: VTABTask, split: str) -> str:
    if split not in SPLITS:
        raise VTABLayoutError(f'unknown VTAB-1k split {split!r}; one of '
                              f'{", ".join(SPLITS)}')
    return osp.join(root, task.name, f'{split}.txt')


def read_split(path: str, num_classes: int) -> List[Tuple[str, int]]:
    """``(relative path, label)`` of every line of a split file.

    Raises:
        VTABLayoutError: a missing file, an empty one, a malformed line, or a label
            outside ``0 .. num_classes - 1`` (naming the file and the line).
    """
    if not osp.isfile(path):
        names = ', '.join(s + '.txt' for s in SPLITS)
        raise VTABLayoutError(f'missing split file {path}; every VTAB-1k task folder '
                              f'needs {names} (docs/data.md)')
    samples = []
    try:
        # utf-8-sig: a byte-order mark some editors write is not part of the first path
        with open(path, encoding='utf-8-sig') as f:
            lines = f.readlines()
    except UnicodeDecodeError as err:
        raise VTABLayoutError(f'{path} is not UTF-8 text ({err.reason} at byte '
                              f'{err.start}); write the split file as "path label" lines')
    except OSError as err:
        raise VTABLayoutError(f'cannot read split file {path} ({err.strerror or err}); '
                              'check its permissions') from None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip('-').isdigit():
            raise VTABLayoutError(f'{path}:{number}: {line!r} is not '
                                  '"relative/path label" (label an integer)')
        label = int(parts[1])
        if not 0 <= label < num_classes:
            raise VTABLayoutError(
                f'{path}:{number}: label {label} is out of range 0..{num_classes - 1} '
                f'for a {num_classes}-class task; the file belongs to another task, '
                'or its labels are not 0-based')
        samples.append((parts[0], label))
    if not samples:
        raise VTABLayoutError(f'{path} lists no images')
    return samples


def check_task(root: str, task: VTABTask, splits: Sequence[str] = SPLITS,
               check_images: bool = True) -> Dict[str, int]:
    """Check one task folder: the split files exist and parse, labels are in range,
    every listed image exists. Returns the number of images per split.

    Raises:
        VTABLayoutError: the first problem, as one line naming the file.
    """
    folder = osp.join(root, task.name)
    if not osp.isdir(folder):
        raise VTABLayoutError(f'missing task folder {folder} ({task.column}); put the '
                              'VTAB-1k tasks under one root as docs/data.md shows')
    counts = {}
    for split in splits:
        path = split_file(root, task, split)
        samples = read_split(path, task.num_classes)
        if check_images:
            for rel, _ in samples:
                if not osp.isfile(osp.join(folder, rel)):
                    raise VTABLayoutError(f'{path}: image {osp.join(folder, rel)} '
                                          'does not exist')
        counts[split] = len(samples)
    return counts
