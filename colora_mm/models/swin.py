"""The adapter logic shared by the CoLoRA Swin Transformers of mmseg and mmdet.

CoLoRA was defined and evaluated on ConvNets; the paper leaves Transformers open
(appendix, limitations). Its correlated pair needs two chained pointwise layers, and
every Swin block has exactly that: the MLP ``fc1 (C -> 4C) -> GELU -> fc2 (4C -> C)``,
mmcv's ``FFN`` as ``ffn.layers.0.0`` and ``ffn.layers.1`` (``mlp.fc1``/``mlp.fc2`` in the
original release), the same shape as ConvNeXt's ``pwconv1``/``pwconv2``. Each block
contributes that pair.

* Attention: the projections of every window attention, ``attn.w_msa.qkv`` (C -> 3C)
  and ``attn.w_msa.proj`` (C -> C), take a pointwise adapter of their own with
  ``attn_adapter=dict(method='lora', gamma=...)`` (LoRA, PiSSA or HiRA; LoRA's usual
  place in Transformers). Off by default: the CoLoRA configs adapt the MLPs only.
* No spatial branch: CoLoRA's spatial branch runs beside a spatial convolution
  (ConvNeXt's 7x7 depthwise, ResNet's 3x3), and a Swin block has none: tokens mix by
  window attention. The backbone's only convolution is the 4x4, stride-4 patch
  embedding of the 3 image channels (rank ``3 // gamma = 0``). ``adapter_spatial``
  names spatial convs explicitly for a variant that has some; a name that is not a
  ``Conv2d`` is an error.
* Trainable set under PEFT: the adapters, every bias and every LayerNorm, as for the
  ConvNets. The relative position bias tables and the absolute position embedding stay
  frozen (they are neither bias parameters nor norms). ``frozen_stages`` freezes stages
  whole, adapters included.
* Pretrained weights, as published: the original Swin release (``{'model': ...}`` with
  ``layers.i.blocks.j.mlp.fc1`` etc.), converted by mmdet's own ``swin_converter``;
  OpenMMLab checkpoints (mmseg's converted Swin weights, mmseg/mmdet model checkpoints
  behind ``backbone.``) as they are. As upstream's ``init_weights``, the absolute
  position embedding is reshaped and relative position bias tables of another window
  size are resized (their index buffers are then the model's own); the classifier's
  ``head`` and final ``norm`` (a dense-prediction Swin has one norm per output instead)
  and the original release's stored attention masks (computed per input here) are
  dropped, each with its reason in the report.

Each codebase gets its own class, registered as ``CoLoRASwin``: see :mod:`.swin_mmseg`
and :mod:`.swin_mmdet`. With everything folded (``tools/merge.py``) the checkpoint is a
plain ``SwinTransformer`` one.
"""
from __future__ import annotations

import contextlib
import io
import logging
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from colora_mm.adapters import AdapterSpec, iter_adapted_layers, resolve_names

from .adapted_backbone import AdaptedBackboneMixin, freeze_norms_if_configured
from .pretrained import convert_swin_original, fit_swin_positions

#: Methods the attention projections can take (pointwise updates).
ATTENTION_METHODS = ('lora', 'pissa', 'hira')
#: How upstream's SwinTransformer.init_weights starts its notice for an empty init_cfg.
_SCRATCH_NOTICE = 'No pre-trained weights for'


@contextlib.contextmanager
def _without_scratch_notice():
    """Leave out upstream's "No pre-trained weights for X, training start from
    scratch" (mmseg prints it, mmdet logs it as a warning); everything else the block
    prints or logs goes through."""
    from mmengine.logging import MMLogger

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return _SCRATCH_NOTICE not in record.getMessage()

    logger, drop, printed = MMLogger.get_current_instance(), _Drop(), io.StringIO()
    logger.addFilter(drop)
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        logger.removeFilter(drop)
        sys.stdout.write(''.join(line for line in
                                 printed.getvalue().splitlines(keepends=True)
                                 if _SCRATCH_NOTICE not in line))


class SwinAdapterMixin(AdaptedBackboneMixin):
    """Adapters on an upstream (mmseg or mmdet) ``SwinTransformer``.

    Args:
        adapter (dict, optional): The adapter spec of the MLP pairs (see
            :class:`colora_mm.adapters.AdapterSpec`, ``overrides`` included: patterns
            see names such as ``'stages.3.blocks.0.ffn.layers.0.0'``); None or
            ``method='full'`` is full fine-tuning. With LoRA, PiSSA or HiRA the MLP
            layers ``fc1``/``fc2`` each take the pointwise adapter. Defaults to None.
        attn_adapter (dict, optional): A pointwise adapter spec (``method='lora'``,
            ``'pissa'`` or ``'hira'``, ``gamma``...) for the attention projections
            ``qkv`` and ``proj`` of every block; None leaves them without adapter.
            Defaults to None.
        adapter_spatial (sequence of str): Spatial convs (names or regular
            expressions) for CoLoRA's spatial branch; a Swin block has none.
            Defaults to ().
        **kwargs: The upstream ``SwinTransformer``'s arguments (``embed_dims``,
            ``depths``, ``num_heads``, ``window_size``, ``frozen_stages``,
            ``init_cfg``...). ``init_cfg=dict(type='Pretrained', checkpoint=...)``
            accepts the original Swin release and OpenMMLab checkpoints; mmdet's
            ``convert_weights`` is accepted and not needed (the layout is recognised
            from the keys). A checkpoint of another depth (whole blocks missing or
            extra) is an error unless the ``init_cfg`` also sets ``allow_partial=True``
            (see :func:`colora_mm.models.load_pretrained`).
    """

    def __init__(self, *args, adapter: Optional[dict] = None,
                 attn_adapter: Optional[dict] = None,
                 adapter_spatial: Sequence[str] = (), **kwargs) -> None:
        self._norm_cfg = kwargs.get('norm_cfg')
        self._check_architecture(args, kwargs)
        super().__init__(*args, **kwargs)
        self.attn_adapter_spec = None
        if attn_adapter is not None:
            self.attn_adapter_spec = AdapterSpec.from_dict(attn_adapter)
            if self.attn_adapter_spec.method not in ATTENTION_METHODS:
                raise ValueError(
                    f'{type(self).__name__}: attn_adapter method='
                    f'{self.attn_adapter_spec.method!r}; the attention projections qkv '
                    f'and proj take a pointwise adapter, one of {ATTENTION_METHODS} '
                    '(CoLoRA pairs the MLP layers through adapter=...).')
            if AdapterSpec.from_dict(adapter).method == 'full':
                raise ValueError(
                    f"{type(self).__name__}: attn_adapter with adapter method 'full': "
                    'full fine-tuning already trains the attention projections; drop '
                    'attn_adapter or pick an adapter method for the MLPs.')
        self.adapter_spatial = list(adapter_spatial)
        self._setup_adapters(adapter)

    def _check_architecture(self, args: tuple, kwargs: dict) -> None:
        """The upstream arguments the window attention depends on, checked before the
        upstream build fails on them with an assertion, an IndexError or a reshape."""
        import inspect
        owner = type(self).__name__
        try:
            bound = inspect.signature(super().__init__).bind(*args, **kwargs)
        except TypeError:
            return      # upstream reports its own signature errors
        bound.apply_defaults()
        params = bound.arguments
        window, depths = params.get('window_size'), params.get('depths')
        heads, dims = params.get('num_heads'), params.get('embed_dims')
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(
                f'{owner}: window_size={window!r}; the attention windows are '
                'window_size x window_size tokens, so it must be an integer >= 1 (7 in '
                'the Swin releases): set window_size to a positive integer.')
        if depths is None or heads is None or dims is None:
            return
        depths, heads = list(depths), list(heads)
        if len(heads) != len(depths):
            raise ValueError(
                f'{owner}: num_heads={tuple(heads)} has {len(heads)} entries but '
                f'depths={tuple(depths)} has {len(depths)} stages; give one number of '
                'heads per stage (Swin-T: depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)).')
        for i, h in enumerate(heads):
            width = dims * 2 ** i
            if isinstance(h, bool) or not isinstance(h, int) or h < 1 or width % h:
                raise ValueError(
                    f'{owner}: stage {i} is embed_dims * 2**{i} = {dims} * {2 ** i} = '
                    f'{width} wide, which num_heads[{i}]={h!r} does not divide (each head '
                    f'takes width / num_heads channels); pick num_heads[{i}] among the '
                    f'divisors of {width}, or change embed_dims={dims}.')

    # ------------------------------------------------------------ targets
    def _blocks(self):
        for i, stage in enumerate(self.stages):
            for j in range(len(stage.blocks)):
                yield f'stages.{i}.blocks.{j}'

    def adapter_targets(self) -> Tuple[List[Tuple[str, str]], List[str]]:
        pairs = []
        for block in self._blocks():
            fc1, fc2 = f'{block}.ffn.layers.0.0', f'{block}.ffn.layers.1'
            for name in (fc1, fc2):
                module = self._find(name)
                if not isinstance(module, nn.Linear):
                    raise ValueError(
                        f'{type(self).__name__}: {name} is '
                        f'{type(module).__name__ if module is not None else "missing"}, '
                        "not the nn.Linear of a two-layer FFN (fc1 -> act -> fc2) the "
                        "CoLoRA pair needs; keep the upstream FFN, or use "
                        "adapter=dict(method='full').")
            pairs.append((fc1, fc2))
        spatial = resolve_names(self, self.adapter_spatial, 'adapter_spatial')
        for name in spatial:
            module = self.get_submodule(name)
            if not isinstance(module, nn.Conv2d):
                width = (f'{module.in_features} -> {module.out_features}'
                         if isinstance(module, nn.Linear) else 'no convolution')
                raise ValueError(
                    f'{type(self).__name__}: adapter_spatial names {name}, a '
                    f'{type(module).__name__} ({width}). The spatial branch runs beside '
                    'a k x k convolution, and a Swin block has none (its tokens mix by '
                    'window attention): drop adapter_spatial to adapt the MLP pairs, and '
                    "use attn_adapter=dict(method='lora') for the attention projections.")
        return pairs, spatial

    def extra_adapters(self) -> List[Tuple[AdapterSpec, Dict]]:
        if self.attn_adapter_spec is None:
            return []
        names = [f'{block}.attn.w_msa.{proj}' for block in self._blocks()
                 for proj in ('qkv', 'proj')]
        return [(self.attn_adapter_spec, dict(pointwise=names))]

    def _find(self, name: str) -> Optional[nn.Module]:
        try:
            return self.get_submodule(name)
        except AttributeError:
            return None

    def _refreeze(self) -> None:
        freeze_norms_if_configured(self, self._norm_cfg)
        self._freeze_stages()

    # ------------------------------------------------------------ weights
    def _upstream_init_weights(self, pretrained: bool) -> None:
        """Upstream's initialisation. Without a pretrained checkpoint the adapted
        ``Linear`` layers get upstream's truncated-normal initialisation too
        (upstream's loop looks for ``nn.Linear`` and would miss them inside their
        wrappers), before the adapter state (PiSSA's SVD) is derived from them. With
        one, upstream's notice that training starts from scratch (its ``init_cfg`` is
        empty while it runs) is left out: the checkpoint loads right after."""
        if not pretrained:
            super()._upstream_init_weights(pretrained)
            if self.init_cfg is None:
                from mmengine.model.weight_init import trunc_normal_init
                for _, layer in iter_adapted_layers(self):
                    trunc_normal_init(layer.base_view(), std=.02, bias=0.)
            return
        with _without_scratch_notice():
            super()._upstream_init_weights(pretrained)

    def convert_pretrained(self, state_dict: Dict[str, torch.Tensor], layout: str,
                           dropped: Dict[str, str]) -> Tuple[Dict, Dict]:
        if layout not in ('swin_original', 'openmmlab'):
            raise ValueError(f'{type(self).__name__}: a {layout!r} checkpoint is not a '
                             'Swin Transformer; use the original Swin release or an '
                             'OpenMMLab (mmseg/mmdet) Swin checkpoint.')
        own = self.state_dict()
        kept = {}
        for key, value in state_dict.items():       # names as the checkpoint has them
            if key.startswith('head.'):
                dropped[key] = 'classifier head'
            elif key.split('.', 1)[0] == 'norm' and 'norm.weight' not in own:
                dropped[key] = ("the classifier's final norm (a dense-prediction Swin "
                                'has one norm per output, norm0..norm3; upstream does '
                                'not load it either)')
            elif key.endswith('.attn_mask'):
                dropped[key] = ('stored shifted-window attention mask (mmseg/mmdet '
                                'compute it for each input size)')
            else:
                kept[key] = value
        renamed: Dict[str, str] = {}
        if layout == 'swin_original':
            kept, renamed = convert_swin_original(kept, dropped)
        original = {new: old for old, new in renamed.items()}
        for key in [k for k, v in kept.items() if k.endswith('relative_position_index')
                    and k in own and own[k].shape != v.shape]:
            del kept[key]
            renamed.pop(original.get(key, key), None)
            dropped[original.get(key, key)] = (
                'relative position index of another window size (the model keeps the '
                'one of its own window)')
        notes: List[str] = []
        kept = fit_swin_positions(kept, own, notes)
        return kept, renamed, notes

    def expected_missing(self, name: str) -> Optional[str]:
        head = name.split('.', 1)[0]
        if head.startswith('norm') and head[4:].isdigit():
            return 'output norms of a dense-prediction Swin, not in classification checkpoints'
        if name.endswith('.relative_position_index'):
            return ("index buffers of the window attention, computed from this model's "
                    'window size')
        return None
