"""End to end on CPU, segmentation: tools/train.py (with validation), a run stopped
after its first checkpoint and continued with --resume, tools/merge.py, tools/test.py
on the merged and the unmerged checkpoints (same mIoU, same predictions), a 2-process
gloo run through tools/dist_train.sh, and the inputs the tools refuse.

The shipped configs, shrunk (tests/data_gen.py), on a generated ADE20K-layout dataset."""
import glob
import importlib.util
import json
import os
import os.path as osp
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip('mmseg')

from data_gen import (make_ade20k,  # noqa: E402
                      single_error, write_tiny_config)

pytestmark = pytest.mark.usefixtures('fast_config_loading', 'one_thread')

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOLS = osp.join(ROOT, 'tools')
ADE = osp.join(ROOT, 'configs', 'ade20k')
TIMEOUT = 600


def run(*argv, env=None):
    """Run a tool as users do; return (exit status, stdout + stderr)."""
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                            cwd=ROOT, timeout=TIMEOUT,
                            env=dict(os.environ, OMP_NUM_THREADS='1', **(env or {})))
    return result.returncode, result.stdout + result.stderr


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def python(tool, *argv):
    return run(sys.executable, osp.join(TOOLS, tool), *argv)


def in_process(tool, *argv):
    """``tools/<tool>.py`` called in this process (no interpreter start-up): its exit
    status. For the checks that fail before any heavy work."""
    spec = importlib.util.spec_from_file_location(f'colora_tools_{tool}',
                                                  osp.join(TOOLS, f'{tool}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in argv])


@pytest.fixture(scope='module')
def ade(tmp_path_factory):
    base = tmp_path_factory.mktemp('ade')
    root = make_ade20k(str(base / 'ADEChallengeData2016'))
    config = write_tiny_config(osp.join(ADE, 'colora_convnext_b.py'),
                               str(base / 'colora_convnext_b_tiny.py'), data_root=root,
                               max_iters=4, interval=2)
    return base, root, config


@pytest.fixture(scope='module')
def trained(ade):
    """Two iterations (checkpoint + validation at 2), then --resume up to 4."""
    base, _, config = ade
    work = base / 'work'
    code, log = python('train.py', config, '--work-dir', work,
                       '--cfg-options', 'train_cfg.max_iters=2')
    assert code == 0, log[-4000:]
    first = dict(log=log, files=sorted(os.listdir(work)))
    code, log = python('train.py', config, '--work-dir', work, '--resume')
    assert code == 0, log[-4000:]
    return work, first, log


def test_train_validates_and_checkpoints(trained):
    work, first, _ = trained
    assert 'iter_2.pth' in first['files']
    assert 'Iter(val) [2/2]' in first['log']
    assert 'mIoU' in first['log']
    assert 'CoLoRA report' in first['log']
    assert 'Iter(train) [2/2]' in first['log']


def test_resume_continues_from_the_checkpoint(trained):
    work, _, log = trained
    assert 'resumed epoch: 0, iter: 2' in log
    assert 'Iter(train) [3/4]' in log and 'Iter(train) [4/4]' in log
    assert 'Iter(train) [1/4]' not in log and 'Iter(train) [2/4]' not in log
    import torch
    ckpt = torch.load(work / 'iter_4.pth', map_location='cpu', weights_only=False)
    assert ckpt['meta']['iter'] == 4
    assert 'optimizer' in ckpt and ckpt['optimizer']['state']


def _miou(work_dir):
    with open(osp.join(work_dir, 'metrics.json')) as f:
        return json.load(f)['mIoU']


def test_train_merge_test_gives_the_same_miou(ade, trained, capsys):
    base, _, config = ade
    work, _, _ = trained
    code = in_process('merge', config, work / 'iter_4.pth', base / 'merged.pth',
                      '--shape', '64')
    assert code == 0
    log = capsys.readouterr().out
    assert 'max |merged - unmerged| =' in log and 'kept unfolded' in log
    results = {}
    for name, cfg, ckpt in (('unmerged', config, work / 'iter_4.pth'),
                            ('merged', base / 'merged.py', base / 'merged.pth')):
        code, log = python('test.py', cfg, ckpt, '--work-dir', base / f'test_{name}',
                           '--out', base / f'pred_{name}')
        assert code == 0, log[-4000:]
        preds = sorted(glob.glob(str(base / f'pred_{name}' / '*.png')))
        assert len(preds) == 2
        results[name] = (_miou(base / f'test_{name}'),
                         [np.asarray(Image.open(p)) for p in preds])
    assert results['merged'][0] == results['unmerged'][0]
    for a, b in zip(results['merged'][1], results['unmerged'][1]):
        np.testing.assert_array_equal(a, b)


def test_distributed_training_and_testing_with_gloo(tmp_path, ade):
    _, root, _ = ade
    config = write_tiny_config(
        osp.join(ADE, 'upernet_colora_r50_4xb4-160k_ade20k-512x512.py'),
        str(tmp_path / 'r50_tiny.py'), data_root=root, max_iters=2, interval=2)
    port = str(free_port())
    code, log = run('bash', osp.join(TOOLS, 'dist_train.sh'), config, 2,
                    '--work-dir', tmp_path / 'work',
                    env=dict(PYTHON=sys.executable, PORT=port))
    assert code == 0, log[-4000:]
    assert osp.isfile(tmp_path / 'work' / 'iter_2.pth')
    logs = glob.glob(str(tmp_path / 'work' / '*' / '*.log'))
    text = open(logs[0]).read()
    assert 'Distributed launcher: pytorch' in text
    assert 'Distributed training: True' in text
    assert 'GPU number: 2' in text
    assert 'Iter(val) [1/1]' in text   # 2 validation images, one per process
    # Distributed evaluation of that checkpoint through tools/dist_test.sh.
    code, log = run('bash', osp.join(TOOLS, 'dist_test.sh'), config,
                    tmp_path / 'work' / 'iter_2.pth', 2, '--work-dir', tmp_path / 'test',
                    env=dict(PYTHON=sys.executable, PORT=str(free_port())))
    assert code == 0, log[-4000:]
    with open(tmp_path / 'test' / 'metrics.json') as f:
        assert 'mIoU' in json.load(f)


def test_missing_data_root_is_refused(tmp_path, ade, capsys):
    _, _, config = ade
    work = tmp_path / 'work'
    code = in_process('train', config, '--work-dir', work, '--cfg-options',
                      f'train_dataloader.dataset.data_root={tmp_path / "nowhere"}')
    assert code == 2
    captured = capsys.readouterr()
    error = single_error(captured.out + captured.err)
    assert error.startswith('error: train_dataloader: data_root')
    assert 'does not exist' in error and 'docs/data.md' in error
    assert not work.exists()


def test_test_refuses_a_checkpoint_of_another_config(tmp_path, ade, trained, capsys):
    _, root, _ = ade
    work, _, _ = trained
    other_lora = write_tiny_config(
        osp.join(ADE, 'upernet_lora_convnext_b_4xb4-160k_ade20k-512x512.py'),
        str(tmp_path / 'lora_tiny.py'), data_root=root)
    code = in_process('test', other_lora, work / 'iter_4.pth', '--work-dir', tmp_path / 'w')
    assert code == 2
    captured = capsys.readouterr()
    assert 'does not match config' in single_error(captured.out + captured.err)
    assert not (tmp_path / 'w').exists()


def test_swin_trains_merges_and_tests_the_same(tmp_path, ade):
    """CoLoRASwin (tiny Swin, two blocks a stage) through the tools: training with the
    per-stage report, a complete merge to a plain SwinTransformer checkpoint, and the
    same mIoU and predictions from the merged and the unmerged checkpoints."""
    _, root, _ = ade
    config = write_tiny_config(
        osp.join(ADE, 'upernet_colora_swin-t_8xb2-160k_ade20k-512x512.py'),
        str(tmp_path / 'swin_tiny.py'), data_root=root, max_iters=2, interval=2)
    work = tmp_path / 'work'
    code, log = python('train.py', config, '--work-dir', work)
    assert code == 0, log[-4000:]
    assert 'CoLoRA report' in log and 'Adapters per stage' in log
    assert 'Iter(val) [2/2]' in log
    code = in_process('merge', config, work / 'iter_2.pth', tmp_path / 'merged.pth',
                      '--shape', '64')
    assert code == 0
    merged_cfg = (tmp_path / 'merged.py').read_text()
    assert "type='SwinTransformer'" in merged_cfg and 'CoLoRA' not in merged_cfg
    results = {}
    for name, cfg, ckpt in (('unmerged', config, work / 'iter_2.pth'),
                            ('merged', tmp_path / 'merged.py', tmp_path / 'merged.pth')):
        code, log = python('test.py', cfg, ckpt, '--work-dir', tmp_path / f'test_{name}',
                           '--out', tmp_path / f'pred_{name}')
        assert code == 0, log[-4000:]
        preds = sorted(glob.glob(str(tmp_path / f'pred_{name}' / '*.png')))
        assert len(preds) == 2
        results[name] = (_miou(tmp_path / f'test_{name}'),
                         [np.asarray(Image.open(p)) for p in preds])
    assert results['merged'][0] == results['unmerged'][0]
    for a, b in zip(results['merged'][1], results['unmerged'][1]):
        np.testing.assert_array_equal(a, b)
