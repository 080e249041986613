"""AtomicCheckpointHook: mmengine's ``CheckpointHook`` whose checkpoints survive a kill
and whose resume continues the run exactly.

mmengine 0.10.7's hook deletes the checkpoint beyond ``max_keep_ckpts`` *before* it
writes the new one, writes straight into the final file name and records it in
``last_checkpoint`` first: a run killed during a save can be left with no complete
checkpoint at all. Its resume reads ``last_checkpoint`` blindly, and no random
generator state is saved, so a resumed run with dropout or random augmentation draws
other numbers than the uninterrupted run did.

This hook takes exactly ``CheckpointHook``'s arguments and behaves the same, except:

* every checkpoint (periodic and best) is written to ``NAME.part`` in the same folder,
  flushed to disk (``fsync``) and renamed into place (``os.replace``, atomic);
  ``last_checkpoint`` is written after that, and the checkpoints it replaces
  (``max_keep_ckpts``, a previous best) are deleted only after both;
* each checkpoint carries the random generator states of every process
  (``checkpoint['rng_states']``: Python, NumPy, torch CPU and CUDA, in rank order) and
  the model's adapter settings (``meta['adapter_settings']``,
  :mod:`colora_mm.engine.adapter_settings`);
* on resume the generators are restored at the point where the uninterrupted run
  drew its next number: after the iteration-based loop has skipped the batches it
  had already used, before the next one is loaded;
* validation leaves the training generators as it found them (it draws nothing from
  the training run's streams), so a run resumed at a validation step stays exact;
* ``resume=True`` without a checkpoint named resumes from the newest checkpoint that
  loads (:func:`find_resumable_checkpoint`), with one logged line naming any damaged
  newer checkpoint it skipped and why.

Registered in mmengine's root ``HOOKS``: ``default_hooks=dict(checkpoint=dict(
type='AtomicCheckpointHook', interval=..., max_keep_ckpts=...))``.
"""
from __future__ import annotations

import contextlib
import functools
import os
import os.path as osp
import re
from typing import Dict, List, Optional, Tuple

from mmengine.dist import get_dist_info, is_main_process
from mmengine.fileio.backends import LocalBackend
from mmengine.hooks import CheckpointHook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from mmengine.runner import IterBasedTrainLoop

from .adapter_settings import META_KEY, adapter_settings
from .rng import gather_rng_states, rng_state, set_rng_state

#: The checkpoint key of the per-rank generator states.
RNG_KEY = 'rng_states'
#: Suffix of a checkpoint being written.
PART_SUFFIX = '.part'
_DEFAULT_TEMPLATES = ('iter_{}.pth', 'epoch_{}.pth')


def _template_pattern(template: str) -> 're.Pattern':
    return re.compile('^' + re.escape(template).replace(r'\{\}', r'(\d+)') + '$')


def _fsync_path(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_file(part: str, path: str) -> None:
    """Flush ``part`` to disk, rename it to ``path`` (atomic on one file system) and
    flush the folder entry, so that ``path`` is either the old or the complete new
    file, also after a crash."""
    _fsync_path(part)
    os.replace(part, path)
    _fsync_path(osp.dirname(osp.abspath(path)), directory=True)


def checkpoint_candidates(work_dir: str, templates=()) -> List[str]:
    """Checkpoints of a work dir, newest first: the file ``last_checkpoint`` names and
    every file of its folder and of ``work_dir`` named like ``iter_N.pth`` or
    ``epoch_N.pth`` (or one of ``templates``), ordered by N, then by time."""
    patterns = [_template_pattern(t) for t in (*templates, *_DEFAULT_TEMPLATES)]
    folders = [work_dir]
    named = None
    last = osp.join(work_dir, 'last_checkpoint')
    if osp.isfile(last):
        with open(last) as f:
            named = f.read().strip() or None
        if named:
            folders.append(osp.dirname(named) or work_dir)
    # one entry per file, by its real path: the work dir as given (relative, say) and
    # the folder of the absolute path in last_checkpoint are often the same folder;
    # each file keeps the first spelling of its path
    found: Dict[str, Tuple[str, int, float]] = {}
    for folder in folders:
        if not osp.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            for pattern in patterns:
                match = pattern.match(name)
                path = osp.normpath(osp.join(folder, name))
                if match and osp.isfile(path):
                    found.setdefault(osp.realpath(path), (
                        path, int(match.group(1)), osp.getmtime(path)))
                    break
    if named and osp.isfile(named):
        found.setdefault(osp.realpath(named), (osp.normpath(named), -1,
                                               osp.getmtime(named)))   # step unknown: last
    return [path for path, *_ in sorted(found.values(), key=lambda e: e[1:],
                                        reverse=True)]


def read_resumable(path: str) -> dict:
    """Load a checkpoint fully and check that a run can resume from it.

    Raises:
        ValueError: why it cannot (unreadable, truncated, no model or no iteration).
    """
    from colora_mm.compat import load_from_local_trusted
    try:
        checkpoint = load_from_local_trusted(path, map_location='cpu')
    except Exception as err:  # noqa: BLE001 - any failure to unpickle: damaged
        raise ValueError(f'cannot be read: {type(err).__name__}: '
                         f'{str(err).splitlines()[0] if str(err) else ""}'.rstrip(': '))
    if not isinstance(checkpoint, dict) or 'state_dict' not in checkpoint:
        raise ValueError('holds no model state_dict')
    meta = checkpoint.get('meta')
    if not isinstance(meta, dict) or 'iter' not in meta or 'epoch' not in meta:
        raise ValueError("has no meta['iter'] and meta['epoch'] to resume at")
    return checkpoint


def find_resumable_checkpoint(work_dir: str, templates=()
                              ) -> Tuple[Optional[str], Optional[dict], List[str]]:
    """The newest checkpoint of ``work_dir`` that loads.

    Returns:
        tuple: ``(path, checkpoint, skipped)``: the path and the loaded checkpoint
        (both None when the work dir holds no checkpoint), and one ``'PATH (why)'`` per
        newer checkpoint that was skipped.

    Raises:
        ValueError: there are checkpoints, and none of them loads.
    """
    skipped = []
    for path in checkpoint_candidates(work_dir, templates):
        try:
            return path, read_resumable(path), skipped
        except ValueError as err:
            skipped.append(f'{path} ({err})')
    if skipped:
        raise ValueError(f'no checkpoint in {work_dir} can be resumed from: '
                         + '; '.join(skipped))
    return None, None, skipped


def describe_skipped(skipped: List[str], chosen: str) -> str:
    """The one line that says which damaged checkpoints a resume skipped."""
    return f'resume: skipped {"; ".join(skipped)}; resuming from {chosen}'


class _RestoreAfterSkip:
    """Stands in for ``IterBasedTrainLoop.dataloader_iterator`` while the resumed loop
    skips the batches the run had already used (loading them draws random numbers
    for the augmentations); after the last one it puts the iterator back and calls
    ``restore``, so the next batch is loaded with the generators of the checkpoint."""

    def __init__(self, loop, restore) -> None:
        self.loop = loop
        self.iterator = loop.dataloader_iterator
        self.remaining = loop.iter
        self.restore = restore

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.iterator)
        self.remaining -= 1
        if self.remaining <= 0:
            self.loop.dataloader_iterator = self.iterator
            self.restore()
        return batch


class _DeferredRemovals:
    """The hook's file backend, with ``remove``/``rmtree`` recorded instead of done."""

    def __init__(self, backend, pending: list) -> None:
        self._backend = backend
        self._pending = pending

    def remove(self, path) -> None:
        self._pending.append(('remove', path))

    def rmtree(self, path) -> None:
        self._pending.append(('rmtree', path))

    def __getattr__(self, name):
        return getattr(self._backend, name)


@HOOKS.register_module()
class AtomicCheckpointHook(CheckpointHook):
    """``CheckpointHook`` (same arguments, same files) with atomic saves, deletions
    after the new checkpoint is complete, the random generators saved and restored,
    and a resume that skips damaged checkpoints (see the module docstring).

    Args:
        **kwargs: mmengine ``CheckpointHook``'s arguments (``interval``,
            ``by_epoch``, ``max_keep_ckpts``, ``save_best``, ``out_dir``,
            ``filename_tmpl``...). ``out_dir`` must be a local folder.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._pending_removals: Optional[list] = None
        self._rng_to_save: Optional[list] = None
        self._rng_before_val: Optional[dict] = None
        self._loaded_rng: Optional[list] = None
        self._restore_at_epoch = None

    # ------------------------------------------------------------------ resume
    def before_run(self, runner) -> None:
        """``resume=True`` without a checkpoint: pick the newest one that loads."""
        if not getattr(runner, '_resume', False) or runner._load_from is not None:
            return
        path, _, skipped = find_resumable_checkpoint(runner.work_dir,
                                                     (self.filename_tmpl, ))
        if path is not None:
            runner._load_from = path   # Runner.load_or_resume resumes from it
            if skipped:
                runner.logger.warning(describe_skipped(skipped, path))

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self._loaded_rng = checkpoint.get(RNG_KEY)

    def before_train(self, runner) -> None:
        super().before_train(runner)
        backend = getattr(self.file_backend, 'client', self.file_backend)  # FileClient
        if not isinstance(backend, LocalBackend):
            raise ValueError(
                f'AtomicCheckpointHook writes to local folders; out_dir={self.out_dir} '
                f'is served by {type(backend).__name__}. Use '
                "type='CheckpointHook' for remote storage.")
        if is_main_process() and osp.isdir(self.out_dir):
            # parts of checkpoints whose save a killed run did not finish
            ours = _template_pattern(self.filename_tmpl + PART_SUFFIX)
            for name in os.listdir(self.out_dir):
                if ours.match(name) or (name.startswith('best_')
                                        and name.endswith(PART_SUFFIX)):
                    os.remove(osp.join(self.out_dir, name))
        states, self._loaded_rng = self._loaded_rng, None
        if runner.iter == 0 and runner.epoch == 0:
            return
        if states is None:
            runner.logger.warning(
                'AtomicCheckpointHook: the resumed checkpoint holds no random generator '
                'states (written by another hook); the resumed run draws other random '
                'numbers than the original.')
            return
        rank, world_size = get_dist_info()
        if len(states) != world_size:
            runner.logger.warning(
                f'AtomicCheckpointHook: the checkpoint holds the random generators of '
                f'{len(states)} processes, this run has {world_size}: not restored, '
                'the resumed run draws other random numbers than the original.')
            return
        restore = functools.partial(self._restore_rng, runner, states[rank])
        loop = runner.train_loop
        if isinstance(loop, IterBasedTrainLoop) and loop.iter > 0:
            loop.dataloader_iterator = _RestoreAfterSkip(loop, restore)
        else:
            self._restore_at_epoch = restore

    def before_train_epoch(self, runner) -> None:
        restore = self._restore_at_epoch
        if restore is not None:
            self._restore_at_epoch = None
            restore()

    def _restore_rng(self, runner, state: dict) -> None:
        problem = set_rng_state(state)
        where = f'iteration {runner.iter}' + (f', epoch {runner.epoch}'
                                              if runner.epoch else '')
        runner.logger.info(f'AtomicCheckpointHook: random generators restored to '
                           f'{where} of the checkpoint'
                           + (f' (CUDA not restored: {problem})' if problem else ''))

    # ------------------------------------------------------------------ validation
    def before_val(self, runner) -> None:
        self._rng_before_val = rng_state()

    def after_val(self, runner) -> None:
        if self._rng_before_val is not None:
            set_rng_state(self._rng_before_val)
            self._rng_before_val = None

    # ------------------------------------------------------------------ saving
    def _save_checkpoint_with_step(self, runner, step, meta) -> None:
        with self._atomic_saves(runner):
            super()._save_checkpoint_with_step(runner, step, meta)

    def _save_best_checkpoint(self, runner, metrics) -> None:
        with self._atomic_saves(runner):
            super()._save_best_checkpoint(runner, metrics)

    @contextlib.contextmanager
    def _atomic_saves(self, runner):
        """Within the block, the upstream save logic runs unchanged, but its
        ``runner.save_checkpoint`` calls write through :meth:`_save_atomically` and its
        deletions wait until the block has completed (after ``last_checkpoint``)."""
        if self._pending_removals is not None:   # nested: the outer block commits
            yield
            return
        pending: list = []
        backend = self.file_backend
        self._pending_removals = pending
        self.file_backend = _DeferredRemovals(backend, pending)
        # Only this hook's own calls, for the duration of one save, go through the
        # atomic writer; the runner's method is back in place afterwards.
        runner.save_checkpoint = functools.partial(
            self._save_atomically, runner, runner.save_checkpoint)
        try:
            yield
            for method, path in pending:
                if method == 'remove' and backend.isfile(path):
                    backend.remove(path)
                elif method == 'rmtree' and backend.isdir(path):
                    backend.rmtree(path)
        finally:
            del runner.save_checkpoint
            self.file_backend = backend
            self._pending_removals = None

    def _save_atomically(self, runner, save, out_dir, filename, *args, **kwargs):
        # A collective call: every rank contributes its generators (the state from
        # before validation when a best checkpoint is saved during validation).
        self._rng_to_save = gather_rng_states(self._rng_before_val)
        try:
            part = filename + PART_SUFFIX
            save(out_dir, part, *args, **kwargs)   # mmengine: rank 0 writes
            if is_main_process():
                commit_file(osp.join(out_dir, part), osp.join(out_dir, filename))
        finally:
            self._rng_to_save = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        checkpoint.setdefault('meta', {})[META_KEY] = adapter_settings(model)
        if self._rng_to_save is not None:
            checkpoint[RNG_KEY] = self._rng_to_save
