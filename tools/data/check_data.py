"""Check that a dataset folder has the layout the configs expect, before training.

    python tools/data/check_data.py ade20k data/ade/ADEChallengeData2016
    python tools/data/check_data.py coco data/coco [--quick]
    python tools/data/check_data.py vtab1k data/vtab-1k [--quick]

ADE20K: ``images/{training,validation}/*.jpg`` with one ``annotations/.../*.png`` of
the same stem each; label maps single-channel, values 0..150 (0 = "other", ignored via
``reduce_zero_label``). COCO: ``annotations/instances_{train,val}2017.json`` and every
image they list under ``{train,val}2017/``. VTAB-1k: a folder per task (all 19),
each with ``train800val200.txt``, ``train800.txt``, ``val200.txt`` and ``test.txt``
(lines ``relative/path label``, labels within the task's classes) and every image they
list (``--quick``: the split files only). Prints counts (the full datasets have
20210 / 2000 ADE20K images, 118287 / 5000 COCO images, 1000 / 800 / 200 training
images per VTAB-1k task), and exits 1 with the problems found, one line each, naming
the file. Standard library and Pillow only.
"""
import argparse
import importlib.util
import json
import os
import os.path as osp
import sys

EXPECTED = {'ade20k': {'training': 20210, 'validation': 2000},
            'coco': {'train2017': 118287, 'val2017': 5000},
            # per task (test splits differ between tasks)
            'vtab1k': {'train800val200': 1000, 'train800': 800, 'val200': 200}}


def _vtab1k_layout():
    """colora_mm/datasets/vtab1k_layout.py (standard library only), loaded from its
    file: importing the package would import OpenMMLab."""
    path = osp.join(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))),
                    'colora_mm', 'datasets', 'vtab1k_layout.py')
    spec = importlib.util.spec_from_file_location('colora_vtab1k_layout', path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


def _stems(folder, suffix):
    return {osp.splitext(n)[0] for n in os.listdir(folder) if n.endswith(suffix)}


def check_ade20k(root, quick=False):
    problems, counts = [], {}
    for split in ('training', 'validation'):
        img_dir = osp.join(root, 'images', split)
        ann_dir = osp.join(root, 'annotations', split)
        missing = [d for d in (img_dir, ann_dir) if not osp.isdir(d)]
        if missing:
            problems += [f'missing folder {d}' for d in missing]
            continue
        images, labels = _stems(img_dir, '.jpg'), _stems(ann_dir, '.png')
        counts[split] = len(images)
        if not images:
            problems.append(f'no .jpg images in {img_dir}')
        without = sorted(images - labels)
        if without:
            problems.append(f'{len(without)} images of {split} without a label map '
                            f'(e.g. {without[0]}.png)')
        sample = sorted(labels)[:1 if quick else 20]
        if sample:
            from PIL import Image
            import numpy as np
            for stem in sample:
                path = osp.join(ann_dir, stem + '.png')
                try:
                    label = Image.open(path)
                    values = np.asarray(label)
                except (OSError, ValueError) as err:   # not a readable image
                    problems.append(f'{path} cannot be read as an image '
                                    f'({type(err).__name__})')
                    continue
                if values.ndim != 2:
                    problems.append(f'{path} is not single-channel ({label.mode})')
                elif values.max() > 150:
                    problems.append(f'{path} has label {values.max()} > 150')
    return counts, problems


def check_coco(root, quick=False):
    problems, counts = [], {}
    for split in ('train2017', 'val2017'):
        ann = osp.join(root, 'annotations', f'instances_{split}.json')
        img_dir = osp.join(root, split)
        if not osp.isfile(ann):
            problems.append(f'missing {ann}')
            continue
        if not osp.isdir(img_dir):
            problems.append(f'missing folder {img_dir}')
            continue
        try:
            with open(ann) as f:
                coco = json.load(f)
        except (OSError, ValueError) as err:          # JSONDecodeError, bad UTF-8
            problems.append(f'{ann} cannot be read as JSON ({type(err).__name__})')
            continue
        if not isinstance(coco, dict):
            problems.append(f'{ann} holds a {type(coco).__name__}, not a COCO dict')
            continue
        for key in ('images', 'annotations', 'categories'):
            if key not in coco:
                problems.append(f'{ann} has no {key!r}')
        images = coco.get('images', [])
        if not isinstance(images, list) or not images:
            problems.append(f'{ann} lists no images')
            continue
        unnamed = [i for i, im in enumerate(images)
                   if not isinstance(im, dict) or not isinstance(im.get('file_name'), str)]
        if unnamed:
            problems.append(f'{ann} has image entries without a file_name '
                            f'({len(unnamed)}, e.g. entry {unnamed[0]})')
            continue
        names = [im['file_name'] for im in images]
        counts[split] = len(names)
        present = set(os.listdir(img_dir))
        absent = [n for n in names if n not in present]
        if absent:
            problems.append(f'{len(absent)} images listed in {ann} are not in {img_dir} '
                            f'(e.g. {absent[0]})')
        boxes = [a for a in coco.get('annotations', [])[:1000 if quick else None]
                 if len(a.get('bbox', [])) != 4]
        if boxes:
            problems.append(f'{len(boxes)} annotations in {ann} without a 4-number bbox')
    return counts, problems


def check_vtab1k(root, quick=False):
    layout = _vtab1k_layout()
    problems, counts = [], {}
    for task in layout.TASKS:
        try:
            found = layout.check_task(root, task, check_images=not quick)
        except layout.VTABLayoutError as err:
            problems.append(str(err))
            continue
        for split, n in found.items():
            counts[f'{task.name} {split}'] = n
    return counts, problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('dataset', choices=sorted(EXPECTED))
    parser.add_argument('root', help='dataset root (the config\'s data_root)')
    parser.add_argument('--quick', action='store_true', help='sample fewer files')
    args = parser.parse_args(argv)
    if not osp.isdir(args.root):
        print(f'error: {args.root} does not exist', file=sys.stderr)
        return 1
    check = {'ade20k': check_ade20k, 'coco': check_coco,
             'vtab1k': check_vtab1k}[args.dataset]
    counts, problems = check(args.root, args.quick)
    for split, n in counts.items():
        full = EXPECTED[args.dataset].get(split.split()[-1])
        note = '' if full is None or n == full else f' (the full dataset has {full})'
        print(f'{args.dataset} {split}: {n} images{note}')
    for p in problems:
        print(f'problem: {p}', file=sys.stderr)
    if problems:
        return 1
    print(f'{args.root}: layout OK')
    return 0


if __name__ == '__main__':
    sys.exit(main())
