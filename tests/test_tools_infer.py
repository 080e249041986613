"""tools/infer.py on tiny versions of the shipped configs: its predictions are the ones
tools/test.py evaluates (segmentation label maps, detection boxes), a merged
checkpoint (tools/merge.py) predicts what its training checkpoint did through the
upstream inference APIs, and the inputs it refuses without writing."""
import json
import os
import os.path as osp
import pickle

import numpy as np
import pytest
import torch

pytest.importorskip('mmseg')
pytest.importorskip('mmdet')

from PIL import Image  # noqa: E402

from data_gen import (ADE_CLASSES, COCO_CATEGORIES, make_ade20k,  # noqa: E402
                      make_coco, single_error, write_tiny_config)
from helpers_ckpt import trained_checkpoint  # noqa: E402
from tools_loader import load_tool  # noqa: E402

pytestmark = pytest.mark.usefixtures('fast_config_loading', 'one_thread')

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
ADE_CFG = osp.join(ROOT, 'configs', 'ade20k', 'colora_convnext_b.py')
COCO_CFG = osp.join(ROOT, 'configs', 'coco', 'faster-rcnn_colora_r50_fpn_2xb8-1x_coco.py')


infer = load_tool('infer')
test_tool = load_tool('test')
merge_tool = load_tool('merge')


@pytest.fixture(scope='module')
def seg(tmp_path_factory):
    base = tmp_path_factory.mktemp('infer_seg')
    ade = make_ade20k(str(base / 'ade'), num_train=1, num_val=2, size=(64, 80))
    config = write_tiny_config(ADE_CFG, str(base / 'seg.py'), data_root=ade)
    ckpt = str(base / 'iter_1.pth')
    trained_checkpoint(config, ckpt)
    return dict(config=config, ckpt=ckpt, base=base,
                images=osp.join(ade, 'images', 'validation'))


@pytest.fixture(scope='module')
def det(tmp_path_factory):
    base = tmp_path_factory.mktemp('infer_det')
    coco = make_coco(str(base / 'coco'), num_train=1, num_val=2)
    config = write_tiny_config(COCO_CFG, str(base / 'det.py'), data_root=coco)
    ckpt = str(base / 'iter_1.pth')
    trained_checkpoint(config, ckpt)
    return dict(config=config, ckpt=ckpt, base=base, images=osp.join(coco, 'val2017'))


def _run(tool, argv, capsys):
    code = tool.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_segmentation_predictions_are_what_test_evaluates(seg, tmp_path, capsys):
    out = tmp_path / 'pred'
    code, log = _run(infer, [seg['config'], seg['ckpt'], seg['images'],
                             '--out-dir', out, '--device', 'cpu'], capsys)
    assert code == 0, log
    names = sorted(n[:-4] for n in os.listdir(seg['images']))
    assert len(names) == 2
    assert sorted(os.listdir(out)) == sorted(
        ['classes.json'] + [f'{n}_pred.png' for n in names] + [f'{n}_vis.jpg' for n in names])
    assert json.loads((out / 'classes.json').read_text())['classes'] == list(ADE_CLASSES)

    # tools/test.py --out writes the same predictions through the test dataloader and
    # mmseg's metric (ADE20K's convention on disk: class k is written as k + 1)
    ref = tmp_path / 'ref'
    code, log = _run(test_tool, [seg['config'], seg['ckpt'], '--out', ref,
                                 '--work-dir', tmp_path / 'work'], capsys)
    assert code == 0, log
    for name in names:
        ours = np.asarray(Image.open(out / f'{name}_pred.png'))
        theirs = np.asarray(Image.open(ref / f'{name}.png'))
        image = Image.open(osp.join(seg['images'], f'{name}.jpg'))
        assert ours.shape == (image.height, image.width) == theirs.shape
        assert ours.dtype == np.uint8 and ours.max() < len(ADE_CLASSES)
        np.testing.assert_array_equal(ours.astype(np.int64) + 1, theirs)
        painted = Image.open(out / f'{name}_vis.jpg')
        assert painted.size == image.size
        # painted: the prediction's colours over the image, not the image itself
        assert np.abs(np.asarray(painted, dtype=np.float64)
                      - np.asarray(image.convert('RGB'), dtype=np.float64)).mean() > 5


def test_merged_checkpoint_predicts_what_the_trained_one_did(seg, tmp_path, capsys):
    merged = tmp_path / 'merged.pth'
    code, log = _run(merge_tool, [seg['config'], seg['ckpt'], merged], capsys)
    assert code == 0, log
    meta = torch.load(merged, weights_only=False)['meta']
    assert meta['dataset_meta']['classes'] == tuple(ADE_CLASSES)   # kept by merge.py
    image = sorted(os.listdir(seg['images']))[0]
    path = osp.join(seg['images'], image)
    for ckpt, config, out in ((seg['ckpt'], seg['config'], tmp_path / 'a'),
                              (merged, tmp_path / 'merged.py', tmp_path / 'b')):
        code, log = _run(infer, [config, ckpt, path, '--out-dir', out], capsys)
        assert code == 0, log
    stem = image[:-4]
    a = np.asarray(Image.open(tmp_path / 'a' / f'{stem}_pred.png'))
    b = np.asarray(Image.open(tmp_path / 'b' / f'{stem}_pred.png'))
    assert (a == b).mean() > 0.999     # argmax of logits equal to about 1e-5


def test_detection_boxes_are_what_test_writes(det, tmp_path, capsys):
    out = tmp_path / 'pred'
    code, log = _run(infer, [det['config'], det['ckpt'], det['images'],
                             '--out-dir', out, '--score-thr', '0'], capsys)
    assert code == 0, log
    ref = tmp_path / 'ref.pkl'
    code, log = _run(test_tool, [det['config'], det['ckpt'], '--out', ref,
                                 '--work-dir', tmp_path / 'work'], capsys)
    assert code == 0, log
    with open(ref, 'rb') as f:
        results = {osp.basename(r['img_path']): r['pred_instances'] for r in pickle.load(f)}
    classes = [n for _, n in COCO_CATEGORIES]
    assert len(results) == 2
    for name, expected in results.items():
        ours = json.loads((out / f'{name[:-4]}_pred.json').read_text())
        assert ours['image'] == osp.join(det['images'], name)
        rows = ours['detections']
        assert len(rows) == len(expected['scores']) > 0
        np.testing.assert_allclose([r['bbox'] for r in rows], expected['bboxes'].numpy(),
                                   atol=0.01)
        np.testing.assert_allclose([r['score'] for r in rows],
                                   expected['scores'].numpy(), atol=1e-5)
        assert [r['label'] for r in rows] == expected['labels'].tolist()
        assert [r['class'] for r in rows] == [classes[i] for i in expected['labels']]
        assert Image.open(out / f'{name[:-4]}_vis.jpg').size == (96, 64)
    # the threshold keeps the detections scoring at least it
    scores = sorted(r['score'] for r in json.loads(
        (out / f'{sorted(results)[0][:-4]}_pred.json').read_text())['detections'])
    threshold = scores[len(scores) // 2]      # a score itself: kept (at least it)
    code, log = _run(infer, [det['config'], det['ckpt'],
                             osp.join(det['images'], sorted(results)[0]), '--out-dir',
                             tmp_path / 'thr', '--score-thr', threshold], capsys)
    assert code == 0, log
    kept = json.loads((tmp_path / 'thr' / f'{sorted(results)[0][:-4]}_pred.json')
                      .read_text())['detections']
    assert len(kept) == sum(s >= threshold for s in scores) > 0
    # ... and draws exactly those: at the highest score one box, none above it
    name = sorted(results)[0][:-4]
    painted = {}
    for tag, thr in (('top', scores[-1]), ('none', 1.0)):
        code, log = _run(infer, [det['config'], det['ckpt'],
                                 osp.join(det['images'], sorted(results)[0]), '--out-dir',
                                 tmp_path / tag, '--score-thr', thr], capsys)
        assert code == 0, log
        painted[tag] = np.asarray(Image.open(tmp_path / tag / f'{name}_vis.jpg'),
                                  dtype=np.int64)
    top = json.loads((tmp_path / 'top' / f'{name}_pred.json').read_text())['detections']
    assert len(top) == 1
    assert np.abs(painted['top'] - painted['none']).max() > 100      # the box is drawn


def test_refused_inputs_write_nothing(seg, tmp_path, capsys):
    images = seg['images']
    first = osp.join(images, sorted(os.listdir(images))[0])
    out = tmp_path / 'out'
    other = tmp_path / 'other.pth'
    torch.save({'meta': {'dataset_meta': {'classes': ADE_CLASSES}},
                'state_dict': {'backbone.x': torch.zeros(1)}}, other)
    unnamed = tmp_path / 'unnamed.pth'
    state = torch.load(seg['ckpt'], weights_only=False)['state_dict']
    torch.save({'meta': {}, 'state_dict': state}, unnamed)
    not_image = tmp_path / 'notes.png'
    not_image.write_text('not an image')
    twin = tmp_path / 'twin'
    twin.mkdir()
    Image.open(first).save(twin / osp.basename(first))
    a_file = tmp_path / 'a_file'
    a_file.write_text('x')
    (tmp_path / 'empty').mkdir()
    gif = tmp_path / 'gif_named.png'          # a format OpenCV does not decode
    Image.open(first).convert('P').save(gif, format='GIF')
    cut = tmp_path / 'cut.jpg'                # a download cut short
    cut.write_bytes(open(first, 'rb').read()[:-300])
    few = tmp_path / 'two_classes.pth'        # class names for fewer classes than predicted
    torch.save({'meta': {'dataset_meta': {'classes': ADE_CLASSES[:2]}},
                'state_dict': state}, few)
    cases = [
        ([seg['config'], seg['ckpt'], tmp_path / 'none.jpg'], 'none.jpg does not exist'),
        ([seg['config'], seg['ckpt'], not_image], 'is not an image file OpenCV can decode'),
        ([seg['config'], seg['ckpt'], gif], 'is not an image file OpenCV can decode'),
        ([seg['config'], seg['ckpt'], cut], 'is a JPEG cut short'),
        ([seg['config'], few, first],
         f'names 2 classes (meta[\'dataset_meta\']), the model predicts '
         f'{len(ADE_CLASSES)} (decode_head.num_classes)'),
        ([seg['ckpt'], seg['config'], first], 'is not a config file'),
        ([seg['config'], seg['ckpt'], tmp_path / 'empty'], 'holds no image file'),
        ([seg['config'], seg['ckpt'], first, twin / osp.basename(first)],
         'have the same name'),
        ([seg['config'], other, first], 'does not match config'),
        ([seg['config'], unnamed, first], 'does not name its classes'),
        ([seg['config'], seg['ckpt'], first, '--device', 'tpu'],
         "--device 'tpu' is not a device"),
        ([seg['config'], seg['ckpt'], first, '--opacity', '0'], '--opacity 0.0'),
        ([seg['config'], seg['ckpt'], first, '--score-thr', '2'], '--score-thr 2.0'),
        ([seg['config'], seg['ckpt'], first, '--cfg-options', 'modle.x=1'], 'modle'),
    ]
    if not torch.cuda.is_available():
        cases.append(([seg['config'], seg['ckpt'], first, '--device', 'cuda'],
                      'no GPU is available here'))
    for argv, fragment in cases:
        code, log = _run(infer, argv + ['--out-dir', out], capsys)
        assert code == 2, (argv, log)
        assert fragment in single_error(log), (argv, log)
        assert not out.exists(), argv
    for where, fragment in ((a_file, 'is a file'), (a_file / 'sub', 'which is a file'),
                            ('', '--out-dir is empty')):
        code, log = _run(infer, [seg['config'], seg['ckpt'], first, '--out-dir', where],
                         capsys)
        assert code == 2 and fragment in single_error(log), (where, log)
    # an output that is an input: the image named like a prediction of another one, the
    # checkpoint named like the class list; an input folder as DIR
    clash = tmp_path / 'clash'
    clash.mkdir()
    Image.open(first).save(clash / 'x.png')
    Image.open(first).save(clash / 'x_vis.jpg')
    before = (clash / 'x_vis.jpg').read_bytes()
    for argv, fragment in (
            ([clash / 'x.png', clash / 'x_vis.jpg'], 'would overwrite an input'),
            ([clash], 'is an input folder')):
        code, log = _run(infer, [seg['config'], seg['ckpt'], *argv, '--out-dir', clash],
                         capsys)
        assert code == 2 and fragment in single_error(log), (argv, log)
    assert (clash / 'x_vis.jpg').read_bytes() == before
    named = tmp_path / 'named'
    named.mkdir()
    torch.save(torch.load(seg['ckpt'], weights_only=False), named / 'classes.json')
    code, log = _run(infer, [seg['config'], named / 'classes.json', first, '--out-dir',
                             named, '--force'], capsys)
    assert code == 2 and 'would overwrite an input' in single_error(log)
    # a folder where a prediction goes: refused, --force or not
    blocked = tmp_path / 'blocked'
    (blocked / f'{osp.basename(first)[:-4]}_vis.jpg').mkdir(parents=True)
    code, log = _run(infer, [seg['config'], seg['ckpt'], first, '--out-dir', blocked,
                             '--force'], capsys)
    assert code == 2 and 'is a folder where a prediction goes' in single_error(log)
    assert os.listdir(blocked) == [f'{osp.basename(first)[:-4]}_vis.jpg']
    # existing predictions: kept unless --force
    code, log = _run(infer, [seg['config'], seg['ckpt'], first, '--out-dir', out], capsys)
    assert code == 0, log
    written = {p: (out / p).read_bytes() for p in os.listdir(out)}
    code, log = _run(infer, [seg['config'], seg['ckpt'], first, '--out-dir', out], capsys)
    assert code == 2 and 'pass --force' in single_error(log)
    assert {p: (out / p).read_bytes() for p in os.listdir(out)} == written
    code, log = _run(infer, [seg['config'], seg['ckpt'], first, '--out-dir', out,
                             '--force'], capsys)
    assert code == 0, log
    assert sorted(os.listdir(out)) == sorted(written)


def test_images_too_narrow_for_the_model_are_refused_first(seg, tmp_path, capsys):
    """The tiny config resizes to fit 64x64 and its ConvNeXt takes 32 pixels a side or
    more: a 32x64 image predicts, a 31x64 one is refused with its sizes, and a 4x600
    one (resized below one pixel) too, before anything is written."""
    folder = tmp_path / 'images'
    folder.mkdir()
    rng = np.random.RandomState(0)
    for h, w in ((32, 64), (31, 64), (4, 600)):
        Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(
            folder / f'im_{h}x{w}.png')
    ok, narrow, thin = (folder / f'im_{s}.png' for s in ('32x64', '31x64', '4x600'))
    out = tmp_path / 'out'
    for argv, fragment in (
            ([ok, narrow], f'input {narrow} (31x64 pixels) reaches the model as 31x64 '
                           'after the test pipeline, and CoLoRAConvNeXt takes at least 32 '
                           'pixels on each side'),
            ([ok, thin], f'input {thin} (4x600 pixels) does not go through the test '
                         'pipeline')):
        code, log = _run(infer, [seg['config'], seg['ckpt'], *argv, '--out-dir', out,
                                 '--device', 'cpu'], capsys)
        assert code == 2, log
        assert fragment in single_error(log), log
        assert not out.exists()
    code, log = _run(infer, [seg['config'], seg['ckpt'], ok, '--out-dir', out,
                             '--device', 'cpu'], capsys)
    assert code == 0, log
    assert np.array(Image.open(out / 'im_32x64_pred.png')).shape == (32, 64)
