r"""Which way a low-rank update ``dW = L R`` (``L (a x k)``, ``R (k x b)``) is applied.

* activation path: ``y = x W + (x L) R``. No weight-sized tensor is formed and none is
  saved for backward; the extra work is three thin GEMMs per pass (``3 T k (a + b)``
  multiply-adds over forward and backward, ``T k a`` more on a widening layer whose
  ``z = x L`` the backward forms again) and the traffic of reading ``x`` and the
  output gradient once more (about ``3a + 4b`` floats per token).
* weight path: ``y = x (W + L R)``. Forms ``L R`` and ``W + L R`` (weight-sized), and its
  backward computes the weight-sized gradient ``x^T dy`` (``T a b`` multiply-adds, the
  GEMM full fine-tuning pays for) before reducing it onto the factors
  (``2 a b k``). It wins on many tokens through narrow layers, where the thin GEMMs of
  the activation path are bound by memory traffic rather than arithmetic.

:func:`path_costs` prices both in multiply-add equivalents, with a memory-traffic
weight per float (:data:`FLOPS_PER_FLOAT`) standing for the device's ratio of
arithmetic to bandwidth. The choice is deterministic: the same shapes always take the
same path.
"""
from __future__ import annotations

from typing import Dict, Tuple

TRAIN_PATHS = ('auto', 'activation', 'weight')

#: Multiply-adds a float of memory traffic costs as much time as, by device type
#: (fp32 peak over memory bandwidth per float, rounded: a CPU core ~ 30, a data-centre
#: GPU ~ 50).
FLOPS_PER_FLOAT: Dict[str, float] = {'cpu': 30.0, 'cuda': 50.0}
DEFAULT_FLOPS_PER_FLOAT = 40.0


def path_costs(tokens: int, d_in: int, d_out: int, rank: int, training: bool = True,
               device_type: str = 'cpu') -> Tuple[float, float]:
    """``(activation, weight)``: the extra cost of each path over the frozen base op,
    in multiply-add equivalents."""
    t, a, b, k = float(tokens), float(d_in), float(d_out), float(rank)
    beta = FLOPS_PER_FLOAT.get(device_type, DEFAULT_FLOPS_PER_FLOAT)
    if training:
        act = 3 * t * k * (a + b) + beta * t * (3 * a + 4 * b + 5 * k)
        if a <= b:      # at most: z = x L formed again in backward (where x is too)
            act += t * k * a
        # forms L R, W + L R; weight gradient; gradients of the factors; the weight-sized
        # tensors written and read back (about five passes over a x b floats)
        weight = t * a * b + 3 * a * b * k + beta * 5 * a * b
    else:
        act = t * k * (a + b) + beta * t * (a + 2 * b + 2 * k)
        weight = a * b * k + beta * 3 * a * b
    return act, weight


def prefer_activation_path(tokens: int, d_in: int, d_out: int, rank: int,
                           training: bool = True, device_type: str = 'cpu') -> bool:
    """Whether the activation path is the cheaper one for this layer and input."""
    act, weight = path_costs(tokens, d_in, d_out, rank, training, device_type)
    return act <= weight
