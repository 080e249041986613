"""Fixes for what the OpenMMLab 2.x stack does wrong on current torch.

Each fix lives in its own module, names the upstream release that made it necessary,
patches as little as it can, and is applied once, on ``import colora_mm``:

* :mod:`.checkpoint`: mmengine 0.10.7 + torch >= 2.6 refuse mmengine's own checkpoints
  (``weights_only``), breaking ``--resume``; local checkpoints load again.
* :mod:`.distributed`: mmengine 0.10.7 selects a CUDA device even on CPU-only hosts;
  torchrun + gloo on CPU works. :func:`cpu_ddp_wrapper_cfg` /
  :func:`configure_cpu_ddp` give the DDP wrapper config such a run needs.
* :mod:`.numpy2`: mmpretrain 1.2.0's retrieval metrics call ``np.in1d``, which numpy
  2.4 removed; they work again (numpy 2.x is what CUDA PyTorch environments ship, and
  what ``tools/setup_offline.sh`` keeps).
* :mod:`.transformers5`: mmpretrain 1.2.0's multi-modal models break
  ``import mmpretrain.models`` when transformers >= 5 is installed; they are left out.
"""
from .checkpoint import load_from_local_trusted, patch_local_checkpoint_loader
from .distributed import (configure_cpu_ddp, cpu_ddp_wrapper_cfg,
                          patch_init_dist_pytorch)
from .numpy2 import patch_mmpretrain_retrieval_in1d
from .transformers5 import patch_mmpretrain_multimodal


def apply_all() -> None:
    """Apply every fix; safe to call any number of times."""
    patch_mmpretrain_multimodal()
    patch_local_checkpoint_loader()
    patch_init_dist_pytorch()
    patch_mmpretrain_retrieval_in1d()


apply_all()

__all__ = [
    'apply_all', 'configure_cpu_ddp', 'cpu_ddp_wrapper_cfg',
    'load_from_local_trusted', 'patch_init_dist_pytorch',
    'patch_local_checkpoint_loader', 'patch_mmpretrain_multimodal',
    'patch_mmpretrain_retrieval_in1d'
]
