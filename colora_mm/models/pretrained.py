"""Pretrained checkpoints for the adapted backbones, in the layouts they are published in.

A config points ``init_cfg=dict(type='Pretrained', checkpoint=...)`` at a checkpoint as it
stands; the layout is recognised from its keys and converted to the backbone's names:

* ``'convnext_original'``: the original ConvNeXt release (the CoLoRA paper's ConvNeXt-S/B
  URLs), ``{'model': sd}`` with ``stages.i.j.dwconv|norm|pwconv1|pwconv2|gamma``,
  ``downsample_layers.i.j``, a final ``norm`` and a classifier ``head``. mmpretrain names
  the same tensors ``depthwise_conv``/``pointwise_conv1``/``pointwise_conv2`` and calls
  the final norm ``norm{last stage}``; the classifier is dropped.
* ``'swin_original'``: the original Swin Transformer release (microsoft/Swin-Transformer),
  ``{'model': sd}`` with ``layers.i.blocks.j.attn.qkv|proj``, ``.mlp.fc1|fc2``,
  ``layers.i.downsample``, ``patch_embed.proj``, a final ``norm`` and a ``head``: the
  checkpoints mmdet's Swin configs point at. Converted by mmdet's own
  ``swin_converter`` (what ``SwinTransformer(convert_weights=True)`` applies), see
  :func:`convert_swin_original`.
* ``'torchvision'``: torchvision's ResNet (``conv1``, ``bn1``, ``layer{s}.{b}.*``,
  ``fc``); the names already match mmseg/mmdet's ResNet, the classifier ``fc`` is dropped.
* ``'openmmlab'``: mmpretrain/mmseg/mmdet checkpoints, the backbone's own names, possibly
  inside ``{'state_dict': ...}`` and behind a ``backbone.`` prefix (a classifier's
  ``head.*`` or a detector's ``neck.*`` are then dropped).

Loading is non-strict, because adapter tensors are never in a pretrained checkpoint, but
never silent: every checkpoint tensor is either loaded, dropped for a stated reason, or
reported as unexpected, and every backbone tensor the checkpoint does not provide is
reported as missing. A shape mismatch is an error, and so is a checkpoint of another
depth: whole numbered blocks or layers (``stages.2.9``, ``layer3.5``) of the backbone
missing from it, or whole blocks in it that the backbone lacks (a ConvNeXt-T checkpoint in
a ConvNeXt-S, or the reverse), and a checkpoint of another variant: a kind of tensor
missing from every block that has it, or present in several blocks of the checkpoint
and in none of the backbone (layer scale ``gamma`` on one side only, ConvNeXt-V2's
``grn``), unless the backbone's ``init_cfg`` sets ``allow_partial=True`` (those tensors
then keep their initialisation, or are not loaded). ConvNeXt's pointwise weights load
into either form of the layer (``Linear`` or 1x1 conv, ``linear_pw_conv``).
"""
from __future__ import annotations

import logging
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from colora_mm.adapters import is_adapter_name

LAYOUTS = ('convnext_original', 'swin_original', 'torchvision', 'openmmlab')

_CONVNEXT_ORIGINAL = re.compile(r'^stages\.\d+\.\d+\.(dwconv|pwconv1|pwconv2)\.')
_SWIN_ORIGINAL = re.compile(r'^layers\.\d+\.blocks\.\d+\.(attn|mlp)\.')
_CONVNEXT_RENAMES = (('.dwconv.', '.depthwise_conv.'), ('.pwconv1.', '.pointwise_conv1.'),
                     ('.pwconv2.', '.pointwise_conv2.'))


@dataclass
class PretrainedLoadReport:
    """What happened to every tensor when a pretrained checkpoint was loaded."""

    checkpoint: str
    layout: str
    loaded: List[str] = field(default_factory=list)
    renamed: Dict[str, str] = field(default_factory=dict)    # checkpoint -> model name
    dropped: Dict[str, str] = field(default_factory=dict)    # checkpoint name -> reason
    unexpected: List[str] = field(default_factory=list)      # in checkpoint, not in model
    missing_adapter: List[str] = field(default_factory=list)
    missing_expected: Dict[str, str] = field(default_factory=dict)  # name -> reason
    missing_other: List[str] = field(default_factory=list)   # model tensors not provided
    #: Numbered modules (blocks, layers, stages) of the backbone none of whose tensors
    #: the checkpoint provides, and of the checkpoint that the backbone lacks entirely.
    missing_blocks: List[str] = field(default_factory=list)
    unexpected_blocks: List[str] = field(default_factory=list)
    #: Tensor names (block numbers as ``*``) the checkpoint lacks in every block of
    #: the backbone, or has in several blocks where the backbone has none: another
    #: variant of the architecture (layer scale, GRN), not a stray tensor.
    missing_kinds: List[str] = field(default_factory=list)
    unexpected_kinds: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def summary(self, owner: str) -> str:
        lines = [f'{owner}: loaded {len(self.loaded)} tensors from {self.checkpoint} '
                 f'(layout {self.layout!r}, {len(self.renamed)} renamed).']
        lines += [f'  note: {note}' for note in self.notes]
        if self.dropped:
            reasons: Dict[str, List[str]] = {}
            for key, why in self.dropped.items():
                reasons.setdefault(why, []).append(key)
            for why, keys in reasons.items():
                lines.append(f'  dropped {len(keys)} ({why}): {_abbrev(keys)}')
        if self.missing_adapter:
            lines.append(f'  not in the checkpoint, as expected: {len(self.missing_adapter)}'
                         ' adapter tensors (they keep their initialisation)')
        if self.missing_expected:
            reasons = {}
            for key, why in self.missing_expected.items():
                reasons.setdefault(why, []).append(key)
            for why, keys in reasons.items():
                lines.append(f'  not in the checkpoint, as expected ({why}): {_abbrev(keys)}')
        if self.missing_other:
            lines.append(f'  MISSING from the checkpoint, keep their initialisation: '
                         f'{len(self.missing_other)}: {_abbrev(self.missing_other)}')
        if self.unexpected:
            lines.append(f'  UNEXPECTED in the checkpoint, not loaded: '
                         f'{len(self.unexpected)}: {_abbrev(self.unexpected)}')
        return '\n'.join(lines)

    @property
    def clean(self) -> bool:
        return not (self.missing_other or self.unexpected)


def _abbrev(keys: List[str], limit: int = 12) -> str:
    shown = ', '.join(keys[:limit])
    return shown + (f', ... ({len(keys) - limit} more)' if len(keys) > limit else '')


# --------------------------------------------------------------------- unwrapping
def unwrap_state_dict(checkpoint) -> 'OrderedDict[str, torch.Tensor]':
    """The tensor dict inside a checkpoint (``state_dict``, ``model`` or the dict itself),
    without a DistributedDataParallel ``module.`` prefix."""
    sd = checkpoint
    if isinstance(sd, dict):
        for key in ('state_dict', 'model'):
            inner = sd.get(key)
            if isinstance(inner, dict) and inner and all(
                    torch.is_tensor(v) for v in inner.values()):
                sd = inner
                break
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        found = list(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint)
        raise ValueError('Pretrained checkpoint: no state dict found (looked for a dict '
                         f"of tensors, or one under 'state_dict' or 'model'); top-level "
                         f'entries: {found}.')
    if all(k.startswith('module.') for k in sd):
        sd = OrderedDict((k[len('module.'):], v) for k, v in sd.items())
    return OrderedDict(sd)


def select_prefix(sd: Dict[str, torch.Tensor], prefix: Optional[str],
                  dropped: Dict[str, str], notes: List[str]) -> 'OrderedDict[str, torch.Tensor]':
    """Keep the tensors under ``prefix`` (stripped). With no prefix given, a checkpoint of
    a whole model (keys ``backbone.*``) gives its backbone; the rest is recorded as
    dropped. A prefix that no key carries (a config written for an OpenMMLab checkpoint,
    ``prefix='backbone.'``, pointed at a bare backbone such as the original ConvNeXt
    release) is ignored, and that is noted in the report."""
    if prefix is None:
        if not any(k.startswith('backbone.') for k in sd):
            return OrderedDict(sd)
        prefix = 'backbone.'
    if not prefix.endswith('.'):
        prefix = prefix + '.'
    if not any(k.startswith(prefix) for k in sd):
        notes.append(f'no key carries the prefix {prefix!r}: the checkpoint is read as a '
                     'bare backbone')
        return OrderedDict(sd)
    out = OrderedDict()
    for k, v in sd.items():
        if k.startswith(prefix):
            out[k[len(prefix):]] = v
        else:
            dropped[k] = f'outside the {prefix!r} prefix'
    return out


def detect_layout(keys) -> str:
    """``'convnext_original'``, ``'swin_original'``, ``'torchvision'`` or
    ``'openmmlab'`` from the key names."""
    keys = list(keys)
    if any(_CONVNEXT_ORIGINAL.match(k) for k in keys):
        return 'convnext_original'
    if any(_SWIN_ORIGINAL.match(k) for k in keys):
        return 'swin_original'
    if 'fc.weight' in keys and any(k.startswith('layer1.0.conv1.') for k in keys):
        return 'torchvision'
    return 'openmmlab'


# --------------------------------------------------------------------- converters
def convert_convnext_original(sd: Dict[str, torch.Tensor], final_norm: Optional[str],
                              dropped: Dict[str, str]) -> Tuple[Dict, Dict]:
    """Original ConvNeXt names -> mmpretrain ConvNeXt names.

    Args:
        sd (dict): The original state dict.
        final_norm (str, optional): Where the final ``norm`` goes (``'norm3'`` for four
            stages); None if the model has no such module (the tensors are dropped).
        dropped (dict): Filled with the keys left out and why.

    Returns:
        tuple: ``(converted, renamed)`` with ``renamed`` mapping old -> new names.
    """
    out, renamed = OrderedDict(), {}
    for key, value in sd.items():
        new = key
        if key.startswith('head.'):
            dropped[key] = 'classifier head'
            continue
        if key.startswith('norm.'):
            if final_norm is None:
                dropped[key] = 'final norm: the model has no last-stage norm (out_indices)'
                continue
            new = final_norm + key[len('norm'):]
        elif key.startswith('stages.'):
            for old, rep in _CONVNEXT_RENAMES:
                new = new.replace(old, rep)
        if new != key:
            renamed[key] = new
        out[new] = value
    return out, renamed


def convert_swin_original(sd: Dict[str, torch.Tensor],
                          dropped: Dict[str, str]) -> Tuple[Dict, Dict]:
    """Original Swin Transformer names -> mmseg/mmdet ``SwinTransformer`` names, by
    mmdet's ``swin_converter`` (``attn.`` -> ``attn.w_msa.``, ``mlp.fc1`` ->
    ``ffn.layers.0.0``, ``mlp.fc2`` -> ``ffn.layers.1``, ``layers`` -> ``stages``,
    ``patch_embed.proj`` -> ``patch_embed.projection``; the patch-merging ``reduction``
    and ``norm`` weights reordered to mmcv's unfold order). The classifier ``head`` is
    dropped, as the converter does.

    Returns:
        tuple: ``(converted, renamed)`` with ``renamed`` mapping old -> new names.
    """
    from mmdet.models.backbones.swin import swin_converter
    out, renamed = OrderedDict(), {}
    for key, value in sd.items():
        converted = swin_converter(OrderedDict([(key, value)]))   # key by key: one each
        if not converted:
            dropped[key] = 'classifier head'
            continue
        (new, tensor), = converted.items()
        if new.startswith('backbone.'):          # mmdet's converter adds the prefix
            new = new[len('backbone.'):]
        if new != key:
            renamed[key] = new
        out[new] = tensor
    return out, renamed


def fit_swin_positions(sd: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor],
                       notes: List[str]) -> Dict[str, torch.Tensor]:
    """What mmseg's and mmdet's ``SwinTransformer.init_weights`` do to a checkpoint's
    position tensors: the absolute position embedding ``(1, L, C)`` becomes the
    model's ``(1, C, H, W)``, and a relative position bias table of another window
    size is resized bicubically to this model's (each such change is noted)."""
    import torch.nn.functional as F
    out = OrderedDict(sd)
    pos = out.get('absolute_pos_embed')
    target = own.get('absolute_pos_embed')
    if pos is not None and target is not None and pos.dim() == 3 and target.dim() == 4:
        n, c, h, w = target.shape
        if pos.shape == (n, h * w, c):
            out['absolute_pos_embed'] = pos.view(n, h, w, c).permute(0, 3, 1, 2).contiguous()
    for key, table in sd.items():
        if not key.endswith('relative_position_bias_table') or key not in own:
            continue
        (length, heads), (target, target_heads) = table.shape, own[key].shape
        if length == target or heads != target_heads:
            continue      # same window, or another architecture: the shape check says so
        size, target_size = int(length ** 0.5), int(target ** 0.5)
        grid = table.t().reshape(1, heads, size, size).float()
        resized = F.interpolate(grid, size=(target_size, target_size), mode='bicubic')
        out[key] = resized.reshape(heads, target).t().contiguous().to(table.dtype)
        notes.append(f'{key}: relative position bias table resized bicubically from '
                     f'window {(size + 1) // 2} to {(target_size + 1) // 2}')
    return out


def drop_classifier(sd: Dict[str, torch.Tensor], prefixes: Tuple[str, ...],
                    dropped: Dict[str, str]) -> Dict[str, torch.Tensor]:
    out = OrderedDict()
    for key, value in sd.items():
        if key.startswith(prefixes):
            dropped[key] = 'classifier head'
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------- loading
def _numbered_prefixes(key: str) -> List[str]:
    """``'stages.2.9.norm.weight'`` -> ``['stages.2', 'stages.2.9']``: the modules of a
    numbered container (stages, blocks, layers) the tensor lies in, outermost first."""
    parts = key.split('.')
    return ['.'.join(parts[:i + 1]) for i in range(len(parts) - 1) if parts[i].isdigit()]


def _whole_units(keys: List[str], own_names: List[str],
                 absent: Optional[set] = None) -> List[str]:
    """The outermost numbered modules that ``keys`` fill entirely.

    With ``absent`` (missing keys): modules of the backbone all of whose tensors
    (``own_names``) are absent from the checkpoint. Without (unexpected keys): modules of
    the checkpoint the backbone has no tensor under."""
    under: Dict[str, List[str]] = {}
    for name in own_names:
        for prefix in _numbered_prefixes(name):
            under.setdefault(prefix, []).append(name)
    units: List[str] = []
    for key in keys:
        for prefix in _numbered_prefixes(key):
            if absent is not None:
                whole = prefix in under and all(k in absent for k in under[prefix])
            else:
                whole = prefix not in under
            if whole:
                if prefix not in units:
                    units.append(prefix)
                break
    return units


def _kind(key: str) -> str:
    """``'stages.2.9.gamma'`` -> ``'stages.*.*.gamma'``."""
    return '.'.join('*' if part.isdigit() else part for part in key.split('.'))


def _systematic(keys: List[str], own_names: List[str], missing: bool) -> List[str]:
    """The kinds of tensor (:func:`_kind`) among ``keys`` that are not strays: with
    ``missing``, kinds every tensor of which the backbone has is absent from the
    checkpoint; without, kinds the checkpoint has in two or more blocks and the
    backbone not at all."""
    from collections import Counter
    found = Counter(_kind(k) for k in keys)
    own = Counter(_kind(k) for k in own_names)
    return sorted(kind for kind, n in found.items()
                  if '*' in kind and n >= 2 and (own[kind] == n if missing
                                                 else own[kind] == 0))


def _variant_hint(kinds: List[str]) -> str:
    hints = []
    if any(k.endswith('.gamma') and '.grn.' not in k for k in kinds):
        hints.append('layer scale (`gamma`) differs: set layer_scale_init_value > 0 for '
                     'a checkpoint with it (the released ConvNeXts), 0 without')
    if any('.grn.' in k for k in kinds):
        hints.append('GRN tensors: a ConvNeXt-V2 checkpoint, and this backbone is '
                     'ConvNeXt (V1); pick a V1 checkpoint')
    return ('; '.join(hints) + '. ') if hints else ''


def _partial_message(owner: str, source: str, layout: str,
                     report: 'PretrainedLoadReport') -> str:
    parts = []
    for kind in report.missing_kinds:
        n = sum(1 for k in report.missing_other if _kind(k) == kind)
        parts.append(f'every {kind} of the backbone ({n} tensors) is missing from it')
    for kind in report.unexpected_kinds:
        n = sum(1 for k in report.unexpected if _kind(k) == kind)
        parts.append(f'it has {kind} ({n} tensors), which the backbone has none of')
    if report.missing_blocks:
        n = sum(1 for k in report.missing_other
                if any(k.startswith(u + '.') for u in report.missing_blocks))
        parts.append(f'{len(report.missing_blocks)} blocks/layers of the backbone are '
                     f'not in it ({n} tensors: {_abbrev(report.missing_blocks, 6)}) and '
                     'would keep their random initialisation')
    if report.unexpected_blocks:
        n = sum(1 for k in report.unexpected
                if any(k.startswith(u + '.') for u in report.unexpected_blocks))
        parts.append(f'it has {len(report.unexpected_blocks)} blocks/layers the backbone '
                     f'lacks ({n} tensors: {_abbrev(report.unexpected_blocks, 6)})')
    kinds = report.missing_kinds + report.unexpected_kinds
    fix = (_variant_hint(kinds) + 'Set the backbone\'s arguments to match the checkpoint'
           if kinds else 'Set arch/depth (depths, num_stages...) to match the checkpoint')
    if any(u.startswith('stem.') for u in report.missing_blocks + report.unexpected_blocks):
        fix += (' (deep_stem=True for a checkpoint with stem.* tensors, the V1c ResNets; '
                'deep_stem=False for one with conv1)')
    return (f'{owner}: the pretrained checkpoint {source} (layout {layout!r}) is of '
            f'another depth or architecture: {"; ".join(parts)}. {fix}, or pick the '
            'checkpoint of this architecture; to load it anyway, set allow_partial=True '
            'in the backbone\'s init_cfg (--cfg-options '
            'model.backbone.init_cfg.allow_partial=True).')


class PretrainedCheckpointError(RuntimeError):
    """A pretrained checkpoint could not be read (the loader's error is the cause)."""


_REMOTE = re.compile(r'^[A-Za-z][A-Za-z0-9+.-]*://')


def _read_failure_message(owner: str, source: str, exc: BaseException) -> str:
    """One message for a checkpoint that could not be read: the backbone, the source,
    what went wrong (in one line) and the fix."""
    import pickle
    from urllib.error import URLError
    detail = (str(exc).strip().splitlines() or [''])[0]
    cause = f'{type(exc).__name__}: {detail}' if detail else type(exc).__name__
    remote = bool(_REMOTE.match(source)) and not source.startswith('file://')
    if isinstance(exc, URLError) or (remote and isinstance(exc, OSError)):
        what = f'it could not be downloaded (no network access?) ({cause})'
    elif isinstance(exc, FileNotFoundError):
        what = f'there is no such file ({cause})'
    elif isinstance(exc, EOFError):
        what = f'the file is empty or ends early ({cause})'
    elif isinstance(exc, RuntimeError) and ('PytorchStreamReader' in detail
                                            or 'zip archive' in detail):
        what = f'the file is truncated or corrupt, not a whole torch.save file ({cause})'
    elif isinstance(exc, pickle.UnpicklingError):
        what = f'the file is not a PyTorch checkpoint, or is corrupt ({cause})'
    else:
        what = cause
    key = 'model.backbone.init_cfg.checkpoint'
    if remote:
        fix = (f'download it on a machine with network access and pass '
               f'--cfg-options {key}=LOCAL_PATH')
    else:
        fix = (f'download the checkpoint again (or fix the path) and pass '
               f'--cfg-options {key}=LOCAL_PATH')
    return (f'{owner}: cannot read the pretrained checkpoint {source} '
            f'(init_cfg.checkpoint): {what}. Fix: {fix}.')


#: ``(state_dict, layout, dropped) -> (state_dict, renamed)``, or ``(state_dict,
#: renamed, notes)`` where the conversion changed tensors (notes go into the report).
Converter = Callable[[Dict[str, torch.Tensor], str, Dict[str, str]], Tuple]


def load_pretrained(module: nn.Module, checkpoint: Union[str, dict], converter: Converter,
                    prefix: Optional[str] = None, map_location='cpu',
                    logger='current',
                    expected_missing: Optional[Callable[[str], Optional[str]]] = None,
                    allow_partial: bool = False) -> PretrainedLoadReport:
    """Load a pretrained checkpoint into an adapted backbone.

    Args:
        module (nn.Module): The backbone.
        checkpoint (str | dict): A path, URL, ``torchvision://``/``open-mmlab://`` name (anything
            mmengine's ``CheckpointLoader`` accepts), or an already loaded dict.
        converter (callable): ``(state_dict, layout, dropped) -> (state_dict, renamed)``,
            the backbone's conversion to its own names, or ``(state_dict, renamed,
            notes)`` with a note for each tensor it changed (they go into the report).
        prefix (str, optional): Keep only the keys under this prefix (stripped).
            Defaults to None: a ``backbone.`` prefix is detected.
        map_location: Passed to the loader. Defaults to 'cpu'.
        logger: mmengine logger for the summary. Defaults to 'current'.
        expected_missing (callable, optional): ``name -> reason or None`` for backbone
            tensors no pretrained checkpoint of this kind carries (e.g. the extra output
            norms of a dense-prediction ConvNeXt). Defaults to None.
        allow_partial (bool): Load a checkpoint that lacks whole blocks or layers of
            the backbone (they keep their initialisation), or that has whole blocks the
            backbone lacks (they are not loaded): a checkpoint of another depth, such as
            ConvNeXt-T weights in a ConvNeXt-S, or whose blocks lack a kind of tensor
            the backbone's all have, or have one the backbone's have not (layer scale).
            Without it that is an error naming the blocks or the kinds; single tensors
            missing or unexpected are only reported. Set it in
            the config as ``init_cfg=dict(type='Pretrained', checkpoint=...,
            allow_partial=True)``. Defaults to False.

    Returns:
        PretrainedLoadReport: Also logged (as a warning when anything is missing or
        unexpected beyond adapter tensors).
    """
    from mmengine.logging import print_log
    from mmengine.runner.checkpoint import CheckpointLoader

    owner = type(module).__name__
    if isinstance(checkpoint, dict):
        raw, source = checkpoint, '<dict>'
    else:
        source = str(checkpoint)
        try:
            raw = CheckpointLoader.load_checkpoint(checkpoint, map_location=map_location,
                                                   logger=logger)
        except Exception as exc:
            raise PretrainedCheckpointError(
                _read_failure_message(owner, source, exc)) from exc
    dropped: Dict[str, str] = {}
    notes: List[str] = []
    sd = select_prefix(unwrap_state_dict(raw), prefix, dropped, notes)
    layout = detect_layout(sd)
    converted = converter(sd, layout, dropped)
    sd, renamed = converted[:2]
    notes.extend(converted[2] if len(converted) > 2 else [])

    own = module.state_dict()
    mismatched = [f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
                  for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise ValueError(
            f'{owner}: the pretrained checkpoint {source} (layout {layout!r}) does not fit '
            f'this backbone; {len(mismatched)} tensors differ in shape: '
            f'{_abbrev(mismatched, 6)}. The checkpoint is for another architecture: '
            'set arch/depth to match it, or pick the matching checkpoint.')
    report = PretrainedLoadReport(checkpoint=source, layout=layout, renamed=renamed,
                                  dropped=dropped, notes=notes)
    report.loaded = [k for k in sd if k in own]
    report.unexpected = [k for k in sd if k not in own]
    for k in own:
        if k in sd or k.endswith('num_batches_tracked'):
            continue
        if is_adapter_name(k):
            report.missing_adapter.append(k)
        elif expected_missing is not None and expected_missing(k):
            report.missing_expected[k] = expected_missing(k)
        else:
            report.missing_other.append(k)
    if not report.loaded:
        raise ValueError(f'{owner}: nothing of the pretrained checkpoint {source} matches '
                         f'this backbone (layout {layout!r}; checkpoint keys look like '
                         f'{list(sd)[:5]}, the backbone\'s like {list(own)[:5]}). Set '
                         "init_cfg.prefix, or convert the checkpoint.")
    report.missing_blocks = _whole_units(
        report.missing_other, own_names=[k for k in own if not is_adapter_name(k)
                                         and not k.endswith('num_batches_tracked')],
        absent=set(report.missing_other) | set(report.missing_expected))
    report.unexpected_blocks = _whole_units(report.unexpected, own_names=list(own))
    in_blocks = [k for k in report.missing_other
                 if not any(k.startswith(u + '.') for u in report.missing_blocks)]
    report.missing_kinds = _systematic(in_blocks, list(own), missing=True)
    report.unexpected_kinds = _systematic(
        [k for k in report.unexpected
         if not any(k.startswith(u + '.') for u in report.unexpected_blocks)],
        list(own), missing=False)
    if (report.missing_blocks or report.unexpected_blocks or report.missing_kinds
            or report.unexpected_kinds):
        if not allow_partial:
            raise ValueError(_partial_message(owner, source, layout, report))
        report.notes.append(
            f'allow_partial=True: {len(report.missing_blocks)} blocks/layers and '
            f'{len(report.missing_kinds)} kinds of tensor not in the checkpoint keep their '
            f'initialisation, {len(report.unexpected_blocks)} blocks/layers and '
            f'{len(report.unexpected_kinds)} kinds of tensor of the checkpoint are not '
            'loaded')
    # strict=False for the adapter tensors only; everything else is accounted for above.
    module.load_state_dict({k: sd[k] for k in report.loaded}, strict=False)
    print_log(report.summary(owner), logger=logger,
              level=logging.INFO if report.clean else logging.WARNING)
    return report
