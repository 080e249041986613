"""The embedded demo: its synthetic data (ADE20K layout, labels, two distinct domains)
and a ``--quick`` end-to-end run of ``tools/demo.py`` (train, merge, test, table, PNG)."""
import json
import math
import os
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from colora_mm.demo.data import CLASSES, DOMAINS, make_demo_data, make_domain

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
NUM_TRAIN, NUM_VAL = 24, 8


@pytest.fixture(scope='module')
def demo_data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('demo_data'))
    return make_demo_data(root, num_train=NUM_TRAIN, num_val=NUM_VAL, seed=3)


def _pairs(root, split):
    tag = 'train' if split == 'training' else 'val'
    images = sorted(os.listdir(osp.join(root, 'images', split)))
    labels = sorted(os.listdir(osp.join(root, 'annotations', split)))
    return tag, images, labels


@pytest.mark.parametrize('domain', sorted(DOMAINS))
def test_ade20k_layout_and_label_range(demo_data, domain):
    root = demo_data[domain]
    for split, count in (('training', NUM_TRAIN), ('validation', NUM_VAL)):
        tag, images, labels = _pairs(root, split)
        assert images == [f'ADE_{tag}_{i:08d}.jpg' for i in range(1, count + 1)]
        assert labels == [f'ADE_{tag}_{i:08d}.png' for i in range(1, count + 1)]
        present = set()
        for img_name, ann_name in zip(images, labels):
            img = Image.open(osp.join(root, 'images', split, img_name))
            ann = Image.open(osp.join(root, 'annotations', split, ann_name))
            assert img.mode == 'RGB' and img.size == (64, 64)
            assert ann.mode == 'L' and ann.size == (64, 64)
            values = np.unique(np.asarray(ann))
            # ADE convention: 0 = unlabelled (ignored), 1..K = the K classes.
            assert values.min() >= 0 and values.max() <= len(CLASSES)
            assert 1 in values                        # every image has background
            present.update(values.tolist())
        if split == 'training':
            assert present == set(range(len(CLASSES) + 1))   # 0 and every class


def test_ignore_band_surrounds_shapes(demo_data):
    ann = np.asarray(Image.open(osp.join(demo_data['source'], 'annotations',
                                         'training', 'ADE_train_00000001.png')))
    shapes = ann > 1
    # no background pixel touches a shape: the unlabelled band lies between them
    background = ann == 1
    assert not (background[1:] & shapes[:-1]).any()
    assert not (background[:, 1:] & shapes[:, :-1]).any()
    assert (ann == 0).any()


def _class_stats(root, split='training'):
    """Per shape class: the circular mean hue (degrees) of its pixels; the mean
    per-image spread (std) of background grey levels; the mean shape area per image."""
    _, images, labels = _pairs(root, split)
    sin = np.zeros(len(CLASSES))
    cos = np.zeros(len(CLASSES))
    hf, shape_px, n_images = [], 0, 0
    for img_name, ann_name in zip(images, labels):
        img = Image.open(osp.join(root, 'images', split, img_name))
        ann = np.asarray(Image.open(osp.join(root, 'annotations', split, ann_name)))
        hsv = np.asarray(img.convert('HSV')).astype(np.float64)
        angle = hsv[..., 0] / 256.0 * 2 * np.pi
        for k in range(2, len(CLASSES) + 1):
            mask = ann == k
            sin[k - 1] += np.sin(angle[mask]).sum()
            cos[k - 1] += np.cos(angle[mask]).sum()
        grey = np.asarray(img.convert('L')).astype(np.float64)
        hf.append(grey[ann == 1].std())
        shape_px += (ann > 1).sum()
        n_images += 1
    hues = np.degrees(np.arctan2(sin, cos)) % 360
    return hues[1:], float(np.mean(hf)), shape_px / n_images


def test_two_distinct_domains(demo_data):
    src_hue, src_hf, src_px = _class_stats(demo_data['source'])
    tgt_hue, tgt_hf, tgt_px = _class_stats(demo_data['target'])
    # the palette: every class rotated by about DOMAINS['target'].hue_shift degrees
    shift = (tgt_hue - src_hue + 180) % 360 - 180
    expected = DOMAINS['target'].hue_shift - DOMAINS['source'].hue_shift
    assert np.all(np.abs(shift - expected) < 15), (src_hue, tgt_hue)
    # source classes are far apart in hue (90 degrees), so the rotation matters
    gaps = np.abs((np.diff(np.sort(src_hue)) + 180) % 360 - 180)
    assert gaps.min() > 60
    # textured target backgrounds, flat source ones
    assert tgt_hf > 2.5 * src_hf, (src_hf, tgt_hf)
    # smaller shapes in the target domain (more of them, but less area in all)
    assert src_px > 1.3 * tgt_px, (src_px, tgt_px)


def test_same_seed_same_files(tmp_path):
    a = make_domain(str(tmp_path / 'a'), 'target', num_train=3, num_val=1, seed=5)
    b = make_domain(str(tmp_path / 'b'), 'target', num_train=3, num_val=1, seed=5)
    c = make_domain(str(tmp_path / 'c'), 'target', num_train=3, num_val=1, seed=6)
    name = osp.join('images', 'training', 'ADE_train_00000002.jpg')
    read = lambda root: open(osp.join(root, name), 'rb').read()  # noqa: E731
    assert read(a) == read(b)
    assert read(a) != read(c)


# ------------------------------------------------------------------ end to end
def test_quick_demo_end_to_end(tmp_path):
    pytest.importorskip('mmseg')
    out = tmp_path / 'demo_out'
    proc = subprocess.run(
        [sys.executable, osp.join(REPO, 'tools', 'demo.py'), '--quick', '--out',
         str(out), '--seed', '1'],
        cwd=str(tmp_path), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # one progress line per phase, the tools' own output kept out of the console
    steps = [line for line in proc.stdout.splitlines() if line.startswith('[')]
    assert len(steps) >= 10, proc.stdout
    assert 'mmengine - INFO' not in proc.stdout + proc.stderr

    rows = {r['method']: r for r in json.loads((out / 'results.json').read_text())}
    assert len(rows) == 6
    for row in rows.values():
        assert math.isfinite(row['miou']) and 0.0 <= row['miou'] <= 100.0
    colora = [m for m in rows if m.startswith('CoLoRA (')][0]
    merged = [m for m in rows if m.startswith('CoLoRA merged')][0]
    assert rows[merged]['miou'] == rows[colora]['miou']
    full = rows['full fine-tuning']
    assert full['backbone_percent'] == pytest.approx(100.0)
    assert 0 < rows[colora]['trainable_backbone'] < full['trainable_backbone']
    per_stage = [m for m in rows if m.startswith('CoLoRA per stage')][0]
    assert 0 < rows[per_stage]['trainable_backbone'] != rows[colora]['trainable_backbone']

    table = (out / 'results.md').read_text()
    for method in rows:
        assert f'| {method} |' in table
    png = Image.open(out / 'predictions.png')
    assert png.format == 'PNG' and png.size[0] > 400 and png.size[1] > 400
    assert len(list((out / 'logs').glob('*.log'))) >= 10
    assert (out / 'checkpoints' / 'colora_merged.pth').is_file()
