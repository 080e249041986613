"""A hook that kills its own process (SIGKILL, no clean-up) once, after a given epoch's
checkpoint is written: what a stopped job looks like to the resume logic."""
import os
import os.path as osp
import signal

from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class KillOnceAfterEpochHook(Hook):
    """Args:
        epoch (int): Kill after this epoch (1-based), once its checkpoint is saved.
        marker (str): Written before the kill; while it exists the hook does nothing.
        work_dir_contains (str): Only in runs whose work_dir contains this.
    """

    priority = 'LOWEST'   # after CheckpointHook (VERY_LOW) has saved the epoch

    def __init__(self, epoch: int, marker: str, work_dir_contains: str = '') -> None:
        self.epoch = epoch
        self.marker = marker
        self.work_dir_contains = work_dir_contains

    def after_train_epoch(self, runner) -> None:
        if (runner.epoch + 1 == self.epoch and self.work_dir_contains in runner.work_dir
                and not osp.exists(self.marker)):
            with open(self.marker, 'w') as f:
                f.write(runner.work_dir)
            os.kill(os.getpid(), signal.SIGKILL)
