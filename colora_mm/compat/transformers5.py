"""mmpretrain 1.2.0 + transformers >= 5: ``import mmpretrain.models`` fails.

mmpretrain turns its multi-modal models on when ``transformers>=4.28.0`` and
``pycocotools`` are installed (``mmpretrain.utils.dependency.WITH_MULTIMODAL``); their
modules import names transformers 5 removed (``apply_chunking_to_forward`` and others
from ``transformers.modeling_utils``), fall back to ``None`` and then subclass it:
``TypeError: NoneType takes no arguments`` on importing any mmpretrain model. Hugging
Face peft (the benchmark's optional LoRA reference) pulls in a current transformers,
and so do many CUDA environments. With transformers >= 5 the multi-modal models are
left out (mmpretrain's own placeholders say what they need); every other model is
unaffected. Applied before mmpretrain's models are imported.
"""
from __future__ import annotations

import importlib.metadata as metadata
import sys


def transformers_major() -> int:
    try:
        return int(metadata.version('transformers').split('.')[0])
    except (metadata.PackageNotFoundError, ValueError):
        return 0


def patch_mmpretrain_multimodal() -> bool:
    """Turn mmpretrain's multi-modal models off under transformers >= 5. Returns
    whether it did. Too late (no effect) once ``mmpretrain.models`` is imported."""
    if transformers_major() < 5 or 'mmpretrain.models' in sys.modules:
        return False
    try:
        from mmpretrain.utils import dependency
    except ImportError:
        return False
    dependency.WITH_MULTIMODAL = False
    return True
