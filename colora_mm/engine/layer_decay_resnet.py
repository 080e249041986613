"""Layer-wise learning-rate decay over a ResNet's bottleneck blocks.

The CoLoRA paper trains ResNet-50 with layer-wise decay over its 16 blocks, rate 0.99
(appendix F). Layer ids, as in mmseg/mmdet's ``LearningRateDecayOptimizerConstructor``
for ConvNeXt::

    stem (conv1/bn1, or the deep stem)           id 0
    block k of the backbone (1-based, in order)  id k = 1 .. num_layers
    everything else (neck, heads)                id num_layers + 1
    lr scale = decay_rate ** (num_layers + 1 - id)

so the heads train at the base lr, the last block at ``decay_rate`` times it and the
stem at ``decay_rate ** (num_layers + 1)``. As upstream, 1-D parameters and biases get
no weight decay, and frozen parameters are left out of the optimizer.

Config::

    optim_wrapper = dict(
        constructor='LayerDecayResNetOptimizerConstructor',
        paramwise_cfg=dict(num_layers=16, decay_rate=0.99), ...)

Registered in mmengine's root ``OPTIM_WRAPPER_CONSTRUCTORS``, which mmseg's and mmdet's
registries fall back to.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional

import torch.nn as nn
from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS

_BLOCK = re.compile(r'^backbone\.([^.]+)\.(\d+)\.')


def resnet_block_offsets(backbone: nn.Module) -> Dict[str, int]:
    """``{'layer1': 0, 'layer2': 3, ...}``: blocks before each residual stage."""
    offsets, count = {}, 0
    for name in backbone.res_layers:
        offsets[name] = count
        count += len(getattr(backbone, name))
    return offsets


def resnet_layer_id(name: str, offsets: Dict[str, int], num_layers: int) -> int:
    """Layer id of parameter ``name`` of a model with a ResNet ``backbone``: blocks of
    the residual stages by position, any other backbone parameter (the stem: conv1/bn1
    or the deep stem) 0, the rest of the model ``num_layers + 1``."""
    if not name.startswith('backbone.'):
        return num_layers + 1
    match = _BLOCK.match(name)
    if match and match.group(1) in offsets:
        return offsets[match.group(1)] + int(match.group(2)) + 1
    return 0


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class LayerDecayResNetOptimizerConstructor(DefaultOptimWrapperConstructor):
    """Layer-wise lr decay over a ResNet backbone's residual blocks.

    ``paramwise_cfg``:

    - ``num_layers`` (int): The backbone's number of residual blocks (16 for ResNet-50);
      checked against the model.
    - ``decay_rate`` (float): Per-block decay. The paper uses 0.99.
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: Optional[dict] = None):
        super().__init__(optim_wrapper_cfg, paramwise_cfg)
        # here, not in add_params: mmengine calls add_params only for a non-empty
        # paramwise_cfg, so a missing one would give one undecayed group silently
        self._check_paramwise_cfg()

    def _check_paramwise_cfg(self) -> None:
        cfg = self.paramwise_cfg or {}
        if 'num_layers' not in cfg or 'decay_rate' not in cfg:
            raise ValueError('LayerDecayResNetOptimizerConstructor: paramwise_cfg needs '
                             f'num_layers and decay_rate, got {dict(cfg)}; e.g. '
                             'dict(num_layers=16, decay_rate=0.99) for ResNet-50.')
        unknown = set(cfg) - {'num_layers', 'decay_rate'}
        if unknown:
            raise ValueError('LayerDecayResNetOptimizerConstructor: paramwise_cfg keys '
                             f'{sorted(unknown)} are not supported (only num_layers and '
                             'decay_rate; biases and 1-D parameters never decay); remove '
                             'them or use DefaultOptimWrapperConstructor.')

    def add_params(self, params: List[dict], module: nn.Module, **kwargs) -> None:
        cfg = self.paramwise_cfg
        self._check_paramwise_cfg()
        num_layers, decay_rate = int(cfg['num_layers']), float(cfg['decay_rate'])
        backbone = getattr(module, 'backbone', None)
        if backbone is None or not hasattr(backbone, 'res_layers'):
            raise TypeError('LayerDecayResNetOptimizerConstructor: the model needs a ResNet '
                            f'`backbone` with `res_layers`; got {type(module).__name__} with '
                            f'backbone {type(backbone).__name__}.')
        offsets = resnet_block_offsets(backbone)
        blocks = sum(len(getattr(backbone, n)) for n in backbone.res_layers)
        if blocks != num_layers:
            raise ValueError(f'LayerDecayResNetOptimizerConstructor: num_layers={num_layers} '
                             f'but {type(backbone).__name__} has {blocks} residual blocks; '
                             f'set paramwise_cfg.num_layers={blocks}.')

        groups: Dict[str, dict] = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            no_decay = param.ndim == 1 or name.endswith('.bias')
            layer_id = resnet_layer_id(name, offsets, num_layers)
            key = f'layer_{layer_id}_{"no_decay" if no_decay else "decay"}'
            if key not in groups:
                scale = decay_rate ** (num_layers + 1 - layer_id)
                groups[key] = dict(params=[], param_names=[], group_name=key,
                                   lr_scale=scale, lr=scale * self.base_lr)
                if no_decay:
                    groups[key]['weight_decay'] = 0.0
                elif self.base_wd is not None:
                    # none in the optimizer's config: its own default applies
                    groups[key]['weight_decay'] = self.base_wd
            groups[key]['params'].append(param)
            groups[key]['param_names'].append(name)
        ordered = list(groups.values())
        print_log('LayerDecayResNetOptimizerConstructor: '
                  f'{num_layers} blocks, decay {decay_rate}; lr scales '
                  + ', '.join(f"{g['group_name']}={g['lr_scale']:.4g} "
                              f"({len(g['params'])})" for g in ordered),
                  logger='current')
        params.extend(ordered)
