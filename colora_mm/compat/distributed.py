"""Distributed training on CPU-only hosts (gloo) with mmengine.

Made necessary by mmengine 0.10.7, whose ``mmengine.dist.utils._init_dist_pytorch``
(the ``launcher='pytorch'`` path used by torchrun) calls ``torch.cuda.set_device`` before
``init_process_group`` unconditionally, so a CPU-only host fails before gloo is even
started. The patch replaces that one function: with CUDA available (or an MLU/NPU/MUSA
device, which mmengine handles in the same function) it is mmengine's own code, untouched;
without, it initialises the process group without selecting a device.

The second half of a CPU run needs no patch: ``Runner.wrap_model`` passes
``device_ids=[LOCAL_RANK]`` to ``MMDistributedDataParallel`` only as a default, so a
``model_wrapper_cfg`` with ``device_ids=None`` (what DDP requires for a CPU module) wins;
:func:`cpu_ddp_wrapper_cfg` builds it and :func:`configure_cpu_ddp` applies it together
with the gloo backend to a config.
"""
from __future__ import annotations

from typing import Any, Dict

import torch
import torch.distributed as torch_dist
import mmengine.dist.utils as dist_utils
from mmengine.device import (is_mlu_available, is_musa_available,
                             is_npu_available)

_upstream_init_dist_pytorch = dist_utils._init_dist_pytorch


def _init_dist_pytorch(backend, init_backend='torch', **kwargs) -> None:
    """mmengine's ``_init_dist_pytorch``, without ``torch.cuda.set_device`` when
    there is no CUDA device to set."""
    if (torch.cuda.is_available() or is_mlu_available() or is_npu_available()
            or is_musa_available()):
        return _upstream_init_dist_pytorch(
            backend, init_backend=init_backend, **kwargs)
    if init_backend != 'torch':
        raise ValueError(
            f'init_backend={init_backend!r} needs a GPU; on a CPU-only host use '
            "init_backend='torch' with dist_cfg=dict(backend='gloo').")
    if backend == 'nccl':
        raise ValueError(
            "dist_cfg backend 'nccl' needs CUDA, which this host does not have; set "
            "env_cfg=dict(dist_cfg=dict(backend='gloo')) (colora_mm.compat."
            'configure_cpu_ddp(cfg) does it).')
    torch_dist.init_process_group(backend=backend, **kwargs)


def patch_init_dist_pytorch() -> bool:
    """Install the CPU-aware ``_init_dist_pytorch`` in mmengine. Idempotent; returns
    True when it changed anything."""
    if dist_utils._init_dist_pytorch is _init_dist_pytorch:
        return False
    dist_utils._init_dist_pytorch = _init_dist_pytorch
    return True


def cpu_ddp_wrapper_cfg(find_unused_parameters: bool = False,
                        **kwargs: Any) -> Dict[str, Any]:
    """The ``model_wrapper_cfg`` for a DDP run on CPU.

    The same wrapper mmengine builds by default (``MMDistributedDataParallel`` with
    ``broadcast_buffers=False``) but with ``device_ids=None``, which DDP requires when
    the module lives on the CPU.

    Args:
        find_unused_parameters (bool): Passed to DDP. Defaults to False.
        **kwargs: Further DDP arguments.

    Returns:
        dict: ``dict(type='MMDistributedDataParallel', device_ids=None, ...)``.
    """
    cfg = dict(type='MMDistributedDataParallel', device_ids=None,
               broadcast_buffers=False,
               find_unused_parameters=find_unused_parameters)
    cfg.update(kwargs)
    return cfg


def configure_cpu_ddp(cfg) -> bool:
    """Adapt a runner config for a distributed run on a host without CUDA.

    Does nothing (returns False) when CUDA is available or when the run is not
    distributed (``cfg.launcher`` missing or ``'none'``). Otherwise sets the gloo
    backend and, unless ``cfg.model_wrapper_cfg`` is set already, the wrapper from
    :func:`cpu_ddp_wrapper_cfg` (an existing DDP-type wrapper cfg without
    ``device_ids`` gets ``device_ids=None``). Returns True when it changed ``cfg``.

    Args:
        cfg (mmengine.Config): The config ``Runner.from_cfg`` will receive.
    """
    if torch.cuda.is_available() or cfg.get('launcher', 'none') == 'none':
        return False
    env_cfg = cfg.setdefault('env_cfg', {})
    dist_cfg = env_cfg.setdefault('dist_cfg', {})
    dist_cfg['backend'] = 'gloo'
    wrapper = cfg.get('model_wrapper_cfg')
    if wrapper is None:
        cfg['model_wrapper_cfg'] = cpu_ddp_wrapper_cfg(
            find_unused_parameters=cfg.get('find_unused_parameters', False))
    elif 'DistributedDataParallel' in str(wrapper.get(
            'type', 'MMDistributedDataParallel')):
        wrapper.setdefault('device_ids', None)
    return True
