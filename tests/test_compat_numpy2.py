"""colora_mm.compat.numpy2: mmpretrain 1.2.0's retrieval metrics without ``np.in1d``
(removed in numpy 2.4); on older numpy the absence is simulated."""
import numpy as np
import pytest
import torch

pytest.importorskip('mmpretrain')

import colora_mm  # noqa: E402,F401  (applies colora_mm.compat)
from colora_mm.compat import numpy2  # noqa: E402
from mmpretrain.evaluation.metrics import (RetrievalAveragePrecision,  # noqa: E402
                                           RetrievalRecall)
from mmpretrain.evaluation.metrics import retrieval  # noqa: E402

PRED = torch.tensor([[0.9, 0.1, 0.5, 0.2],     # ranks: 0, 2, 3, 1
                     [0.1, 0.8, 0.3, 0.05]])   # ranks: 1, 2, 0, 3
TARGET = [[0, 3], [3]]


def check_metrics():
    recall = RetrievalRecall.calculate(PRED, TARGET, topk=(1, 2, 4),
                                       target_indices=True)
    assert [float(r) for r in recall] == [50.0, 50.0, 100.0]
    ap = RetrievalAveragePrecision.calculate(PRED, TARGET, topk=4, target_indices=True)
    # sample 0: hits at ranks 1 and 3 -> (1/1 + 2/3) / 2; sample 1: hit at rank 4 -> 1/4
    expected = ((1 + 2 / 3) / 2 + 1 / 4) / 2 * 100
    assert float(ap) == pytest.approx(expected, rel=1e-6)


def test_retrieval_metrics_on_this_numpy():
    if not hasattr(np, 'in1d'):
        assert isinstance(retrieval.np, numpy2.NumpyWithIn1d)
    check_metrics()


def test_patch_when_numpy_lacks_in1d(monkeypatch):
    if hasattr(np, 'in1d'):
        monkeypatch.delattr(np, 'in1d')
        monkeypatch.setattr(retrieval, 'np', np)   # undone after the test
        with pytest.raises(AttributeError):
            check_metrics()
        assert numpy2.patch_mmpretrain_retrieval_in1d() is True
    assert numpy2.patch_mmpretrain_retrieval_in1d() is False      # idempotent
    check_metrics()


def test_in1d_is_numpys():
    shim = numpy2.NumpyWithIn1d()
    a = np.array([[1, 5, 2], [7, 2, 9]])
    b = np.array([2, 9, 4])
    assert shim.in1d(a, b).tolist() == [False, False, True, False, True, True]
    assert shim.in1d(a, b, invert=True).tolist() == [True, True, False, True, False,
                                                      False]
    assert shim.arange is np.arange
