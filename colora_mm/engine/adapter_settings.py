"""The adapter settings a checkpoint was trained with, and their comparison with a
config's.

Tensor names and shapes say little about the adapter: ``use_filter``,
``partner_policy`` or ``filter_lambda`` change the model and no tensor. A checkpoint
therefore records its settings: :class:`~colora_mm.engine.AtomicCheckpointHook` writes
``meta['adapter_settings'] = {module name: AdapterSpec(...).to_dict()}`` for every
adapted backbone of the model. For a checkpoint without that record, the settings are
rebuilt from the config text mmengine saves in ``meta['cfg']``.

Every field of :class:`~colora_mm.adapters.AdapterSpec` is compared except
:data:`NON_MODEL_KEYS` (how the same model is stored or trained) and the fields a
method ignores (:func:`~colora_mm.adapters.spec_keys_used`: LoRA's ``share_ratio``,
every field of full fine-tuning), so a field added to the spec is compared without a
change here.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import fields
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from colora_mm.adapters import (AdapterSpec, spec_keys_used, spec_type_error,
                                spec_types)

#: Where the record lives in a checkpoint's ``meta``.
META_KEY = 'adapter_settings'
#: AdapterSpec fields that do not change the model a checkpoint holds.
NON_MODEL_KEYS = frozenset({'merged', 'train_path'})

_MISSING = object()


def adapter_settings(model: nn.Module, prefix: str = '') -> Dict[str, dict]:
    """``{module name: spec dict}`` for every module of ``model`` that carries an
    ``adapter_spec`` (the adapted backbones); ``prefix`` names ``model`` itself."""
    record = {}
    for name, module in model.named_modules():
        full = '.'.join(p for p in (prefix, name) if p) or '(model)'
        spec = getattr(module, 'adapter_spec', None)
        if isinstance(spec, AdapterSpec):
            record[full] = spec.to_dict()
        # a second spec of the same backbone (Swin's attention projections)
        attention = getattr(module, 'attn_adapter_spec', None)
        if isinstance(attention, AdapterSpec):
            record[f'{full} (attention)'] = attention.to_dict()
    return record


def _resolved(settings: dict) -> dict:
    """Every field with its default filled in and the method defaults resolved
    (``gamma=None`` is the method's rank divisor), so equal models compare equal."""
    try:
        with warnings.catch_warnings():   # the keys a method ignores: not compared
            warnings.simplefilter('ignore', UserWarning)
            spec = AdapterSpec.from_dict(dict(settings))
    except (TypeError, ValueError):   # written by another version of AdapterSpec
        return dict(settings)
    out = spec.to_dict()
    for key, resolved in (('gamma', 'rank_divisor'),
                          ('spatial_gamma', 'spatial_rank_divisor')):
        if key in out and hasattr(spec, resolved):
            out[key] = getattr(spec, resolved)
    return out


def _ignored_keys(method) -> set:
    """The spec fields ``method`` ignores; none for a method this version does not
    know (every field is then compared)."""
    try:
        used = spec_keys_used(method)
    except ValueError:
        return set()
    return {f.name for f in fields(AdapterSpec)} - set(used)


def settings_differences(recorded: Dict[str, dict], current: Dict[str, dict]) -> List[str]:
    """What differs between two records, one ``'module.key: checkpoint X, config Y'``
    item per model-changing difference (empty when the models are the same)."""
    diffs = []
    for name in sorted(set(recorded) | set(current)):
        if name not in current:
            diffs.append(f'{name}: adapted in the checkpoint (method '
                         f"{recorded[name].get('method')!r}), a plain module in the config")
            continue
        if name not in recorded:
            diffs.append(f'{name}: a plain module in the checkpoint, adapted in the config '
                         f"(method {current[name].get('method')!r})")
            continue
        a, b = _resolved(recorded[name]), _resolved(current[name])
        # What both methods read (a different method is a difference itself).
        ignored = _ignored_keys(a.get('method')) | _ignored_keys(b.get('method'))
        for key in sorted((set(a) | set(b)) - NON_MODEL_KEYS - ignored):
            va, vb = a.get(key, _MISSING), b.get(key, _MISSING)
            if va != vb:
                show = lambda v: 'unset' if v is _MISSING else repr(v)  # noqa: E731
                diffs.append(f'{name}.adapter.{key}: checkpoint {show(va)}, '
                             f'config {show(vb)}')
    return diffs


# ------------------------------------------------------------------ from configs
def _registry(scope: Optional[str]):
    if scope == 'mmseg':
        from mmseg.registry import MODELS
    elif scope == 'mmdet':
        from mmdet.registry import MODELS
    elif scope == 'mmpretrain':
        from mmpretrain.registry import MODELS
    else:
        from mmengine.registry import MODELS
    return MODELS


def build_backbone_cheaply(cfg) -> nn.Module:
    """``cfg.model.backbone`` built without pretrained weights on the meta device (no
    memory, no initialisation): the adapter spec and every adapted layer's shapes are
    checked exactly as in a real build. Falls back to the CPU when a module cannot be
    built on the meta device (mmpretrain's ConvNeXt, merged backbones: about 3 s for
    ConvNeXt-B).

    Raises:
        ValueError, TypeError, KeyError: what the backbone raises for bad settings.
    """
    backbone = copy.deepcopy(cfg.model.backbone)
    backbone['init_cfg'] = None
    registry = _registry(cfg.get('default_scope'))
    try:
        with torch.device('meta'):
            return registry.build(copy.deepcopy(backbone))
    except Exception:  # noqa: BLE001 - see below
        # Some code cannot run on meta tensors (mmpretrain's ConvNeXt reads its
        # drop-path schedule with .item(); autocast knows no 'meta' device): build on
        # the CPU, which raises the configuration's own error if there is one.
        return registry.build(backbone)


def config_adapter_settings(cfg) -> Dict[str, dict]:
    """The record of ``cfg``'s model (its backbone, built by
    :func:`build_backbone_cheaply`)."""
    if not cfg.get('model') or not cfg.model.get('backbone'):
        return {}
    return adapter_settings(build_backbone_cheaply(cfg), prefix='backbone')


def recorded_adapter_settings(checkpoint: dict) -> Optional[Dict[str, dict]]:
    """The record of a loaded checkpoint: ``meta['adapter_settings']``, else rebuilt
    from ``meta['cfg']``; None when the checkpoint carries neither (or its config text
    no longer builds)."""
    meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
    if not isinstance(meta, dict):
        return None
    if isinstance(meta.get(META_KEY), dict):
        return meta[META_KEY]
    text = meta.get('cfg')
    if not isinstance(text, str):
        return None
    from mmengine.config import Config
    try:
        cfg = Config.fromstring(text, file_format='.py')
        return config_adapter_settings(cfg)
    except Exception:  # noqa: BLE001 - an old config may no longer build: no record
        return None


# ------------------------------------------------------------------ spec types
def check_spec_types(adapter: Optional[dict]) -> None:
    """Check every key of a config's ``adapter=dict(...)`` against the types
    :class:`AdapterSpec` declares (new fields included), as the spec itself does.

    Raises:
        ValueError: naming the key, the value and the expected type, or the keys
            allowed.
    """
    if adapter is None:
        return
    for key, value in dict(adapter).items():
        if key not in spec_types():
            raise ValueError(f'unknown key {key}={value!r}; the keys are '
                             f'{", ".join(f.name for f in fields(AdapterSpec))}')
        error = spec_type_error(key, value)
        if error:
            raise ValueError(error)
