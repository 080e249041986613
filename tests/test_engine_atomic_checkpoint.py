"""AtomicCheckpointHook on a tiny mmengine Runner whose training is random (dropout,
random augmentation in the dataset, shuffled batches, validation that draws random
numbers too):

* resume is exact: the resumed run's losses and final weights equal the uninterrupted
  run's bit for bit, on 1 and on 2 processes (gloo), while mmengine's own
  CheckpointHook resumes into another run;
* a kill at any point of a save (simulated by failing that step) leaves a work dir
  that ``resume=True`` continues to the uninterrupted run's weights;
* a truncated newest checkpoint is skipped, with one line saying which and why.
"""
import glob
import os
import os.path as osp
import random
import socket
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

pytest.importorskip('mmengine')
from mmengine.evaluator import BaseMetric  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.model import BaseModel  # noqa: E402

import colora_mm  # noqa: E402,F401
from colora_mm.engine import AtomicCheckpointHook  # noqa: E402
from colora_mm.engine import checkpoint_hook as hook_module  # noqa: E402
from colora_mm.engine.checkpoint_hook import (RNG_KEY,  # noqa: E402
                                              find_resumable_checkpoint)

MAX_ITERS = 6
MAX_EPOCHS = 3


class DropoutNet(BaseModel):

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 32)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(32, 2)

    def forward(self, inputs, targets, mode='tensor'):
        out = self.fc2(self.drop(torch.relu(self.fc1(inputs))))
        if mode == 'loss':
            return dict(loss=((out - targets)**2).mean())
        return out


class NoisyData(torch.utils.data.Dataset):
    """Fixed samples with a random augmentation drawn from NumPy and Python."""

    def __init__(self, n=12):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = torch.randn(n, 2, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i] + 0.1 * torch.from_numpy(np.random.randn(4).astype(np.float32))
        if random.random() < 0.5:
            x = -x
        return dict(inputs=x, targets=self.y[i])


class OutputSum(BaseMetric):
    default_prefix = 'toy'

    def process(self, data_batch, data_samples):
        self.results.append(float(sum(s.sum() for s in data_samples)))

    def compute_metrics(self, results):
        return dict(sum=sum(results))


class LossRecorder(Hook):

    def __init__(self):
        self.losses = {}

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.losses[runner.iter + 1] = float(torch.as_tensor(outputs['loss']).detach())


_names = iter(range(10**6))


def make_runner(work_dir, hook_type='AtomicCheckpointHook', interval=3, max_keep=-1,
                by_epoch=False, **kwargs):
    from mmengine.runner import Runner
    kwargs.setdefault('randomness', dict(seed=0))
    torch.manual_seed(1000)   # the model's initial weights; then the seed below
    loader = dict(dataset=NoisyData(), batch_size=4, num_workers=0,
                  sampler=dict(type='DefaultSampler', shuffle=True),
                  collate_fn=dict(type='default_collate'))
    recorder = LossRecorder()
    runner = Runner(
        model=DropoutNet(),
        work_dir=str(work_dir),
        experiment_name=f'atomic_ckpt_{os.getpid()}_{next(_names)}',
        train_dataloader=loader,
        val_dataloader=loader,
        val_evaluator=[OutputSum()],
        train_cfg=(dict(by_epoch=True, max_epochs=MAX_EPOCHS, val_interval=interval)
                   if by_epoch else
                   dict(by_epoch=False, max_iters=MAX_ITERS, val_interval=interval)),
        val_cfg=dict(),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=0.01)),
        default_hooks=dict(
            checkpoint=dict(type=hook_type, interval=interval, by_epoch=by_epoch,
                            max_keep_ckpts=max_keep),
            logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=[recorder],
        log_level='INFO',
        **kwargs)
    return runner, recorder


def weights(runner):
    model = runner.model.module if hasattr(runner.model, 'module') else runner.model
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp('atomic_uninterrupted')
    runner, recorder = make_runner(root, interval=3)
    runner.train()
    return dict(root=root, weights=weights(runner), losses=dict(recorder.losses))


def test_checkpoint_carries_generators_and_settings(uninterrupted):
    ckpt = torch.load(uninterrupted['root'] / 'iter_3.pth', weights_only=False)
    states = ckpt[RNG_KEY]
    assert len(states) == 1 and set(states[0]) >= {'python', 'numpy', 'torch'}
    assert ckpt['meta']['adapter_settings'] == {}     # no adapted backbone here
    assert not glob.glob(str(uninterrupted['root'] / '*.part'))


def test_resume_is_exact_with_dropout_and_validation(uninterrupted, tmp_path):
    runner, recorder = make_runner(tmp_path, resume=True,
                                   load_from=str(uninterrupted['root'] / 'iter_3.pth'))
    runner.train()
    assert sorted(recorder.losses) == [4, 5, 6]
    for it, loss in recorder.losses.items():
        assert loss == uninterrupted['losses'][it], it
    assert_same_weights(weights(runner), uninterrupted['weights'])


def test_epoch_based_resume_is_exact(tmp_path):
    """The detection configs' loop: checkpoints after every epoch, validation too."""
    full, full_rec = make_runner(tmp_path / 'full', interval=1, by_epoch=True)
    full.train()
    resumed, rec = make_runner(tmp_path / 'resumed', interval=1, by_epoch=True,
                               resume=True,
                               load_from=str(tmp_path / 'full' / 'epoch_1.pth'))
    resumed.train()
    assert sorted(rec.losses) == [4, 5, 6, 7, 8, 9]    # epochs 2 and 3, 3 batches each
    for it, loss in rec.losses.items():
        assert loss == full_rec.losses[it], it
    assert_same_weights(weights(resumed), weights(full))


def test_mmengine_checkpoint_hook_resumes_into_another_run(tmp_path):
    """The same runs with mmengine's CheckpointHook: the resumed run differs (this is
    what the test above would see without the generators)."""
    full, full_rec = make_runner(tmp_path / 'full', hook_type='CheckpointHook')
    full.train()
    resumed, rec = make_runner(tmp_path / 'resumed', hook_type='CheckpointHook',
                               resume=True, load_from=str(tmp_path / 'full' / 'iter_3.pth'))
    resumed.train()
    assert any(rec.losses[it] != full_rec.losses[it] for it in rec.losses)


class Killed(BaseException):
    """A kill: nothing in the save path catches it."""


def _kill_during_write(monkeypatch):
    import mmengine.runner.runner as runner_module
    upstream = runner_module.save_checkpoint

    def save(checkpoint, filename, *args, **kwargs):
        if 'iter_4.pth' in filename:
            with open(filename, 'wb') as f:
                f.write(b'PK\x03\x04 half a checkpoint')
            raise Killed
        return upstream(checkpoint, filename, *args, **kwargs)

    monkeypatch.setattr(runner_module, 'save_checkpoint', save)


def _kill_before_rename(monkeypatch):
    upstream = os.replace

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith('iter_4.pth'):
            raise Killed
        return upstream(src, dst, *args, **kwargs)

    monkeypatch.setattr(hook_module.os, 'replace', replace)


def _kill_while_writing_last_checkpoint(monkeypatch):
    import mmengine.hooks.checkpoint_hook as upstream_module

    writes = []

    def fake_open(path, mode='r', *args, **kwargs):
        if str(path).endswith('last_checkpoint') and 'w' in mode:
            writes.append(path)
            if len(writes) == 4:          # the save of iter_4.pth
                open(path, 'w').close()   # truncated, then the process dies
                raise Killed
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(upstream_module, 'open', fake_open, raising=False)


def _kill_before_deleting(monkeypatch):
    from mmengine.fileio.backends import LocalBackend
    upstream = LocalBackend.remove

    def remove(self, path):
        if str(path).endswith('iter_3.pth'):   # deleted once iter_4.pth is complete
            raise Killed
        return upstream(self, path)

    monkeypatch.setattr(LocalBackend, 'remove', remove)


KILLS = {'writing the file': _kill_during_write,
         'before the rename': _kill_before_rename,
         'writing last_checkpoint': _kill_while_writing_last_checkpoint,
         'before deleting the old checkpoint': _kill_before_deleting}


@pytest.fixture(scope='module')
def uninterrupted_every_iter(tmp_path_factory):
    root = tmp_path_factory.mktemp('atomic_every_iter')
    runner, recorder = make_runner(root, interval=1, max_keep=1)
    runner.train()
    return dict(weights=weights(runner), losses=dict(recorder.losses),
                files=sorted(p for p in os.listdir(root) if p.endswith('.pth')))


@pytest.mark.parametrize('kill', sorted(KILLS))
def test_a_kill_during_a_save_leaves_a_resumable_work_dir(
        kill, uninterrupted_every_iter, tmp_path, monkeypatch):
    assert uninterrupted_every_iter['files'] == ['iter_6.pth']   # max_keep_ckpts=1
    with monkeypatch.context() as patch:
        KILLS[kill](patch)
        runner, _ = make_runner(tmp_path, interval=1, max_keep=1)
        with pytest.raises(Killed):
            runner.train()
    path, _, skipped = find_resumable_checkpoint(str(tmp_path))
    assert path is not None and not skipped
    assert osp.basename(path) in ('iter_3.pth', 'iter_4.pth')
    resumed, recorder = make_runner(tmp_path, interval=1, max_keep=1, resume=True)
    resumed.train()
    for it, loss in recorder.losses.items():
        assert loss == uninterrupted_every_iter['losses'][it], (kill, it)
    assert_same_weights(weights(resumed), uninterrupted_every_iter['weights'])
    # the resumed run deletes what it replaces (a checkpoint the kill kept from
    # being deleted stays: nothing is deleted that the run does not account for)
    files = sorted(p for p in os.listdir(tmp_path) if p.endswith('.pth'))
    assert files[-1] == 'iter_6.pth' and 'iter_5.pth' not in files, files
    assert not glob.glob(str(tmp_path / '*.part'))


def test_truncated_newest_checkpoint_resumes_from_the_previous(uninterrupted, tmp_path):
    first, _ = make_runner(tmp_path, interval=1)
    first.train()
    newest = tmp_path / f'iter_{MAX_ITERS}.pth'
    data = newest.read_bytes()
    newest.write_bytes(data[:len(data) // 2])
    path, _, skipped = find_resumable_checkpoint(str(tmp_path))
    assert osp.basename(path) == f'iter_{MAX_ITERS - 1}.pth'
    assert len(skipped) == 1 and str(newest) in skipped[0]
    assert 'cannot be read' in skipped[0]

    resumed, recorder = make_runner(tmp_path, interval=1, resume=True)
    resumed.train()
    assert sorted(recorder.losses) == [MAX_ITERS]
    logs = ''.join(open(p).read() for p in glob.glob(str(tmp_path / '*' / '*.log')))
    lines = [line for line in logs.splitlines() if 'resume: skipped' in line]
    assert len(lines) == 1 and str(newest) in lines[0] and 'cannot be read' in lines[0]
    assert f'resuming from {tmp_path / f"iter_{MAX_ITERS - 1}.pth"}' in lines[0]
    # the rewritten newest checkpoint is complete again
    assert find_resumable_checkpoint(str(tmp_path))[0] == str(newest)


def test_a_relative_work_dir_lists_each_checkpoint_once(tmp_path, monkeypatch):
    """``last_checkpoint`` holds an absolute path; the work dir given relative is the
    same folder: each file is a candidate once, in the spelling the work dir gives."""
    from colora_mm.engine.checkpoint_hook import checkpoint_candidates
    work = tmp_path / 'work'
    work.mkdir()
    for step in (1, 2):
        (work / f'iter_{step}.pth').write_bytes(b'x')
    (work / 'last_checkpoint').write_text(str(work / 'iter_2.pth'))
    monkeypatch.chdir(tmp_path)
    assert checkpoint_candidates('work') == ['work/iter_2.pth', 'work/iter_1.pth']
    with pytest.raises(ValueError) as info:
        find_resumable_checkpoint('work')
    assert str(info.value).count('iter_2.pth') == 1


def test_no_checkpoint_loads_is_an_error(tmp_path):
    (tmp_path / 'iter_2.pth').write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match='no checkpoint in .* can be resumed from'):
        find_resumable_checkpoint(str(tmp_path))
    assert find_resumable_checkpoint(str(tmp_path / 'empty')) == (None, None, [])


def test_best_checkpoints_are_replaced_after_the_new_one_is_complete(tmp_path):
    from mmengine.runner import Runner
    runner, _ = make_runner(tmp_path, interval=1)
    hook = [h for h in runner.hooks if isinstance(h, AtomicCheckpointHook)][0]
    hook.__init__(interval=1, by_epoch=False, save_best='toy/sum', rule='greater',
                  max_keep_ckpts=2)
    written = []
    upstream = Runner.save_checkpoint

    def recording_save(self, out_dir, filename, *args, **kwargs):
        present = sorted(p for p in os.listdir(out_dir) if p.startswith('best_'))
        written.append((filename, present))
        return upstream(self, out_dir, filename, *args, **kwargs)

    Runner.save_checkpoint = recording_save
    try:
        runner.train()
    finally:
        Runner.save_checkpoint = upstream
    best = [p for p in os.listdir(tmp_path) if p.startswith('best_')]
    assert len(best) == 1 and not glob.glob(str(tmp_path / '*.part'))
    assert torch.load(tmp_path / best[0], weights_only=False)[RNG_KEY]
    # every new best checkpoint was written while the previous one still existed
    best_writes = [present for filename, present in written
                   if filename.startswith('best_')]
    assert len(best_writes) >= 2 and best_writes[0] == []
    assert all(len(present) == 1 for present in best_writes[1:]), written
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith('iter_')) == [
        'iter_5.pth', 'iter_6.pth']


def test_other_arguments_are_checkpoint_hooks():
    hook = AtomicCheckpointHook(interval=5, by_epoch=False, max_keep_ckpts=2,
                                save_best='acc', filename_tmpl='ckpt_{}.pth')
    assert (hook.interval, hook.max_keep_ckpts, hook.filename_tmpl) == (5, 2,
                                                                        'ckpt_{}.pth')


# ------------------------------------------------------------------ two processes
def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, out_dir):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      OMP_NUM_THREADS='1')
    torch.set_num_threads(1)
    from colora_mm.compat import cpu_ddp_wrapper_cfg
    dist = dict(launcher='pytorch', env_cfg=dict(dist_cfg=dict(backend='gloo')),
                cfg=dict(model_wrapper_cfg=cpu_ddp_wrapper_cfg()),
                randomness=dict(seed=0, diff_rank_seed=True))
    out = {}
    full, full_rec = make_runner(osp.join(out_dir, 'full'), **dist)
    full.train()
    resumed, rec = make_runner(osp.join(out_dir, 'resumed'), resume=True,
                               load_from=osp.join(out_dir, 'full', 'iter_3.pth'), **dist)
    resumed.train()
    out = dict(full_losses=full_rec.losses, losses=rec.losses, full=weights(full),
               resumed=weights(resumed))
    torch.save(out, osp.join(out_dir, f'rank{rank}.pt'))
    # as the tools end a distributed run: the runners dropped, then the group closed,
    # so that gloo's threads end before the interpreter's shutdown (where one aborted
    # the process: 'terminate called without an active exception')
    sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'tools'))
    from train import close_process_group
    del full, resumed, full_rec, rec, out
    close_process_group()


@pytest.mark.skipif(torch.cuda.is_available(), reason='the CPU (gloo) path')
def test_resume_is_exact_on_two_processes(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f'rank{r}.pt', weights_only=False) for r in (0, 1)]
    for res in results:
        assert sorted(res['losses']) == [4, 5, 6]
        for it, loss in res['losses'].items():
            assert loss == res['full_losses'][it], it
        assert_same_weights(res['resumed'], res['full'])
    # each rank has its own generators (diff_rank_seed) and data; DDP kept the
    # replicas identical
    assert results[0]['full_losses'] != results[1]['full_losses']
    assert_same_weights(results[0]['full'], results[1]['full'])
    ckpt = torch.load(tmp_path / 'full' / 'iter_3.pth', weights_only=False)
    assert len(ckpt[RNG_KEY]) == 2
    assert not torch.equal(ckpt[RNG_KEY][0]['torch'], ckpt[RNG_KEY][1]['torch'])
