"""colora_mm.compat: each fix is exercised on a tiny mmengine Runner and fails without
the fix (mmengine 0.10.7 on torch >= 2.6 and on CPU-only hosts)."""
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

mmengine = pytest.importorskip('mmengine')
from mmengine.model import BaseModel  # noqa: E402
from mmengine.runner import Runner  # noqa: E402
from mmengine.runner.checkpoint import (CheckpointLoader,  # noqa: E402
                                        _load_checkpoint, load_from_local)

import colora_mm  # noqa: E402,F401  (applies the fixes)
from colora_mm import compat  # noqa: E402
from colora_mm.compat import distributed as compat_dist  # noqa: E402


class ToyModel(BaseModel):
    """y = W2 relu(W1 x), a squared-error loss, BatchNorm for a buffer to restore."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.norm = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, inputs, targets, mode='tensor'):
        out = self.fc2(torch.relu(self.norm(self.fc1(inputs))))
        if mode == 'loss':
            return dict(loss=((out - targets)**2).mean())
        return out


class ToyDataset(torch.utils.data.Dataset):

    def __init__(self, n=16):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = torch.randn(n, 2, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return dict(inputs=self.x[i], targets=self.y[i])


def toy_runner(work_dir, max_iters, name, **kwargs):
    torch.manual_seed(0)
    cfg = dict(
        model=ToyModel(),
        work_dir=str(work_dir),
        experiment_name=name,
        train_dataloader=dict(
            dataset=ToyDataset(),
            sampler=dict(type='DefaultSampler', shuffle=False),
            collate_fn=dict(type='default_collate'),
            batch_size=4,
            num_workers=0),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=0.01)),
        param_scheduler=dict(type='LinearLR', start_factor=0.5, by_epoch=False,
                             begin=0, end=max_iters),
        default_hooks=dict(
            checkpoint=dict(type='CheckpointHook', interval=1, by_epoch=False),
            logger=dict(type='LoggerHook', interval=1)),
        randomness=dict(seed=0),
        log_level='WARNING',
    )
    cfg.update(kwargs)
    return Runner(**cfg)


def _state(runner):
    model = runner.model.module if hasattr(runner.model, 'module') else runner.model
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ checkpoints


def test_local_loader_registered_once():
    assert CheckpointLoader._get_checkpoint_loader('/x/y.pth') is \
        compat.load_from_local_trusted
    assert compat.patch_local_checkpoint_loader() is False  # idempotent
    compat.apply_all()
    assert CheckpointLoader._get_checkpoint_loader('/x/y.pth') is \
        compat.load_from_local_trusted
    # URL schemes keep mmengine's own loaders
    assert CheckpointLoader._get_checkpoint_loader('https://a/b.pth') is not \
        compat.load_from_local_trusted


def test_resume_continues_the_run_exactly(tmp_path):
    full = toy_runner(tmp_path / 'full', 3, 'compat_full')
    full.train()
    assert (tmp_path / 'full' / 'iter_2.pth').is_file()

    resumed = toy_runner(tmp_path / 'resumed', 3, 'compat_resumed', resume=True,
                         load_from=str(tmp_path / 'full' / 'iter_2.pth'))
    resumed.train()
    assert resumed.iter == full.iter == 3
    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.optim_wrapper.get_lr() == full.optim_wrapper.get_lr()


def test_resume_restores_model_optimizer_and_iter(tmp_path):
    first = toy_runner(tmp_path, 2, 'compat_first')
    first.train()
    second = toy_runner(tmp_path / 'second', 2, 'compat_second', resume=True,
                        load_from=str(tmp_path / 'iter_2.pth'))
    second.train()  # resumes at iter 2 of 2: loads, trains nothing more
    assert second.iter == 2
    a, b = _state(first), _state(second)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = first.optim_wrapper.optimizer.state_dict()
    sb = second.optim_wrapper.optimizer.state_dict()
    assert sa['param_groups'] == sb['param_groups']
    for i, st in sa['state'].items():
        for key, value in st.items():
            assert torch.equal(torch.as_tensor(value),
                               torch.as_tensor(sb['state'][i][key])), (i, key)


def test_without_the_fix_mmengine_refuses_its_own_checkpoint(tmp_path):
    runner = toy_runner(tmp_path, 1, 'compat_refused')
    runner.train()
    ckpt = str(tmp_path / 'iter_1.pth')
    CheckpointLoader.register_scheme('', load_from_local, force=True)
    try:
        with pytest.raises(pickle.UnpicklingError, match='[Ww]eights only'):
            _load_checkpoint(ckpt, map_location='cpu')
    finally:
        assert compat.patch_local_checkpoint_loader() is True
    assert 'message_hub' in _load_checkpoint(ckpt, map_location='cpu')


# ------------------------------------------------------------------ distributed


def test_patch_init_dist_installed_once():
    import mmengine.dist.utils as dist_utils
    assert dist_utils._init_dist_pytorch is compat_dist._init_dist_pytorch
    assert compat.patch_init_dist_pytorch() is False


def test_cpu_ddp_wrapper_cfg():
    cfg = compat.cpu_ddp_wrapper_cfg(find_unused_parameters=True)
    assert cfg == dict(type='MMDistributedDataParallel', device_ids=None,
                       broadcast_buffers=False, find_unused_parameters=True)


def test_configure_cpu_ddp(monkeypatch):
    from mmengine.config import Config
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    cfg = Config(dict(launcher='none'))
    assert compat.configure_cpu_ddp(cfg) is False and 'env_cfg' not in cfg
    cfg = Config(dict(launcher='pytorch', env_cfg=dict(dist_cfg=dict(backend='nccl'))))
    assert compat.configure_cpu_ddp(cfg) is True
    assert cfg.env_cfg.dist_cfg.backend == 'gloo'
    assert cfg.model_wrapper_cfg.device_ids is None
    cfg = Config(dict(launcher='pytorch', model_wrapper_cfg=dict(
        type='MMDistributedDataParallel', find_unused_parameters=True)))
    compat.configure_cpu_ddp(cfg)
    assert cfg.model_wrapper_cfg.device_ids is None
    assert cfg.model_wrapper_cfg.find_unused_parameters is True


@pytest.mark.skipif(torch.cuda.is_available(), reason='the failure is CPU-only')
def test_without_the_fix_init_dist_fails_on_cpu(monkeypatch):
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('LOCAL_RANK', '0')
    with pytest.raises((RuntimeError, AssertionError)):
        compat_dist._upstream_init_dist_pytorch('gloo')
    assert not torch.distributed.is_initialized()


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason='exercises the CPU-only path')
def test_two_process_gloo_training_on_cpu(tmp_path):
    """torchrun, 2 processes, gloo, mmengine Runner with launcher='pytorch'."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).parent)] + sys.path))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes=1',
           '--nproc_per_node=2', f'--master_port={_free_port()}',
           __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in (0, 1)]
    for r, res in enumerate(results):
        assert res['rank'] == r and res['world_size'] == 2
        assert res['wrapper'] == 'MMDistributedDataParallel'
        assert res['iter'] == 2
    # DDP keeps the replicas identical, and they moved away from the initial weights
    assert results[0]['params'] == results[1]['params']
    assert results[0]['params'] != results[0]['initial']


def _dist_worker(out_dir):
    """Run under torchrun by the test above."""
    torch.manual_seed(0)
    initial = [p.sum().item() for p in ToyModel().parameters()]
    runner = toy_runner(
        Path(out_dir) / 'work', 2, 'compat_dist', launcher='pytorch',
        env_cfg=dict(dist_cfg=dict(backend='gloo')),
        # Runner reads model_wrapper_cfg from the full config (Runner.from_cfg's cfg)
        cfg=dict(model_wrapper_cfg=compat.cpu_ddp_wrapper_cfg()))
    runner.train()
    params = [p.sum().item() for p in runner.model.module.parameters()]
    Path(out_dir, f'rank{runner.rank}.json').write_text(json.dumps(dict(
        rank=runner.rank, world_size=runner.world_size, iter=runner.iter,
        wrapper=type(runner.model).__name__, params=params, initial=initial)))
    # mmengine leaves the process group open: closed as tools/train.py closes it, the
    # runner dropped first, so that gloo's threads end before the interpreter's
    # shutdown (where they could abort it: 'terminate called without an active
    # exception')
    sys.path.insert(0, str(Path(__file__).parents[1] / 'tools'))
    from train import close_process_group
    del runner
    close_process_group()


if __name__ == '__main__':
    _dist_worker(sys.argv[1])


def _fake_transformers(root, version):
    """A ``transformers`` distribution of ``version`` whose modules lack what
    mmpretrain's multi-modal models import (as transformers 5 does)."""
    pkg = root / 'transformers'
    pkg.mkdir()
    (pkg / '__init__.py').write_text(f'__version__ = {version!r}\n')
    info = root / f'transformers-{version}.dist-info'
    info.mkdir()
    (info / 'METADATA').write_text(
        f'Metadata-Version: 2.1\nName: transformers\nVersion: {version}\n')
    (info / 'RECORD').write_text('')


def test_mmpretrain_models_import_with_transformers_5(tmp_path):
    import subprocess
    import sys
    _fake_transformers(tmp_path, '5.1.0')
    env = dict(os.environ, PYTHONPATH=f'{tmp_path}{os.pathsep}'
               + os.environ.get('PYTHONPATH', ''))
    code = 'import {first}; import mmpretrain.models; print("imported")'
    ok = subprocess.run([sys.executable, '-c', code.format(first='colora_mm')],
                        capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and 'imported' in ok.stdout, ok.stderr[-2000:]
    # without the fix the same import fails (the case the fix exists for)
    bare = subprocess.run([sys.executable, '-c', code.format(first='mmengine')],
                          capture_output=True, text=True, env=env)
    assert bare.returncode != 0 and 'transformers' in bare.stderr
