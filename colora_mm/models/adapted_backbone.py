"""What every adapted backbone adds to its upstream class.

The upstream backbone (mmpretrain's ConvNeXt, mmseg's or mmdet's ResNet) is built as it
is; then, still inside ``__init__`` (before a DDP wrapper sees the parameters), adapters
are injected into the layers the subclass names, the trainable set is marked, and the
backbone's own freezing (``frozen_stages``...) is applied again on top, so adapters in a
frozen stage stay frozen. ``init_weights()`` runs the upstream initialisation, loads the
pretrained checkpoint in whichever layout it comes (:mod:`.pretrained`), and finally
re-derives the adapter state that depends on the loaded weights (partner buffers,
PiSSA's SVD).
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from colora_mm.adapters import (AdapterSpec, inject_adapters,
                                is_adapter_name, iter_adapted_layers, mark_trainable,
                                merge_adapters, pair_factors_stacked,
                                reset_adapters_from_weights)
from colora_mm.adapters.lowrank import compiling

from .pretrained import PretrainedLoadReport, load_pretrained


class AdaptedBackboneMixin:
    """Adapter injection, freezing and pretrained loading for an upstream backbone.

    Put it first in the bases (``class X(AdaptedBackboneMixin, UpstreamBackbone)``),
    call :meth:`_setup_adapters` at the end of ``__init__``, and implement
    :meth:`adapter_targets`, :meth:`_refreeze` and :meth:`convert_pretrained`.
    """

    adapter_spec: AdapterSpec
    #: Filled by ``init_weights()`` when a pretrained checkpoint was loaded.
    pretrained_report: Optional[PretrainedLoadReport] = None

    # ------------------------------------------------------------ to implement
    def adapter_targets(self) -> Tuple[List[Tuple[str, str]], List[str]]:
        """``(pairs, spatial)``: chained pointwise layers and spatial convs, by name."""
        raise NotImplementedError

    def _refreeze(self) -> None:
        """Re-apply the upstream backbone's own freezing (``frozen_stages``...)."""
        raise NotImplementedError

    def convert_pretrained(self, state_dict: Dict[str, torch.Tensor], layout: str,
                           dropped: Dict[str, str]) -> Tuple[Dict, Dict]:
        """``(state_dict, renamed)`` in this backbone's names (see :mod:`.pretrained`)."""
        raise NotImplementedError

    def expected_missing(self, name: str) -> Optional[str]:
        """Reason a pretrained checkpoint never carries tensor ``name``, or None."""
        return None

    def pointwise_targets(self, pairs: List[Tuple[str, str]]) -> Optional[List[str]]:
        """The layers LoRA, PiSSA and HiRA adapt, or None for both layers of every
        pair (the default)."""
        return None

    def extra_adapters(self) -> List[Tuple[AdapterSpec, Dict]]:
        """Further ``(spec, targets)`` injected after the main spec's, with targets as
        ``inject_adapters`` keywords (Swin's attention projections). Default: none."""
        return []

    def forward(self, *args, **kwargs):
        """The upstream forward pass; in training, the factors of the CoLoRA pairs of one
        shape are formed together first (:mod:`colora_mm.adapters.pair_batch`)."""
        if not self.training or compiling():
            return super().forward(*args, **kwargs)
        with pair_factors_stacked(self):
            return super().forward(*args, **kwargs)

    def train(self, mode: bool = True):
        """The upstream ``train`` (stage freezing, ``norm_eval``), returning the module
        as ``nn.Module.train`` does, so that ``model.eval()`` and ``model.train()``
        chain; the upstream backbones return None."""
        super().train(mode)
        return self

    # ------------------------------------------------------------ construction
    def _setup_adapters(self, adapter: Optional[dict]) -> None:
        self.adapter_spec = AdapterSpec.from_dict(adapter)
        spec = self.adapter_spec
        # an override may set the policy of some layers (the runtime check in the
        # pairs would catch it only at the first backward pass)
        policies = {spec.partner_policy} | {o['partner_policy'] for o in spec.overrides
                                            if 'partner_policy' in o
                                            and o.get('method') != 'none'}
        if spec.method == 'colora' and 'effective' in policies and any(
                getattr(m, 'with_cp', False) for m in self.modules()):
            raise ValueError(
                f"{type(self).__name__}: with_cp=True recomputes each block's forward "
                'during the backward pass, after the effective partner weights have '
                'already moved, so the gradients would belong to another function. Use '
                "with_cp=False, or adapter partner_policy='frozen'.")
        self.adapted_layer_names: List[str] = []
        if self.adapter_spec.method != 'full':
            if self.adapter_spec.method != 'bitfit':
                # bitfit trains biases and norms: no target layers, any architecture
                pairs, spatial = self.adapter_targets()
                pointwise = (self.pointwise_targets(pairs)
                             if spec.method in ('lora', 'pissa', 'hira') else None)
                self.adapted_layer_names = list(inject_adapters(
                    self, self.adapter_spec, pairs=pairs, spatial=spatial,
                    pointwise=pointwise))
            for extra_spec, targets in self.extra_adapters():
                self.adapted_layer_names += list(inject_adapters(self, extra_spec,
                                                                 **targets))
            if self.adapter_spec.merged:
                # The deployment structure of a merged checkpoint: folded layers are
                # plain again, the branches that cannot fold stay.
                merge_adapters(self)
                self.adapted_layer_names = [n for n, _ in iter_adapted_layers(self)]
        mark_trainable(self, self.adapter_spec.method)
        self._refreeze()

    # ------------------------------------------------------------ initialisation
    def init_weights(self) -> None:
        """Upstream initialisation, then the pretrained checkpoint (any supported
        layout; ``init_cfg=dict(type='Pretrained', checkpoint=..., prefix=...,
        allow_partial=False)``, see :func:`.load_pretrained`), then the adapter state
        that depends on the loaded weights."""
        if getattr(self, '_is_init', False):
            return super().init_weights()   # upstream warns about the second call
        cfgs = self.init_cfg
        cfgs = [] if cfgs is None else ([cfgs] if isinstance(cfgs, dict) else list(cfgs))
        pretrained = [c for c in cfgs if c.get('type') == 'Pretrained']
        others = [c for c in cfgs if c.get('type') != 'Pretrained']

        # Adapters keep their own initialisation (B = 0: a fresh adapter changes
        # nothing); upstream rules such as Kaiming on every Conv2d must not touch them.
        adapter_state = {k: v.detach().clone() for k, v in self.state_dict().items()
                         if is_adapter_name(k)}
        original_cfg = self.init_cfg
        self.init_cfg = others or None
        try:
            self._upstream_init_weights(pretrained=bool(pretrained))
        finally:
            self.init_cfg = original_cfg
        if others:
            from mmengine.model.weight_init import initialize
            layered = [{k: v for k, v in c.items() if k != 'override'}
                       for c in others if 'layer' in c]
            if layered:
                # Rules keyed on the layer type (layer=['Conv2d', 'Linear']) must still
                # reach base layers that now sit inside a wrapper.
                for _, layer in iter_adapted_layers(self):
                    initialize(layer.base_view(), copy.deepcopy(layered))
        self.load_state_dict(adapter_state, strict=False)

        for cfg in pretrained:
            self.pretrained_report = load_pretrained(
                self, cfg['checkpoint'], self.convert_pretrained,
                prefix=cfg.get('prefix'), map_location=cfg.get('map_location', 'cpu'),
                expected_missing=self.expected_missing,
                allow_partial=bool(cfg.get('allow_partial', False)))
        reset_adapters_from_weights(self)

    def _upstream_init_weights(self, pretrained: bool) -> None:
        """The upstream backbone's ``init_weights``, run with ``init_cfg`` holding
        the non-``Pretrained`` entries only (``pretrained``: a checkpoint loads right
        after). Before the adapter state is derived from the weights, so a backbone
        that initialises more (its adapted layers) does it here."""
        super().init_weights()

    def extra_repr(self) -> str:
        spec = self.adapter_spec
        return (f'adapter={spec.method}, rank divisor={spec.rank_divisor}, '
                f'{len(self.adapted_layer_names)} adapted layers')


def freeze_norms_if_configured(module: nn.Module, norm_cfg: Optional[dict]) -> None:
    """Honour ``norm_cfg=dict(..., requires_grad=False)`` after the trainable set was
    marked (PEFT methods train every norm unless the config says otherwise)."""
    if norm_cfg is None or norm_cfg.get('requires_grad', True):
        return
    from torch.nn.modules.batchnorm import _BatchNorm
    for m in module.modules():
        if isinstance(m, (_BatchNorm, nn.GroupNorm, nn.LayerNorm)):
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)

