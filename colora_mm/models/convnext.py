"""CoLoRAConvNeXt: mmpretrain's ConvNeXt with CoLoRA (or a baseline) injected.

Every block contributes one correlated pair ``(pointwise_conv1, pointwise_conv2)``
(``pwconv1``/``pwconv2`` of the original ConvNeXt, ``C -> 4C -> C``) and one spatial
branch parallel to its 7x7 ``depthwise_conv``. Module names stay mmpretrain's, so
mmseg/mmdet's ``LearningRateDecayOptimizerConstructor`` (it keys on ``'ConvNeXt'`` in the
class name and on ``backbone.stages.{i}``/``backbone.downsample_layers.{i}``) gives the
adapters the learning rate of the stage they sit in.

Registered as ``CoLoRAConvNeXt`` in the model registries of mmpretrain, mmseg and mmdet.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from mmdet.registry import MODELS as MMDET_MODELS
from mmpretrain.models.backbones import ConvNeXt
from mmpretrain.registry import MODELS as MMPRETRAIN_MODELS
from mmseg.registry import MODELS as MMSEG_MODELS

from .adapted_backbone import AdaptedBackboneMixin
from .pretrained import convert_convnext_original, drop_classifier


class CoLoRAConvNeXt(AdaptedBackboneMixin, ConvNeXt):
    """mmpretrain's ConvNeXt with adapters.

    Args:
        adapter (dict, optional): The adapter spec, ``dict(method='colora' | 'lora' |
            'pissa' | 'hira' | 'conv_adapter' | 'full', gamma=None, share_ratio=0.5,
            use_filter=True, partner_policy='effective')`` (any key of
            :class:`colora_mm.adapters.AdapterSpec`). None or ``method='full'`` is full
            fine-tuning. Conv-Adapter uses GELU here unless ``act`` is given.
            Defaults to None.
        **kwargs: mmpretrain ``ConvNeXt``'s arguments (``arch``, ``out_indices``,
            ``drop_path_rate``, ``layer_scale_init_value``, ``gap_before_final_norm``,
            ``frozen_stages``, ``init_cfg``...). ``init_cfg=dict(type='Pretrained',
            checkpoint=...)`` accepts the original ConvNeXt release as well as
            mmpretrain checkpoints; one of another depth (whole blocks missing or
            extra) is an error unless it also sets ``allow_partial=True`` (see
            :func:`colora_mm.models.load_pretrained`).
    """

    def __init__(self, *args, adapter: Optional[dict] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if adapter is not None and adapter.get('method') == 'conv_adapter':
            adapter = dict(adapter)
            adapter.setdefault('act', 'gelu')
        self._setup_adapters(adapter)

    def adapter_targets(self) -> Tuple[List[Tuple[str, str]], List[str]]:
        pairs, spatial = [], []
        for i, stage in enumerate(self.stages):
            for j in range(len(stage)):
                block = f'stages.{i}.{j}'
                pairs.append((f'{block}.pointwise_conv1', f'{block}.pointwise_conv2'))
                spatial.append(f'{block}.depthwise_conv')
        return pairs, spatial

    def _refreeze(self) -> None:
        self._freeze_stages()

    @property
    def final_norm_name(self) -> str:
        """The module that takes the original release's final ``norm`` (mmpretrain's
        convention: the norm after the last stage)."""
        return f'norm{self.num_stages - 1}'

    def convert_pretrained(self, state_dict: Dict[str, torch.Tensor], layout: str,
                           dropped: Dict[str, str]) -> Tuple[Dict, Dict]:
        if layout == 'convnext_original':
            final = self.final_norm_name if hasattr(self, self.final_norm_name) else None
            converted, renamed = convert_convnext_original(state_dict, final, dropped)
            return self._fit_pointwise(converted), renamed
        if layout == 'openmmlab':
            return self._fit_pointwise(drop_classifier(state_dict, ('head.',),
                                                       dropped)), {}
        raise ValueError(f'CoLoRAConvNeXt: a {layout!r} checkpoint is not a ConvNeXt; '
                         'use the original ConvNeXt release or an mmpretrain checkpoint.')

    def _fit_pointwise(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Pointwise weights stored as ``Linear`` ``(out, in)`` or as 1x1 convs ``(out,
        in, 1, 1)`` (``linear_pw_conv``, mmpretrain's choice) take this backbone's form:
        the same numbers either way."""
        own = self.state_dict()
        for key, value in state_dict.items():
            target = own.get(key)
            if target is None or '.pointwise_conv' not in key:
                continue
            if (target.dim() == 4 and value.dim() == 2 and target.shape[2:] == (1, 1)
                    and target.shape[:2] == value.shape) or (
                    target.dim() == 2 and value.dim() == 4 and value.shape[2:] == (1, 1)
                    and value.shape[:2] == target.shape):
                state_dict[key] = value.reshape(target.shape)
        return state_dict

    def expected_missing(self, name: str) -> Optional[str]:
        head = name.split('.', 1)[0]
        if head.startswith('norm') and head != self.final_norm_name:
            return 'output norms of earlier stages, not in classification checkpoints'
        return None


for _registry in (MMPRETRAIN_MODELS, MMSEG_MODELS, MMDET_MODELS):
    _registry.register_module(module=CoLoRAConvNeXt)
