"""Synthetic two-domain segmentation data in the ADE20K folder layout, for the CPU demo.

Every image shows a few coloured shapes (discs, squares, triangles, crosses) on a
background. Two domains share the classes and differ in everything else:

* ``source``: flat, nearly grey backgrounds, large shapes (half-size 9-16 px), two to
  four per image, each class with its own hue (disc 0, square 90, triangle 180,
  cross 270 degrees, +-12), little pixel noise. This is what the model is pretrained on.
* ``target``: textured backgrounds (two random oriented stripe patterns of random,
  fairly saturated colours, plus strong noise and a slight blur), smaller and more
  numerous shapes (half-size 5-10 px, three to six per image), and the palette rotated
  by 60 degrees, so each class now looks most like the *next* class did in the source
  domain. A source-trained model mostly mislabels it: adapting matters.

Layout and label conventions are those of ADE20K (``ADEChallengeData2016``), which
mmseg's ADE20K configs read::

    ROOT/images/training/ADE_train_00000001.jpg     ROOT/annotations/training/...png
    ROOT/images/validation/ADE_val_00000001.jpg     ROOT/annotations/validation/...png

Label maps are single-channel PNGs: 0 is "unlabelled" (here: the one-pixel band of
background around every shape; ``reduce_zero_label=True`` maps it to 255, ignored),
``k = 1..K`` is class ``k - 1`` of :data:`CLASSES` (1 = background).

Pure numpy + PIL; the same ``seed`` writes byte-identical files.
"""
from __future__ import annotations

import colorsys
import os
import os.path as osp
from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

#: Class names, in label order after ``reduce_zero_label`` (PNG value = index + 1).
CLASSES = ('background', 'disc', 'square', 'triangle', 'cross')
#: Display colours of the classes (figures only; image colours come from the domains).
PALETTE = ((110, 110, 110), (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48))
#: Hue (degrees) of every shape class in the source domain.
SOURCE_HUES = {'disc': 0.0, 'square': 90.0, 'triangle': 180.0, 'cross': 270.0}
IGNORE = 0


@dataclass(frozen=True)
class Domain:
    """How one domain's images are drawn.

    Args:
        name (str): ``'source'`` or ``'target'``.
        shapes (tuple[int, int]): Shapes per image, inclusive range.
        half_size (tuple[int, int]): Shape half-size in pixels, inclusive range.
        hue_shift (float): Degrees added to every class hue of :data:`SOURCE_HUES`.
        textured (bool): Stripe-textured coloured backgrounds instead of flat grey.
        noise (float): Std of the Gaussian pixel noise (0-255 scale).
        blur (float): Gaussian blur radius in pixels (0: none).
    """

    name: str
    shapes: Tuple[int, int]
    half_size: Tuple[int, int]
    hue_shift: float
    textured: bool
    noise: float
    blur: float


DOMAINS: Dict[str, Domain] = {
    'source': Domain('source', shapes=(2, 4), half_size=(9, 16), hue_shift=0.0,
                     textured=False, noise=4.0, blur=0.0),
    'target': Domain('target', shapes=(3, 6), half_size=(5, 10), hue_shift=60.0,
                     textured=True, noise=18.0, blur=0.6),
}


def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((h_deg % 360.0) / 360.0, s, v)) * 255.0


def _shape_polygon(kind: str, cy: float, cx: float, half: float, angle: float):
    """Vertices (x, y) of a square / triangle / cross centred at (cx, cy), rotated."""
    if kind == 'square':
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif kind == 'triangle':
        pts = [(0, -1.15), (1.1, 0.85), (-1.1, 0.85)]
    elif kind == 'cross':
        t = 0.38
        pts = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1),
               (-t, t), (-1, t), (-1, -t), (-t, -t)]
    else:
        raise ValueError(f'unknown shape {kind!r}')
    c, s = np.cos(angle), np.sin(angle)
    return [(cx + half * (x * c - y * s), cy + half * (x * s + y * c)) for x, y in pts]


def _background(domain: Domain, size: int, rng: np.random.Generator) -> np.ndarray:
    if not domain.textured:
        grey = rng.uniform(0.45, 0.95)
        tint = _hsv(rng.uniform(0, 360), rng.uniform(0.0, 0.12), grey)
        return np.broadcast_to(tint, (size, size, 3)).astype(np.float64).copy()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    img = np.zeros((size, size, 3))
    for _ in range(2):
        theta = rng.uniform(0, np.pi)
        freq = rng.uniform(0.12, 0.45)        # cycles per pixel: fine stripes
        phase = rng.uniform(0, 2 * np.pi)
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(theta)
                                                       + yy * np.sin(theta)) + phase)
        a = _hsv(rng.uniform(0, 360), rng.uniform(0.25, 0.7), rng.uniform(0.3, 0.9))
        b = _hsv(rng.uniform(0, 360), rng.uniform(0.25, 0.7), rng.uniform(0.3, 0.9))
        img += 0.5 * (a + (b - a) * wave[..., None])
    return img


def render_sample(domain: Domain, size: int, rng: np.random.Generator
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """One ``(image uint8 HxWx3, label uint8 HxW)`` pair of ``domain``."""
    inst = Image.new('L', (size, size), 0)          # instance id per pixel, 0 = none
    draw = ImageDraw.Draw(inst)
    kinds = []
    for k in range(int(rng.integers(domain.shapes[0], domain.shapes[1] + 1))):
        kind = CLASSES[1 + int(rng.integers(0, len(CLASSES) - 1))]
        half = float(rng.uniform(domain.half_size[0], domain.half_size[1]))
        margin = half * 0.8
        cy, cx = rng.uniform(margin, size - margin, size=2)
        angle = float(rng.uniform(0, 2 * np.pi))
        if kind == 'disc':
            draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=k + 1)
        else:
            draw.polygon(_shape_polygon(kind, cy, cx, half, angle), fill=k + 1)
        kinds.append(kind)
    inst = np.asarray(inst)

    img = _background(domain, size, rng)
    label = np.ones((size, size), np.uint8)          # 1 = background
    for k, kind in enumerate(kinds):
        mask = inst == k + 1
        if not mask.any():                           # fully covered by later shapes
            continue
        hue = SOURCE_HUES[kind] + domain.hue_shift + rng.uniform(-12, 12)
        img[mask] = _hsv(hue, rng.uniform(0.6, 0.95), rng.uniform(0.65, 0.95))
        label[mask] = 1 + CLASSES.index(kind)
    # ADE-style unlabelled band: background pixels 4-adjacent to a shape.
    shape = label > 1
    near = np.zeros_like(shape)
    near[1:] |= shape[:-1]
    near[:-1] |= shape[1:]
    near[:, 1:] |= shape[:, :-1]
    near[:, :-1] |= shape[:, 1:]
    label[near & ~shape] = IGNORE

    img = img + rng.normal(0.0, domain.noise, size=img.shape)
    img = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    if domain.blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(domain.blur))
    return np.asarray(img), label


def make_domain(root: str, domain: str, num_train: int = 320, num_val: int = 64,
                size: int = 64, seed: int = 0) -> str:
    """Write one domain as an ADE20K-layout dataset under ``root``.

    Args:
        root (str): Output folder (created).
        domain (str): A key of :data:`DOMAINS`.
        num_train (int): Training images. Defaults to 320.
        num_val (int): Validation images. Defaults to 64.
        size (int): Image side in pixels. Defaults to 64.
        seed (int): Random seed; each (domain, split) draws from its own stream, so
            changing one split's count leaves the others' images unchanged.
            Defaults to 0.

    Returns:
        str: ``root``.
    """
    spec = DOMAINS[domain]
    domain_id = sorted(DOMAINS).index(domain)
    for split_id, (split, tag, count) in enumerate((('training', 'train', num_train),
                                                    ('validation', 'val', num_val))):
        rng = np.random.default_rng([seed, domain_id, split_id])
        img_dir = osp.join(root, 'images', split)
        ann_dir = osp.join(root, 'annotations', split)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(ann_dir, exist_ok=True)
        for i in range(1, count + 1):
            image, label = render_sample(spec, size, rng)
            name = f'ADE_{tag}_{i:08d}'
            Image.fromarray(image).save(osp.join(img_dir, name + '.jpg'), quality=92)
            Image.fromarray(label).save(osp.join(ann_dir, name + '.png'))
    return root


def make_demo_data(root: str, num_train: int = 320, num_val: int = 64, size: int = 64,
                   seed: int = 0) -> Dict[str, str]:
    """Both domains, as ``root/source`` and ``root/target``; returns their roots."""
    return {name: make_domain(osp.join(root, name), name, num_train, num_val, size, seed)
            for name in DOMAINS}
