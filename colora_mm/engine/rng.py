"""The random generators a training run draws from, captured and restored.

mmengine 0.10.7 seeds the generators once at start-up and never saves them, so a resumed
run draws other dropout masks, drop-path decisions and augmentations than the
uninterrupted run did at the same iteration. :func:`rng_state` captures Python's
``random``, NumPy's global generator, torch's CPU generator and every CUDA device's;
:func:`gather_rng_states` collects one state per process of a distributed run (rank
order), :func:`set_rng_state` puts one back.
"""
from __future__ import annotations

import random
from typing import Dict, List, Optional

import numpy as np
import torch


def rng_state() -> Dict:
    """The state of every generator of this process (CPU tensors, picklable)."""
    state = dict(python=random.getstate(), numpy=np.random.get_state(),
                 torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Dict) -> Optional[str]:
    """Restore a :func:`rng_state`. Returns None, or why the CUDA part was not restored
    (another number of devices, or none here)."""
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    cuda = state.get('cuda')
    if not cuda:
        return None
    if not torch.cuda.is_available():
        return f'the checkpoint holds {len(cuda)} CUDA generator states; no CUDA here'
    if len(cuda) != torch.cuda.device_count():
        return (f'the checkpoint holds {len(cuda)} CUDA generator states, this process '
                f'sees {torch.cuda.device_count()} devices')
    torch.cuda.set_rng_state_all(cuda)
    return None


def gather_rng_states(state: Optional[Dict] = None) -> List[Dict]:
    """Every process's :func:`rng_state` (or ``state``, when given), in rank order (a
    collective call: every rank of a distributed run must make it)."""
    from mmengine.dist import all_gather_object, get_world_size
    state = rng_state() if state is None else state
    if get_world_size() == 1:
        return [state]
    return all_gather_object(state)
