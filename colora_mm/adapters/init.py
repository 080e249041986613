"""Initialisation shared by the low-rank adapters.

``A`` matrices follow LoRA's convention: kaiming-uniform with ``a = sqrt(5)``, i.e.
``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` where ``fan_in`` is the input width of the layer
the factor reads from (``d`` for ``A1 (d x r)``), whatever orientation the tensor is
stored in. ``B`` matrices start at zero, so a fresh adapter changes nothing.
"""
import math

import torch


def a_bound(fan_in: int) -> float:
    """Half-width of the kaiming-uniform (a = sqrt(5)) interval for ``fan_in``."""
    return 1.0 / math.sqrt(fan_in)


def a_std(fan_in: int) -> float:
    """Standard deviation of that uniform distribution: ``bound / sqrt(3)``."""
    return a_bound(fan_in) / math.sqrt(3.0)


@torch.no_grad()
def init_a_(tensor: torch.Tensor, fan_in: int) -> torch.Tensor:
    bound = a_bound(fan_in)
    return tensor.uniform_(-bound, bound)
