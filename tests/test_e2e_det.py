"""End to end on CPU, detection: tools/train.py with validation on a generated
COCO-layout dataset, tools/merge.py, tools/test.py on the merged and the unmerged
checkpoints (same bbox mAP, same detections), and a missing annotation file refused."""
import glob
import importlib.util
import json
import os
import os.path as osp
import pickle
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip('mmdet')
pytest.importorskip('pycocotools')

from data_gen import (make_coco,  # noqa: E402
                      single_error, write_tiny_config)

pytestmark = pytest.mark.usefixtures('fast_config_loading', 'one_thread')

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOLS = osp.join(ROOT, 'tools')
COCO = osp.join(ROOT, 'configs', 'coco')


def python(tool, *argv):
    result = subprocess.run([sys.executable, osp.join(TOOLS, tool)]
                            + [str(a) for a in argv], capture_output=True, text=True,
                            cwd=ROOT, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS='1'))
    return result.returncode, result.stdout + result.stderr


def in_process(tool, *argv):
    """``tools/<tool>.py`` called in this process: its exit status."""
    spec = importlib.util.spec_from_file_location(f'colora_tools_{tool}',
                                                  osp.join(TOOLS, f'{tool}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in argv])


@pytest.fixture(scope='module')
def coco(tmp_path_factory):
    base = tmp_path_factory.mktemp('coco')
    root = make_coco(str(base / 'coco'))
    config = write_tiny_config(
        osp.join(COCO, 'faster-rcnn_colora_r50_fpn_2xb8-1x_coco.py'),
        str(base / 'faster_rcnn_tiny.py'), data_root=root, max_iters=3, interval=3)
    return base, root, config


@pytest.fixture(scope='module')
def trained(coco):
    base, _, config = coco
    work = base / 'work'
    code, log = python('train.py', config, '--work-dir', work)
    assert code == 0, log[-4000:]
    return work, log


def test_train_validates_and_checkpoints(trained):
    work, log = trained
    assert osp.isfile(work / 'iter_3.pth')
    assert 'Iter(train) [3/3]' in log and 'loss_rpn_cls' in log and 'loss_bbox' in log
    assert 'Iter(val) [2/2]' in log and 'coco/bbox_mAP' in log


def test_train_merge_test_gives_the_same_map(coco, trained, capsys):
    base, _, config = coco
    work, _ = trained
    code = in_process('merge', config, work / 'iter_3.pth', base / 'merged.pth',
                      '--shape', '64', '96')
    assert code == 0
    log = capsys.readouterr().out
    # ResNet: the pairs fold; the filtered spatial branches beside conv2 do not.
    assert 'folded 32 of 48 adapted layers' in log
    results = {}
    for name, cfg, ckpt in (('unmerged', config, work / 'iter_3.pth'),
                            ('merged', base / 'merged.py', base / 'merged.pth')):
        out = base / f'{name}.pkl'
        code, log = python('test.py', cfg, ckpt, '--work-dir', base / f'test_{name}',
                           '--out', out)
        assert code == 0, log[-4000:]
        with open(base / f'test_{name}' / 'metrics.json') as f:
            metrics = json.load(f)
        with open(out, 'rb') as f:
            results[name] = (metrics, pickle.load(f))
    (m_metrics, m_dets), (u_metrics, u_dets) = results['merged'], results['unmerged']
    assert m_metrics['coco/bbox_mAP'] == u_metrics['coco/bbox_mAP']
    assert m_metrics['coco/bbox_mAP_50'] == u_metrics['coco/bbox_mAP_50']
    assert len(m_dets) == len(u_dets) == 2
    for a, b in zip(m_dets, u_dets):
        pa, pb = a['pred_instances'], b['pred_instances']
        assert len(pa['scores']) == len(pb['scores'])
        np.testing.assert_allclose(pa['bboxes'].numpy(), pb['bboxes'].numpy(),
                                   atol=1e-2)
        np.testing.assert_allclose(pa['scores'].numpy(), pb['scores'].numpy(),
                                   atol=1e-4)
        np.testing.assert_array_equal(pa['labels'].numpy(), pb['labels'].numpy())


def test_missing_annotation_file_is_refused(tmp_path, coco, capsys):
    _, _, config = coco
    code = in_process('train', config, '--work-dir', tmp_path / 'work',
                      '--cfg-options', 'train_dataloader.dataset.ann_file=missing.json')
    assert code == 2
    captured = capsys.readouterr()
    error = single_error(captured.out + captured.err)
    assert 'annotation file' in error and 'does not exist' in error
    assert not (tmp_path / 'work').exists()


def _free_port():
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _launch(script, *argv):
    result = subprocess.run(['bash', osp.join(TOOLS, script)] + [str(a) for a in argv],
                            capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS='1', PYTHON=sys.executable,
                                     PORT=str(_free_port())))
    return result.returncode, result.stdout + result.stderr


def test_distributed_training_and_testing_with_gloo(tmp_path, coco):
    """The README's command, `bash tools/dist_train.sh <CoLoRA Faster R-CNN config> 2`,
    on two CPU processes; then tools/dist_test.sh with --out (one results file)."""
    _, root, config = coco
    code, log = _launch('dist_train.sh', config, 2, '--work-dir', tmp_path / 'work')
    assert code == 0, log[-4000:]
    assert osp.isfile(tmp_path / 'work' / 'iter_3.pth')
    text = open(glob.glob(str(tmp_path / 'work' / '*' / '*.log'))[0]).read()
    assert 'Distributed training: True' in text and 'GPU number: 2' in text
    assert 'Iter(train) [3/3]' in text and 'coco/bbox_mAP' in text
    code, log = _launch('dist_test.sh', config, tmp_path / 'work' / 'iter_3.pth', 2,
                        '--work-dir', tmp_path / 'test', '--out', tmp_path / 'res.pkl')
    assert code == 0, log[-4000:]
    with open(tmp_path / 'test' / 'metrics.json') as f:
        assert 'coco/bbox_mAP' in json.load(f)
    with open(tmp_path / 'res.pkl', 'rb') as f:
        results = pickle.load(f)
    # every validation image once, gathered from both processes
    paths = sorted(osp.basename(r['img_path']) for r in results)
    assert paths == sorted(os.listdir(osp.join(root, 'val2017')))
