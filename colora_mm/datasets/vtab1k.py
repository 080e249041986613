"""``VTAB1k``: one VTAB-1k task and split, read by mmpretrain's ``CustomDataset``.

The task folder becomes the dataset's ``data_root`` and the split file its
``ann_file``; every line of it, ``relative/path label``, is one sample. The split file
is checked as it is read (labels within the task's classes, one clear error naming the
file and line otherwise). Registered in mmpretrain's ``DATASETS``::

    dataset=dict(type='VTAB1k', data_root='data/vtab-1k', task='dtd',
                 split='train800val200', pipeline=[...])
"""
from __future__ import annotations

import os.path as osp

from mmpretrain.datasets import CustomDataset
from mmpretrain.registry import DATASETS

from .vtab1k_layout import SPLITS, VTABLayoutError, get_task, read_split


@DATASETS.register_module()
class VTAB1k(CustomDataset):
    """One task and split of VTAB-1k.

    Args:
        data_root (str): The VTAB-1k root, holding one folder per task.
        task (str): The task (folder name such as ``'oxford_iiit_pet'``, or the paper's
            column name such as ``'Pets'``).
        split (str): ``'train800val200'``, ``'train800'``, ``'val200'`` or ``'test'``.
            Defaults to 'train800val200'.
        **kwargs: ``CustomDataset``'s other arguments (``pipeline``, ``test_mode``...).
    """

    def __init__(self, data_root: str, task: str, split: str = 'train800val200',
                 **kwargs) -> None:
        for key in ('ann_file', 'data_prefix', 'with_label'):
            if key in kwargs:
                raise ValueError(f'VTAB1k: {key} follows from task and split; remove '
                                 f'{key}={kwargs[key]!r} from the dataset config.')
        if split not in SPLITS:
            raise ValueError(f'VTAB1k: split={split!r}; one of {", ".join(SPLITS)}.')
        self.task = get_task(task)
        self.split = split
        folder = osp.join(data_root, self.task.name)
        if not osp.isdir(folder):
            raise VTABLayoutError(
                f'VTAB1k: task folder {folder} does not exist; put VTAB-1k under '
                f'{data_root} as docs/data.md shows, or set the dataset\'s data_root.')
        super().__init__(data_root=folder, ann_file=f'{split}.txt', with_label=True,
                         **kwargs)

    def load_data_list(self):
        samples = read_split(self.ann_file, self.task.num_classes)
        return [dict(img_path=osp.join(self.img_prefix, rel), gt_label=label)
                for rel, label in samples]
