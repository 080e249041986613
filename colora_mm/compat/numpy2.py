"""mmpretrain's retrieval metrics on numpy >= 2.4.

Made necessary by mmpretrain 1.2.0 (the latest release) together with numpy 2.4, which
removed ``np.in1d`` (deprecated since numpy 2.0 in favour of ``np.isin``):
``RetrievalRecall.calculate`` and ``RetrievalAveragePrecision`` (through
``_calculateAp_for_sample``) call it, so both metrics raise ``AttributeError`` on the
numpy 2.x that current CUDA PyTorch environments ship. Of every ``np.<name>`` that
mmcv 2.1.0, mmengine 0.10.7, mmseg 1.2.2, mmdet 3.3.0 and mmpretrain 1.2.0 use, numpy
2.5 lacks only ``in1d`` and ``float`` (gone since numpy 1.24, used by mmcv's
``pixel_group`` op and mmdet's YouTube-VIS evaluation, which colora_mm does not use).

The fix gives that one module a view of numpy whose ``in1d`` is what numpy's was
(``np.isin`` on the flattened first argument); numpy itself and every other module are
untouched, and nothing is done where numpy still has ``in1d``.
"""
from __future__ import annotations

import numpy as np


class NumpyWithIn1d:
    """numpy, plus the ``in1d`` that numpy 2.4 removed."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def in1d(ar1, ar2, assume_unique=False, invert=False, *, kind=None):
        return np.isin(np.asarray(ar1).ravel(), ar2, assume_unique=assume_unique,
                       invert=invert, kind=kind)


def patch_mmpretrain_retrieval_in1d() -> bool:
    """Give ``mmpretrain.evaluation.metrics.retrieval`` an ``np.in1d`` again.

    Idempotent. Returns True when the module was patched now, False when numpy has
    ``in1d``, mmpretrain is not installed, or the patch is already in place.
    """
    if hasattr(np, 'in1d'):
        return False
    try:
        from mmpretrain.evaluation.metrics import retrieval
    except ImportError:
        return False
    if isinstance(retrieval.np, NumpyWithIn1d):
        return False
    retrieval.np = NumpyWithIn1d()
    return True
