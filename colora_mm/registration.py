"""Imported by ``import colora_mm`` when OpenMMLab is installed: applies the
compatibility fixes and registers backbones, necks, datasets, hooks and optimizer
constructors."""
from . import compat  # noqa: F401  (first: fixes must precede any runner)
from . import datasets  # noqa: F401
from . import engine  # noqa: F401
from . import models  # noqa: F401
