"""Predict on images with a trained or merged colora_mm model, through the upstream
inference APIs (mmseg's ``init_model`` / ``inference_model``, mmdet's
``init_detector`` / ``inference_detector``; the config's ``default_scope`` picks).

    python tools/infer.py CONFIG CHECKPOINT IMAGE|FOLDER [...] --out-dir DIR
        [--device cpu|cuda|cuda:N] [--score-thr T] [--opacity A] [--force]
        [--allow-mismatch] [--cfg-options k=v ...]

CONFIG and CHECKPOINT are what ``tools/test.py`` takes: a training config and one of
its checkpoints, or the checkpoint ``tools/merge.py`` wrote and the config beside it
(the deployment pair). A folder stands for its image files (``.jpg``, ``.jpeg``,
``.png``, ``.bmp``, ``.tif``, ``.tiff``, ``.webp``; not its sub-folders), in name
order. For every image ``NAME.EXT`` it writes into DIR:

* segmentation: ``NAME_pred.png``, the predicted class index of every pixel (8-bit,
  16-bit above 256 classes; index ``i`` is ``classes[i]`` of the checkpoint's dataset,
  at the image's size as decoded: OpenCV applies a JPEG's EXIF orientation, as the
  test pipeline does; ADE20K's files on disk count from 1, as ``tools/test.py --out``
  writes them, these from 0), and ``NAME_vis.jpg``, the prediction painted
  over the image (``--opacity``). The images go through the test set's pipeline
  (``test_dataloader.dataset.pipeline``), as in ``tools/test.py``;
* detection: ``NAME_pred.json``, the boxes (``[x1, y1, x2, y2]`` in the image's
  pixels), scores, class indices and names of the detections scoring at least
  ``--score-thr``, and ``NAME_vis.jpg`` with those boxes drawn;

and ``DIR/classes.json``, the class names and the palette of the painted images. The
class names (and palette) come from the checkpoint (``meta['dataset_meta']``, which
mmengine's runner and ``tools/merge.py`` save); the upstream API's guess from the
number of classes is refused, since it names another dataset's classes. Without a
palette, each class gets a colour drawn from a fixed seed.

Before the model is built, everything is checked and a wrong input ends with one
``error:`` line and exit status 2, nothing written: the config, the adapter spec, the
checkpoint (same tensors and shapes as the config's model, the same adapter settings
when it records them, ``--allow-mismatch`` lets other settings through; class names for
as many classes as the model predicts), the device, each input (an existing image that
OpenCV decodes, not a JPEG cut short; two inputs with the same name would write the
same outputs), and DIR: a writable folder that is not an input folder, no output that
is an input (an image, the checkpoint, the config) or a folder, and no existing output
unless ``--force``. Then, with the model built and still nothing written, each image's
size: one the test pipeline cannot resize (a side below one pixel), or whose network
input has a side below the smallest the backbone takes (32 pixels for ConvNeXt), is
refused the same way, naming its size. Each file is written whole (a temporary file,
then renamed): a run stopped part way leaves the predictions of the images it finished,
and the same command with ``--force`` does them all again.
"""
import argparse
import itertools
import json
import os
import os.path as osp
import sys
import warnings

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from train import (CLIError, load_config, parse_with_clear_errors,  # noqa: E402
                   run_cli)

_CALLS = itertools.count()
#: What a folder given as input stands for.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
SCOPES = ('mmseg', 'mmdet')


def parse_args(argv=None):
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(
        description='Predict on images with a colora_mm segmentor or detector '
        '(trained or merged) through the upstream inference API')
    parser.add_argument('config', help='the config of the checkpoint (for a merged '
                        'checkpoint, the .py tools/merge.py wrote beside it)')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('inputs', nargs='+', metavar='IMAGE',
                        help='image files, or folders of images')
    parser.add_argument('--out-dir', required=True,
                        help='folder for the predictions (created if missing)')
    parser.add_argument(
        '--device', default=None,
        help="'cpu', 'cuda' or 'cuda:N' (default: cuda:0 when a GPU is present, else "
        'cpu)')
    parser.add_argument(
        '--score-thr', type=float, default=0.3,
        help='detection: the lowest score of a detection written and drawn '
        '(default 0.3)')
    parser.add_argument(
        '--opacity', type=float, default=0.5,
        help='segmentation: opacity of the painted prediction, in (0, 1] '
        '(default 0.5)')
    parser.add_argument(
        '--force', action='store_true',
        help='replace predictions an earlier run wrote in --out-dir (refused otherwise)')
    parser.add_argument(
        '--allow-mismatch', action='store_true',
        help='predict although the adapter settings recorded in the checkpoint differ '
        "from the config's")
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override settings of the config, key=value')
    return parse_with_clear_errors(parser, argv)


# ----------------------------------------------------------------------- the inputs
def collect_images(inputs):
    """The image files ``inputs`` name (a folder: its image files, in name order).

    Raises:
        CLIError: a path that does not exist, a folder without images, a file that is
            not an image, two images of the same name.
    """
    images = []
    for path in inputs:
        if osp.isdir(path):
            found = sorted(osp.join(path, name) for name in os.listdir(path)
                           if name.lower().endswith(IMAGE_EXTENSIONS)
                           and osp.isfile(osp.join(path, name)))
            if not found:
                raise CLIError(f'folder {path} holds no image file '
                               f'({", ".join(IMAGE_EXTENSIONS)})')
            images.extend(found)
        elif osp.isfile(path):
            images.append(path)
        else:
            raise CLIError(f'input {path} does not exist')
    for path in images:
        why = unreadable_image(path)
        if why:
            raise CLIError(f'input {path} {why}')
    seen = {}
    for path in images:
        stem = osp.splitext(osp.basename(path))[0]
        if stem in seen and not osp.samefile(seen[stem], path):
            raise CLIError(f'inputs {seen[stem]} and {path} have the same name, so their '
                           f'predictions ({stem}_pred.*) would overwrite each other; '
                           'predict them into separate --out-dir folders')
        seen.setdefault(stem, path)
    return list(dict.fromkeys(seen.values()))


def unreadable_image(path):
    """Why the test pipeline could not read ``path`` (it decodes with OpenCV, as
    ``mmcv.imread`` does), or None: not decodable, or a JPEG cut short (OpenCV would
    fill the missing part with grey and go on)."""
    import mmcv
    try:
        image = mmcv.imread(path, flag='unchanged')
    except Exception:  # noqa: BLE001 - any decoder failure is a bad input
        image = None
    if image is None or image.size == 0:
        return ('is not an image file OpenCV can decode (jpg, png, bmp, tif, webp; '
                'not gif), or is damaged')
    with open(path, 'rb') as f:
        head = f.read(2)
        f.seek(max(0, osp.getsize(path) - 2))
        tail = f.read(2)
    if head == b'\xff\xd8' and tail != b'\xff\xd9':
        return 'is a JPEG cut short (no end marker): download or copy it again'
    return None


def output_paths(image, out_dir, scope):
    stem = osp.splitext(osp.basename(image))[0]
    pred = f'{stem}_pred.png' if scope == 'mmseg' else f'{stem}_pred.json'
    return osp.join(out_dir, pred), osp.join(out_dir, f'{stem}_vis.jpg')


def check_outputs(images, folders, out_dir, scope, force, keep=()):
    """Refuse a DIR that is empty, a file, under a file, not writable, or one of
    the input folders (its predictions would be inputs of the next run); an output
    that is an input image or a file of ``keep`` (the checkpoint, the config), or a
    folder; and an existing output unless ``force``."""
    if not out_dir:
        raise CLIError('--out-dir is empty; name a folder for the predictions')
    if osp.exists(out_dir) and not osp.isdir(out_dir):
        raise CLIError(f'--out-dir {out_dir} is a file; name a folder')
    parent = osp.abspath(out_dir)
    while not osp.exists(parent):
        parent = osp.dirname(parent)
    if not osp.isdir(parent):
        raise CLIError(f'--out-dir {out_dir} lies under {parent}, which is a file; name a '
                       'folder')
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f'--out-dir {out_dir}: {parent} is not writable')
    if any(osp.isdir(out_dir) and osp.samefile(out_dir, f) for f in folders):
        raise CLIError(f'--out-dir {out_dir} is an input folder: the predictions (images '
                       'too) would be read as inputs by the next run over it; choose '
                       'another folder')
    outputs = [p for image in images for p in output_paths(image, out_dir, scope)]
    outputs.append(osp.join(out_dir, 'classes.json'))
    inputs = {osp.realpath(p) for p in list(images) + list(keep)}
    clash = [p for p in outputs if osp.realpath(p) in inputs]
    if clash:
        raise CLIError(f'the prediction {clash[0]} would overwrite an input (an image, '
                       'the checkpoint or the config); choose another --out-dir')
    folders_in_the_way = [p for p in outputs if osp.isdir(p)]
    if folders_in_the_way:
        raise CLIError(f'{folders_in_the_way[0]} is a folder where a prediction goes; '
                       'choose another --out-dir, or move it away')
    existing = [p for p in outputs if osp.lexists(p)]
    if existing and not force:
        more = f' and {len(existing) - 1} more' if len(existing) > 1 else ''
        raise CLIError(f'{existing[0]}{more} exist(s) in --out-dir; choose another '
                       'folder, or pass --force to replace them')


def check_device(device):
    import torch
    if device is None:
        return 'cuda:0' if torch.cuda.is_available() else 'cpu'
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {device!r} is not a device; use 'cpu', 'cuda' or "
                       "'cuda:N'")
    if parsed.type == 'cuda':
        if not torch.cuda.is_available():
            raise CLIError(f'--device {device}: no GPU is available here; use --device '
                           'cpu')
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise CLIError(f'--device {device}: this host has '
                           f'{torch.cuda.device_count()} GPU(s), cuda:0 to '
                           f'cuda:{torch.cuda.device_count() - 1}')
    elif parsed.type != 'cpu':
        raise CLIError(f"--device {device}: use 'cpu', 'cuda' or 'cuda:N'")
    return device


def check_checkpoint(cfg, args):
    """The checkpoint is the config's (as ``tools/test.py`` checks it: tensors, shapes,
    recorded adapter settings) and names its classes, as many as the model predicts;
    returns its ``dataset_meta``."""
    from test import check_checkpoint as check_matches
    checkpoint, model = check_matches(cfg, args)
    meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
    dataset_meta = meta.get('dataset_meta') if isinstance(meta, dict) else None
    if not isinstance(dataset_meta, dict) or not dataset_meta.get('classes'):
        raise CLIError(f'checkpoint {args.checkpoint} does not name its classes (no '
                       "meta['dataset_meta'], which mmengine's runner saves in every "
                       'checkpoint and tools/merge.py keeps); predict with a checkpoint '
                       'of a training run, or its merged version')
    where, predicted = predicted_classes(model)
    named = len(dataset_meta['classes'])
    if predicted is not None and predicted != named:
        raise CLIError(f'checkpoint {args.checkpoint} names {named} classes '
                       f"(meta['dataset_meta']), the model predicts {predicted} "
                       f'({where}): it was trained with a dataset whose class list does '
                       "not match the config's num_classes; set num_classes to the "
                       'dataset\'s and train again')
    return dataset_meta


def predicted_classes(model):
    """``(where, number)`` of the classes the model predicts: the segmentation
    head's, or the detector's box head's (not the class-agnostic proposals'); ``(None,
    None)`` when neither is found."""
    head = getattr(model, 'decode_head', None)
    if head is not None and hasattr(head, 'num_classes'):
        return 'decode_head.num_classes', int(head.num_classes)
    for name, module in model.named_modules():
        if name.split('.')[-1] == 'bbox_head' and not name.startswith('rpn') \
                and isinstance(getattr(module, 'num_classes', None), int):
            return f'{name}.num_classes', module.num_classes
    return None, None


# ---------------------------------------------------------------------- predicting
def init_model(cfg, checkpoint, device):
    """The upstream API's model: the config's model with the checkpoint loaded."""
    with warnings.catch_warnings():
        # the checkpoint was checked above; the API's own notes add nothing
        warnings.simplefilter('ignore', UserWarning)
        if cfg.default_scope == 'mmseg':
            from mmseg.apis import init_model as build
            return build(cfg, osp.abspath(checkpoint), device=device)
        from mmdet.apis import init_detector
        return init_detector(cfg, osp.abspath(checkpoint), device=device)


def network_shape(model, image, scope):
    """``(h, w)`` of the tensor the model gets for ``image``: the test pipeline the
    upstream API runs, then the model's data preprocessor (its padding included).

    Raises:
        CLIError: the pipeline cannot take the image (e.g. a side resized to 0 pixels).
    """
    import mmcv
    import torch
    from mmengine.dataset import Compose
    if scope == 'mmseg':
        steps = [t for t in model.cfg.test_pipeline if t.get('type') != 'LoadAnnotations']
        sample = dict(img_path=image)
    else:
        from mmdet.utils import get_test_pipeline_cfg
        steps = get_test_pipeline_cfg(model.cfg.copy())
        sample = dict(img_path=image, img_id=0)
    try:
        data = Compose(steps)(sample)
    except Exception as err:  # noqa: BLE001 - any transform's failure is this input's
        height, width = mmcv.imread(image, flag='unchanged').shape[:2]
        why = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise CLIError(f'input {image} ({height}x{width} pixels) does not go through the '
                       f'test pipeline ({why}); a very narrow image is resized below one '
                       'pixel on its short side: crop it into pieces of a more usual '
                       'aspect ratio, or leave it out') from None
    with torch.no_grad():
        batch = model.data_preprocessor(
            dict(inputs=[data['inputs']], data_samples=[data['data_samples']]), False)
    return tuple(batch['inputs'].shape[-2:])


#: Network inputs with both sides this large or larger are not checked against the
#: backbone's smallest input (every backbone here takes 32 pixels).
CHECKED_BELOW = 256


def smallest_input_side(model, largest=CHECKED_BELOW):
    """The smallest side (pixels) of a square input the model's feature extractor
    (backbone and neck) takes, found by trying zero images; None where even
    ``largest`` fails (the real inference then reports why)."""
    import torch

    def takes(side):
        try:
            with torch.no_grad():
                model.extract_feat(torch.zeros(1, 3, side, side, device=device))
        except Exception:  # noqa: BLE001 - what a too small input raises varies by module
            return False
        return True

    device = next(model.parameters()).device
    if not takes(largest):
        return None
    low, high = 0, 1               # low fails (or is 0), high is the candidate
    while high < largest and not takes(high):
        low, high = high, min(2 * high, largest)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if takes(mid) else (mid, high)
    return high


def check_image_sizes(model, images, scope):
    """Refuse, before anything is written, an image the model cannot take: one the test
    pipeline cannot resize, or one whose network input has a side below the smallest
    the backbone downsamples to a feature map (e.g. 32 pixels for ConvNeXt)."""
    smallest = None
    for image in images:
        height, width = network_shape(model, image, scope)
        if min(height, width) >= CHECKED_BELOW:
            continue
        if smallest is None:
            smallest = smallest_input_side(model) or 0
        if min(height, width) < smallest:
            import mmcv
            h0, w0 = mmcv.imread(image, flag='unchanged').shape[:2]
            raise CLIError(
                f'input {image} ({h0}x{w0} pixels) reaches the model as {height}x{width} '
                f'after the test pipeline, and {type(model.backbone).__name__} takes at '
                f'least {smallest} pixels on each side: crop it into pieces of a more '
                'usual aspect ratio (or pad it), or leave it out')


def predict(model, image, scope):
    if scope == 'mmseg':
        from mmseg.apis import inference_model
        return inference_model(model, image)
    from mmdet.apis import inference_detector
    return inference_detector(model, image)


def write_label_map(path, labels, num_classes):
    import numpy as np
    from PIL import Image
    labels = labels.astype(np.uint8 if num_classes <= 256 else np.uint16)
    Image.fromarray(labels).save(path)


def detections(result, classes, score_thr):
    inst = result.pred_instances
    keep = inst.scores >= score_thr
    rows = []
    for box, score, label in zip(inst.bboxes[keep].tolist(), inst.scores[keep].tolist(),
                                 inst.labels[keep].tolist()):
        rows.append(dict(bbox=[round(v, 2) for v in box], score=score,
                         label=int(label), **{'class': classes[int(label)]}))
    return rows


def with_palette(dataset_meta):
    """``dataset_meta`` with a palette: its own, else one colour per class drawn
    from a fixed seed (the same colours on every run)."""
    meta = dict(dataset_meta)
    classes = list(meta['classes'])
    palette = meta.get('palette')
    if not palette or len(palette) < len(classes):
        import numpy as np
        palette = np.random.RandomState(42).randint(0, 256, size=(len(classes), 3))
    # (r, g, b) tuples: what the visualizers take a colour to be
    meta['palette'] = [tuple(int(v) for v in c) for c in palette]
    return meta


def visualizer(scope, dataset_meta, opacity):
    # visualizers are named instances: a new name each call, for this call's opacity
    name = f'colora_mm_infer_{os.getpid()}_{next(_CALLS)}'
    if scope == 'mmseg':
        from mmseg.visualization import SegLocalVisualizer
        vis = SegLocalVisualizer.get_instance(name, alpha=opacity)
    else:
        from mmdet.visualization import DetLocalVisualizer
        vis = DetLocalVisualizer.get_instance(name)
    vis.dataset_meta = dataset_meta
    return vis


def write_atomic(path, write):
    tmp = f'{path}.tmp-{os.getpid()}{osp.splitext(path)[1]}'
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)


def run(args):
    if not 0 < args.opacity <= 1:
        raise CLIError(f'--opacity {args.opacity}: give a value in (0, 1]')
    if not 0 <= args.score_thr <= 1:
        raise CLIError(f'--score-thr {args.score_thr}: give a score in [0, 1]')
    if not osp.isfile(args.checkpoint):
        raise CLIError(f'checkpoint {args.checkpoint} does not exist')
    cfg = load_config(args.config, args.cfg_options)
    scope = cfg.get('default_scope')
    if scope not in SCOPES:
        raise CLIError(f'{args.config}: default_scope {scope!r}; this tool predicts with '
                       f'{" or ".join(SCOPES)} configs (segmentation, detection)')
    if scope == 'mmseg':
        # mmseg's API reads the top-level test_pipeline: use the test set's, so that
        # the predictions are the ones tools/test.py evaluates
        pipeline = ((cfg.get('test_dataloader') or {}).get('dataset') or {}).get(
            'pipeline')
        if pipeline:
            cfg.test_pipeline = pipeline
    images = collect_images(args.inputs)
    check_outputs(images, [p for p in args.inputs if osp.isdir(p)], args.out_dir, scope,
                  args.force, keep=(args.checkpoint, args.config))
    device = check_device(args.device)
    dataset_meta = with_palette(check_checkpoint(cfg, args))

    import mmcv
    model = init_model(cfg, args.checkpoint, device)
    model.dataset_meta = dataset_meta
    check_image_sizes(model, images, scope)
    classes = list(dataset_meta['classes'])
    vis = visualizer(scope, dataset_meta, args.opacity)
    os.makedirs(args.out_dir, exist_ok=True)
    for image in images:
        pred_path, vis_path = output_paths(image, args.out_dir, scope)
        result = predict(model, image, scope).cpu()
        if scope == 'mmseg':
            labels = result.pred_sem_seg.data[0].numpy()
            write_atomic(pred_path, lambda p: write_label_map(p, labels, len(classes)))
            summary = f'{len(set(labels.ravel().tolist()))} classes present'
            draw = dict(draw_gt=False, draw_pred=True)
        else:
            rows = detections(result, classes, args.score_thr)

            def write_json(p, rows=rows, image=image):
                with open(p, 'w') as f:
                    json.dump(dict(image=osp.abspath(image), score_thr=args.score_thr,
                                   detections=rows), f, indent=1)
            write_atomic(pred_path, write_json)
            summary = f'{len(rows)} detections with score >= {args.score_thr}'
            # exactly the detections written (the visualizer's own threshold keeps
            # scores above it, not at it)
            result.pred_instances = result.pred_instances[
                result.pred_instances.scores >= args.score_thr]
            draw = dict(draw_gt=False, draw_pred=True, pred_score_thr=-1.0)
        rgb = mmcv.imread(image, channel_order='rgb')
        vis.add_datasample(osp.basename(image), rgb, result, show=False, **draw)
        painted = vis.get_image()
        write_atomic(vis_path, lambda p: mmcv.imwrite(mmcv.rgb2bgr(painted), p))
        print(f'{image}: {summary} -> {pred_path}, {vis_path}')

    def write_classes(p):
        with open(p, 'w') as f:
            json.dump(dict(classes=classes,
                           palette=[list(c) for c in dataset_meta['palette']]),
                      f, indent=1)
    write_atomic(osp.join(args.out_dir, 'classes.json'), write_classes)
    print(f'{len(images)} image(s) predicted into {args.out_dir}')


def main(argv=None):
    return run_cli(run, parse_args(argv))


if __name__ == '__main__':
    sys.exit(main())
