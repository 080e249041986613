"""Datasets: VTAB-1k (:mod:`.vtab1k_layout` the tasks and the folder layout, standard
library only; :mod:`.vtab1k` the mmpretrain dataset ``VTAB1k``)."""
from .vtab1k import VTAB1k
from .vtab1k_layout import (GROUPS, SPLITS, TASKS, TASKS_BY_NAME, VTABLayoutError,
                            VTABTask, check_task, get_task, read_split, resolve_tasks)

__all__ = ['GROUPS', 'SPLITS', 'TASKS', 'TASKS_BY_NAME', 'VTAB1k', 'VTABLayoutError',
           'VTABTask', 'check_task', 'get_task', 'read_split', 'resolve_tasks']
