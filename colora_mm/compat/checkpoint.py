"""Resume and ``load_from`` for mmengine checkpoints under torch >= 2.6.

Made necessary by mmengine 0.10.7 (the latest release, still current upstream) together
with torch 2.6, which changed ``torch.load``'s default to ``weights_only=True``.
mmengine's local-file loader calls ``torch.load(filename, map_location=...)`` without
``weights_only``, and the checkpoints mmengine itself writes carry more than tensors
(the message hub's history buffers, numpy scalars, the config text), so every
``--resume``, ``load_from`` and local ``init_cfg=dict(type='Pretrained', ...)`` of such a
file fails with ``UnpicklingError: Weights only load failed``.

The fix re-registers only the loader for local paths (mmengine's empty scheme prefix),
through mmengine's own extension point ``CheckpointLoader.register_scheme(force=True)``:
a local file is one the user named in a config or on the command line, so it is loaded
as mmengine < 0.10.7 on torch < 2.6 loaded it, with ``weights_only=False``. Checkpoints
fetched from URLs keep torch's safe default.
"""
from __future__ import annotations

import os.path as osp

import torch
from mmengine.runner.checkpoint import CheckpointLoader

_LOCAL_SCHEME = ''


def load_from_local_trusted(filename: str, map_location=None):
    """Load a checkpoint from a local path the user chose (``weights_only=False``).

    Args:
        filename (str): Path to the checkpoint; ``~`` is expanded.
        map_location: Same as :func:`torch.load`. Defaults to None.

    Returns:
        dict: The loaded checkpoint.
    """
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    return torch.load(filename, map_location=map_location, weights_only=False)


def patch_local_checkpoint_loader() -> bool:
    """Make mmengine load local checkpoints with ``weights_only=False``.

    Idempotent. Returns True when the loader was (re-)registered, False when it already
    was in place.
    """
    if CheckpointLoader._schemes.get(_LOCAL_SCHEME) is load_from_local_trusted:
        return False
    CheckpointLoader.register_scheme(
        prefixes=_LOCAL_SCHEME, loader=load_from_local_trusted, force=True)
    return True
