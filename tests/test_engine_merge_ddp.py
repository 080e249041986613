"""MergeReinitHook under distributed training (two CPU processes, gloo): replicas whose
random generators differ end the merge with identical parameters."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

pytest.importorskip('mmengine')


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, out_dir):
    import sys
    from types import SimpleNamespace

    import torch.distributed as dist
    # imported before the group exists, as in the tools: mmengine imports
    # torch.distributed.nn.functional, which keeps the default group of the moment it
    # is first imported (in its functions' defaults) for the life of the process
    from mmengine.optim import OptimWrapper

    from colora_mm.adapters import inject_adapters, mark_trainable
    from colora_mm.engine import MergeReinitHook
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), 'tools'))
    from train import close_process_group

    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)                       # identical replicas ...
        model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        inject_adapters(model, dict(method='colora', gamma=4), pairs=[('0', '2')])
        mark_trainable(model, 'colora')
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.1)
        optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
        torch.manual_seed(100 + rank)              # ... whose generators differ
        runner = SimpleNamespace(model=model, optim_wrapper=optim, iter=0)
        MergeReinitHook(interval=1).after_train_iter(runner, 0)
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()},
                   os.path.join(out_dir, f'rank{rank}.pth'))
    except BaseException:
        close_process_group(wait_for_peers=False)
        raise
    # as the tools end a distributed run: the group and gloo's threads go before the
    # interpreter's shutdown, where a thread releasing the broadcasts' tensors aborted
    # the process ('terminate called without an active exception')
    del runner, model, optim
    close_process_group()


def test_replicas_identical_after_merge(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / 'rank0.pth')
    b = torch.load(tmp_path / 'rank1.pth')
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert torch.count_nonzero(a['0.adapter_branch.pair.B1']) == 0
