"""The adapter logic shared by the CoLoRA ResNets of mmseg and mmdet.

Every Bottleneck contributes one correlated pair ``(conv1, conv3)`` (1x1 ``in -> w`` and
1x1 ``w -> 4w``; the 3x3 ``conv2`` between them keeps the widths chained) and one spatial
branch parallel to ``conv2``, added before ``bn2``. The pointwise baselines (LoRA,
PiSSA, HiRA) adapt every 1x1 convolution: ``conv1`` and ``conv3`` of each block and the
1x1 convolution of each stage's shortcut (``downsample``). Freezing follows the upstream ResNet:
stages up to ``frozen_stages`` (stem included) are frozen whole, adapters included, and
stay so across ``train()``; ``norm_eval`` keeps BatchNorm statistics fixed; a
``norm_cfg`` with ``requires_grad=False`` keeps the norms' affine parameters frozen.

Each codebase gets its own class (mmseg's ``ResNet`` and mmdet's differ in defaults and
options), both registered as ``CoLoRAResNet``: see :mod:`.resnet_mmseg` and
:mod:`.resnet_mmdet`.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .adapted_backbone import AdaptedBackboneMixin, freeze_norms_if_configured
from .pretrained import drop_classifier


class ResNetAdapterMixin(AdaptedBackboneMixin):
    """Adapters on an upstream (mmseg or mmdet) Bottleneck ResNet.

    Args:
        adapter (dict, optional): The adapter spec (see
            :class:`colora_mm.adapters.AdapterSpec`); None or ``method='full'`` is full
            fine-tuning. The adapter methods need Bottleneck blocks (depth 50, 101,
            152); ``'bitfit'`` and ``'full'`` work at any depth. Defaults to None.
        **kwargs: The upstream ``ResNet``'s arguments (``depth``, ``frozen_stages``,
            ``norm_eval``, ``norm_cfg``, ``init_cfg``...). ``init_cfg=dict(
            type='Pretrained', checkpoint=...)`` accepts torchvision checkpoints
            (``torchvision://resnet50`` or the file of any torchvision ResNet weights)
            and OpenMMLab checkpoints; one of another depth (whole blocks missing or
            extra) is an error unless it also sets ``allow_partial=True`` (see
            :func:`colora_mm.models.load_pretrained`).
    """

    def __init__(self, *args, adapter: Optional[dict] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._setup_adapters(adapter)

    def adapter_targets(self) -> Tuple[List[Tuple[str, str]], List[str]]:
        pairs, spatial = [], []
        for layer_name in self.res_layers:
            for j, block in enumerate(getattr(self, layer_name)):
                name = f'{layer_name}.{j}'
                if not hasattr(block, 'conv3'):
                    spec = getattr(self, 'adapter_spec', None)
                    method = f' {spec.method!r}' if spec is not None else ''
                    raise ValueError(
                        f'{type(self).__name__}(depth={self.depth}): {name} is a '
                        f'{type(block).__name__} without the 1x1-3x3-1x1 layout the '
                        f'adapter method{method} targets (pairs (conv1, conv3), spatial '
                        'conv2); use depth 50, 101 or 152, or '
                        "adapter=dict(method='bitfit') or adapter=dict(method='full'), "
                        'which need no target layers and work with BasicBlock ResNets.')
                pairs.append((f'{name}.conv1', f'{name}.conv3'))
                spatial.append(f'{name}.conv2')
        return pairs, spatial

    def pointwise_targets(self, pairs: List[Tuple[str, str]]) -> List[str]:
        """Every 1x1 convolution: both layers of each pair, and the shortcuts' 1x1
        convolutions (strided, or after an average pool with ``avg_down``)."""
        names = [name for pair in pairs for name in pair]
        for layer_name in self.res_layers:
            for j, block in enumerate(getattr(self, layer_name)):
                shortcut = getattr(block, 'downsample', None)
                for child, module in (shortcut.named_children()
                                      if shortcut is not None else ()):
                    if (isinstance(module, nn.Conv2d) and module.groups == 1
                            and tuple(module.kernel_size) == (1, 1)):
                        names.append(f'{layer_name}.{j}.downsample.{child}')
        return names

    def _refreeze(self) -> None:
        freeze_norms_if_configured(self, self.norm_cfg)
        self._freeze_stages()

    def convert_pretrained(self, state_dict: Dict[str, torch.Tensor], layout: str,
                           dropped: Dict[str, str]) -> Tuple[Dict, Dict]:
        if layout == 'torchvision':
            return drop_classifier(state_dict, ('fc.',), dropped), {}
        if layout == 'openmmlab':
            return drop_classifier(state_dict, ('head.', 'fc.'), dropped), {}
        raise ValueError(f'{type(self).__name__}: a {layout!r} checkpoint is not a ResNet; '
                         'use torchvision or OpenMMLab ResNet weights.')
