"""colora_mm: CoLoRA (correlated low-rank adaptation for ConvNets) for OpenMMLab 2.x.

``import colora_mm`` registers the package's backbones, hooks and optimizer
constructors in the OpenMMLab registries (``custom_imports=dict(imports=['colora_mm'])``
in a config does the same). The adapter math in :mod:`colora_mm.adapters` is pure
PyTorch and works without OpenMMLab installed.
"""
from .version import __version__

try:  # OpenMMLab is optional for the pure-PyTorch adapters.
    import mmengine  # noqa: F401
except ImportError:  # pragma: no cover - exercised by a subprocess test
    _HAS_OPENMMLAB = False
else:
    _HAS_OPENMMLAB = True

if _HAS_OPENMMLAB:
    from . import registration  # noqa: F401,E402

__all__ = ['__version__']
