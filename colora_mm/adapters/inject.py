"""Injection: which modules get which adapter, what trains, and model-level merging.

Kept apart from the adapter math. Targets are explicit module names (or regular
expressions, matched in full against ``named_modules()``); a target that matches nothing
is an error, so a renamed upstream module can never silently disable an adapter.
"""
from __future__ import annotations

import functools
import math
import numbers
import re
import typing
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from .base import AdaptedLayer, is_adapter_name
from .colora_pair import PARTNER_POLICIES, CoLoRAPair, CoLoRAPairLayer
from .conv_adapter import ACTIVATIONS, ConvAdapter
from .hira import HiRA
from .lora import LoRA, PiSSA
from .overrides import LayerSpecs, all_or_nothing, check_overrides
from .paths import TRAIN_PATHS
from .spatial import SpatialLowRankBranch

METHODS = ('colora', 'lora', 'pissa', 'hira', 'conv_adapter', 'bitfit', 'full')
DEFAULT_GAMMA = {'colora': 16, 'lora': 20, 'pissa': 20, 'hira': 20, 'conv_adapter': 4}
#: The :class:`AdapterSpec` fields each method reads besides ``method``; it ignores the
#: others (:func:`spec_keys_used`). ``bitfit`` and ``full`` inject no adapter.
METHOD_KEYS = {
    'colora': ('gamma', 'share_ratio', 'use_filter', 'filter_lambda', 'partner_policy',
               'spatial', 'spatial_gamma', 'train_path', 'merged', 'overrides'),
    'lora': ('gamma', 'scaling', 'train_path', 'merged', 'overrides'),
    'pissa': ('gamma', 'scaling', 'train_path', 'merged', 'overrides'),
    'hira': ('gamma', 'merged', 'overrides'),
    'conv_adapter': ('gamma', 'act', 'merged', 'overrides'),
    'bitfit': (),
    'full': (),
}
NORM_TYPES = (_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm)


@dataclass
class AdapterSpec:
    """What to inject. ``AdapterSpec.from_dict`` takes the same keys as a config's
    ``adapter=dict(...)``. Every value, the overrides' included, is checked against the
    type declared here when the spec is made (integers count as numbers, booleans as
    neither; numpy scalars as the Python values they hold).

    Args:
        method (str): ``'colora'``, ``'lora'``, ``'pissa'``, ``'hira'``,
            ``'conv_adapter'``, ``'bitfit'`` (no adapter: biases and normalisation
            layers only, the trainable set every PEFT method here shares) or ``'full'``
            (full fine-tuning). A method ignores the keys it does not read
            (:func:`spec_keys_used`; ``'bitfit'`` and ``'full'`` read none): set to a
            value other than the default, they give a warning. Defaults to 'colora'.
        gamma (int, optional): Rank divisor; None takes the method's default
            (colora 16, lora/pissa/hira 20, conv_adapter 4). Defaults to None.
        share_ratio (float): CoLoRA's shared fraction of the rank. Defaults to 0.5.
        use_filter (bool): CoLoRA's range filter in the spatial branch. Defaults to True.
        filter_lambda (float): Filter weight ``lambda`` (finite). Defaults to 0.2.
        partner_policy (str): ``'effective'`` or ``'frozen'``. Defaults to 'effective'.
        spatial (bool): CoLoRA's spatial branch on the spatial convs. Defaults to True.
        spatial_gamma (int, optional): Rank divisor of the spatial branch,
            ``r = C // spatial_gamma``; None takes ``gamma``. The paper's ConvNeXt
            #Param figures (Tables 5-8) are reproduced with ``2 * gamma``, which the
            paper-reproduction configs set. Defaults to None.
        scaling (float): LoRA/PiSSA ``alpha / r`` (finite, > 0). Defaults to 2.0.
        act (str): Conv-Adapter activation, ``'relu'`` or ``'gelu'``. Defaults to 'relu'.
        train_path (str): How low-rank updates (CoLoRA pair, LoRA, PiSSA) are applied
            in the forward pass: ``'activation'`` (``base(x) + (x L) R``),
            ``'weight'`` (``x (W + L R)``) or ``'auto'`` (per layer and input, the
            cheaper one; :mod:`colora_mm.adapters.paths`). The same function either way.
            Defaults to 'auto'.
        merged (bool): Describes the deployment structure that ``merge_adapters``
            leaves: backbones fold what folds right after injection, so only the
            branches that cannot fold remain (what ``tools/merge.py`` writes into the
            config of a merged checkpoint). Defaults to False.
        overrides (sequence of dict): Per-layer settings, ``dict(pattern=glob,
            **settings)``, first match wins; ``method='none'`` leaves the matched
            layers without adapter (see :mod:`.overrides`). Defaults to ().
    """

    method: str = 'colora'
    gamma: Optional[int] = None
    share_ratio: float = 0.5
    use_filter: bool = True
    filter_lambda: float = 0.2
    partner_policy: str = 'effective'
    spatial: bool = True
    spatial_gamma: Optional[int] = None
    scaling: float = 2.0
    act: str = 'relu'
    train_path: str = 'auto'
    merged: bool = False
    overrides: Sequence[dict] = ()

    def __post_init__(self) -> None:
        for f in fields(self):   # numpy scalars (from configs) as the Python values
            setattr(self, f.name, _plain(getattr(self, f.name)))
        if self.method is None:
            self.method = 'full'
        if self.method not in METHODS:
            raise ValueError(f'AdapterSpec: method={self.method!r}; expected one of '
                             f'{METHODS}.')
        for key in ('gamma', 'spatial_gamma'):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(
                    value, numbers.Integral) or value <= 0):
                raise ValueError(f'AdapterSpec: {key}={value!r} ({type(value).__name__}) '
                                 'must be a positive integer (the rank divisor r = width '
                                 '// gamma) or None.')
        for f in fields(self):
            error = spec_type_error(f.name, getattr(self, f.name))
            if error:
                raise ValueError(f'AdapterSpec: {error}.')
        if not 0.0 <= self.share_ratio <= 1.0:
            raise ValueError(f'AdapterSpec: share_ratio={self.share_ratio} must lie in '
                             '[0, 1].')
        if not math.isfinite(self.filter_lambda):
            raise ValueError(f'AdapterSpec: filter_lambda={self.filter_lambda!r} must be '
                             'a finite number (the weight lambda of the range filter; '
                             'default 0.2).')
        if not (math.isfinite(self.scaling) and self.scaling > 0):
            raise ValueError(f'AdapterSpec: scaling={self.scaling!r} must be a finite '
                             'number > 0 (LoRA/PiSSA alpha / r, which multiplies the '
                             'update and its gradients; default 2.0).')
        if self.train_path not in TRAIN_PATHS:
            raise ValueError(f'AdapterSpec: train_path={self.train_path!r}; expected one '
                             f'of {TRAIN_PATHS}.')
        if self.partner_policy not in PARTNER_POLICIES:
            raise ValueError(f'AdapterSpec: partner_policy={self.partner_policy!r}; '
                             f'expected one of {PARTNER_POLICIES}.')
        if self.act not in ACTIVATIONS:
            raise ValueError(f'AdapterSpec: act={self.act!r} (the Conv-Adapter '
                             f'activation); expected one of {tuple(ACTIVATIONS)}.')
        self.overrides = check_overrides(self)
        self._warn_ignored_keys()

    def _warn_ignored_keys(self) -> None:
        """Warn about keys the method does not read that are set to a value other
        than their default: they change nothing (other methods' keys are accepted, so
        that one table of settings can serve every method)."""
        used = spec_keys_used(self.method)
        ignored = [f'{f.name}={getattr(self, f.name)!r}' for f in fields(self)
                   if f.name not in used and getattr(self, f.name) != f.default]
        if not ignored:
            return
        one = len(ignored) == 1
        if METHOD_KEYS[self.method]:
            what = (f'does not read {", ".join(ignored)} (it reads '
                    f'{", ".join(used[1:])}); {"it has" if one else "they have"}')
        else:
            trains = ('biases and normalisation layers train alone'
                      if self.method == 'bitfit' else 'every parameter trains')
            what = (f'injects no adapter ({trains}); {", ".join(ignored)} '
                    f'{"has" if one else "have"}')
        warnings.warn(
            f'AdapterSpec: method={self.method!r} {what} no effect. Drop '
            f'{"it" if one else "them"} (a config that inherits another method\'s '
            f'adapter: adapter=dict(_delete_=True, method={self.method!r}, ...)), or '
            f'pick a method that reads {"it" if one else "them"}.', UserWarning,
            stacklevel=4)

    @classmethod
    def from_dict(cls, cfg: Union[None, dict, 'AdapterSpec']) -> 'AdapterSpec':
        if isinstance(cfg, AdapterSpec):
            return cfg
        if cfg is None:
            return cls(method='full')
        known = {f.name for f in fields(cls)}
        unknown = set(cfg) - known
        if unknown:
            raise ValueError(f'AdapterSpec: unknown keys {sorted(unknown)}; allowed: '
                             f'{sorted(known)}.')
        return cls(**dict(cfg))

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def rank_divisor(self) -> int:
        return self.gamma if self.gamma is not None else DEFAULT_GAMMA.get(self.method, 1)

    @property
    def spatial_rank_divisor(self) -> int:
        """Divisor of CoLoRA's spatial branch rank: ``spatial_gamma``, else ``gamma``."""
        return self.spatial_gamma if self.spatial_gamma is not None else self.rank_divisor


def spec_keys_used(method: Optional[str]) -> Tuple[str, ...]:
    """The :class:`AdapterSpec` fields that change what ``method`` builds,
    ``'method'`` first (None is ``'full'``): ``('method',)`` for ``'bitfit'`` and
    ``'full'``; LoRA reads ``gamma`` and ``scaling`` but not CoLoRA's ``share_ratio``.
    Two specs of one method with equal values for these keys build the same model.

    Raises:
        ValueError: ``method`` is none of :data:`METHODS`.
    """
    method = 'full' if method is None else method
    if not isinstance(method, str) or method not in METHOD_KEYS:
        raise ValueError(f'spec_keys_used: method={method!r}; expected one of '
                         f'{METHODS}.')
    return ('method',) + METHOD_KEYS[method]


# ------------------------------------------------------------------ spec types
_TYPE_NAMES = {bool: 'True or False', int: 'an integer', float: 'a number',
               str: 'a string', type(None): 'None', dict: 'a dict',
               list: 'a list', tuple: 'a tuple'}


def _plain(value):
    """A numpy scalar as the Python value it holds; anything else as it is."""
    if type(value).__module__ == 'numpy' and getattr(value, 'ndim', None) == 0:
        return value.item()
    return value


def _fits(value, annotation) -> bool:
    """Does ``value`` have the type ``annotation`` declares (unknown types: yes).
    Integers are numbers, booleans are neither."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        return any(_fits(value, option) for option in typing.get_args(annotation))
    container = origin or annotation
    if container is type(None):
        return value is None
    if container is bool:
        return isinstance(value, bool)
    if container is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if container is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if container in (list, tuple):
        return isinstance(value, (list, tuple))
    if container in (str, dict):
        return isinstance(value, container)
    return True   # Any, Sequence[dict]...: the spec checks them itself


def _expected(annotation) -> str:
    if typing.get_origin(annotation) is typing.Union:
        return ' or '.join(_expected(a) for a in typing.get_args(annotation))
    container = typing.get_origin(annotation) or annotation
    return _TYPE_NAMES.get(container, getattr(container, '__name__', str(container)))


@functools.lru_cache(maxsize=None)
def spec_types() -> Dict[str, object]:
    """``{field: annotation}`` of :class:`AdapterSpec`."""
    return typing.get_type_hints(AdapterSpec)


def spec_type_error(key: str, value) -> Optional[str]:
    """Why ``value`` cannot be :class:`AdapterSpec`'s ``key``, as
    ``"key=value (type) must be <type>[; the fix]"``; None when it has the declared type
    (or ``key`` is no field). Numpy scalars count as the Python values they hold."""
    annotation = spec_types().get(key)
    value = _plain(value)
    if annotation is None or _fits(value, annotation):
        return None
    message = f'{key}={value!r} ({type(value).__name__}) must be {_expected(annotation)}'
    if not isinstance(value, str):
        return message
    text = value.strip()
    if _fits(True, annotation):
        if text.lower() in ('true', 'false'):
            return (f'{message}; write {key}={text.capitalize()} without quotes (a '
                    'non-empty string counts as true)')
        return f'{message}; write {key}=True or {key}=False without quotes'
    for number in (int, float):
        try:
            parsed = number(text)
        except ValueError:
            continue
        if _fits(parsed, annotation) and math.isfinite(parsed):
            return f'{message}; write {key}={text} without quotes'
    return message


# ---------------------------------------------------------------------- targets
def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition('.')
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _name_list(targets, what: str, argument: str) -> List[str]:
    """``targets`` as a list of strings; a lone string (read letter by letter
    otherwise) or anything else is refused with the fix."""
    if isinstance(targets, str):
        raise ValueError(f'{what}: {argument}={targets!r}; give a list of module names or '
                         f'patterns, e.g. {argument}=[{targets!r}].')
    targets = list(targets)
    if not all(isinstance(t, str) for t in targets):
        raise ValueError(f'{what}: {argument}={targets!r}; every entry must be a module '
                         'name or pattern (str).')
    return targets


def _pair_list(pairs) -> List[Tuple[str, str]]:
    """``pairs`` as a list of ``(W1, W2)`` name pairs; refuses a flat pair or a string."""
    items = None if isinstance(pairs, str) else list(pairs)

    def is_pair(p):
        return (isinstance(p, (tuple, list)) and len(p) == 2
                and all(isinstance(n, str) for n in p))

    if items is None or not all(is_pair(p) for p in items):
        flat = items is not None and len(items) == 2 and all(
            isinstance(n, str) for n in items)
        example = (f'pairs=[{tuple(items)!r}]' if flat
                   else "pairs=[('pwconv1', 'pwconv2'), ...]")
        raise ValueError(f'CoLoRA pairs: pairs={pairs!r}; give a list of (W1, W2) name '
                         f'pairs, e.g. {example}.')
    return [tuple(p) for p in items]


def resolve_names(model: nn.Module, targets: Iterable[str], what: str) -> List[str]:
    """Module names for explicit names or full-match regular expressions."""
    names = [n for n, _ in model.named_modules() if n]
    name_set = set(names)
    out: List[str] = []
    for target in targets:
        if target in name_set:
            hits = [target]
        else:
            try:
                pattern = re.compile(target)
            except re.error as err:
                raise ValueError(f'{what}: {target!r} is neither a module name of '
                                 f'{type(model).__name__} nor a valid regular expression '
                                 f'({err}); escape special characters (re.escape) or '
                                 'give the exact name.') from None
            hits = [n for n in names if pattern.fullmatch(n)]
        if not hits:
            sample = ', '.join(names[:6])
            raise ValueError(f'{what}: {target!r} matches no module of '
                             f'{type(model).__name__} (names look like: {sample}, ...). '
                             'Give exact module names or a regular expression.')
        out.extend(h for h in hits if h not in out)
    return out


def _pointwise_shapes(name: str, module: nn.Module) -> Tuple[int, int]:
    if isinstance(module, AdaptedLayer):
        # before the shape checks: a wrapper is neither Linear nor Conv2d
        where = (module.describe() if module.layer_name == name
                 else f'{name}, adapted as {module.describe()},')
        raise ValueError(f'{where} already carries an adapter '
                         f'({module.adapter_branch.method}); inject once per layer: adapt '
                         'a fresh model, or leave this layer out of the targets.')
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if (isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)
            and module.groups == 1):
        return module.in_channels, module.out_channels
    raise ValueError(f'{name} ({type(module).__name__}'
                     f'{", groups=%d" % module.groups if isinstance(module, nn.Conv2d) else ""}'
                     f'{", kernel=%s" % (tuple(module.kernel_size),) if isinstance(module, nn.Conv2d) else ""}) '
                     'is not a pointwise layer (Linear or 1x1 conv with groups=1); only '
                     'those can form a pair or take a pointwise adapter.')


def _wrap(model, name, make_adapter, train_path: str = 'auto') -> AdaptedLayer:
    base = model.get_submodule(name)
    layer = AdaptedLayer(base, make_adapter, name, train_path)
    _set_module(model, name, layer)
    return layer


@all_or_nothing
def inject_adapters(model: nn.Module, spec: Union[AdapterSpec, dict, None], *,
                    pairs: Sequence[Tuple[str, str]] = (),
                    spatial: Sequence[str] = (),
                    pointwise: Optional[Sequence[str]] = None,
                    ) -> Dict[str, AdaptedLayer]:
    """Wrap the targeted layers of ``model`` in place.

    Args:
        model (nn.Module): The model (or backbone) to adapt.
        spec (AdapterSpec | dict | None): What to inject; None means full fine-tuning.
        pairs (sequence of (str, str)): Chained pointwise layers ``(W1, W2)`` by name.
        spatial (sequence of str): Spatial convs, by name or pattern.
        pointwise (sequence of str, optional): Layers for LoRA/PiSSA/HiRA by name or
            pattern; defaults to both layers of every pair.

    Returns:
        dict: Qualified name -> :class:`AdaptedLayer`, in injection order. On an error
        the model is left as it was.
    """
    spec = AdapterSpec.from_dict(spec)
    method = spec.method
    pairs = _pair_list(pairs)
    spatial = _name_list(spatial, f'inject_adapters(method={method!r})', 'spatial')
    if pointwise is not None:
        pointwise = _name_list(pointwise, f'inject_adapters(method={method!r})',
                               'pointwise')
    layer_spec = LayerSpecs(model, spec)    # per-target settings (spec.overrides)
    injected: Dict[str, AdaptedLayer] = {}
    if method in ('full', 'bitfit'):
        return injected

    if method == 'colora':
        if not pairs:
            raise ValueError('inject_adapters(method="colora"): no pairs given; CoLoRA '
                             'adapts chained pointwise layers (W1, W2).')
        for n1, n2 in pairs:
            resolve_names(model, [n1, n2], 'CoLoRA pair')
            d, d_mid = _pointwise_shapes(n1, model.get_submodule(n1))
            d_mid2, d_out = _pointwise_shapes(n2, model.get_submodule(n2))
            if d_mid != d_mid2:
                raise ValueError(
                    f'CoLoRA pair ({n1}, {n2}) does not chain: {n1} maps {d} -> {d_mid} '
                    f'but {n2} expects {d_mid2} inputs. Pair W1 with the layer that '
                    'consumes its output.')
            s = layer_spec.pair(n1, n2, (d, d_mid, d_out))
            if s is None:
                continue
            pair = CoLoRAPair(d, d_mid, d_out, s.rank_divisor, s.share_ratio,
                              s.partner_policy,
                              where=f'CoLoRA pair ({n1}: {d} -> {d_mid}, '
                                    f'{n2}: {d_mid} -> {d_out})')
            # The partners read both layers' base weights (plus an offset that starts
            # empty): the freshly injected model is the base model.
            injected[n1] = _wrap(model, n1, lambda layer, p=pair: CoLoRAPairLayer(
                p, 0, layer), s.train_path)
            injected[n2] = _wrap(model, n2, lambda layer, p=pair: CoLoRAPairLayer(
                p, 1, layer), s.train_path)
        for name in resolve_names(model, spatial, 'CoLoRA spatial branch'):
            s = layer_spec.spatial(name)
            if s is None or not s.spatial:
                continue
            injected[name] = _wrap(model, name, lambda layer: SpatialLowRankBranch(
                layer, _spatial_rank(layer, s.spatial_rank_divisor), s.use_filter,
                s.filter_lambda))
        return layer_spec.finish(injected)

    if method in ('lora', 'pissa', 'hira'):
        targets = list(pointwise) if pointwise is not None else [n for p in pairs for n in p]
        if not targets:
            raise ValueError(f'inject_adapters(method={method!r}): no pointwise layers '
                             'given (pass pairs or pointwise).')
        for name in resolve_names(model, targets, f'{method} layer'):
            _pointwise_shapes(name, model.get_submodule(name))
            s = layer_spec.pointwise(name)
            if s is None:
                continue
            if method == 'hira':
                make = lambda layer: HiRA(layer, s.rank_divisor)  # noqa: E731
            else:
                cls = LoRA if method == 'lora' else PiSSA
                make = lambda layer, cls=cls: cls(layer, s.rank_divisor, s.scaling)  # noqa: E731
            injected[name] = _wrap(model, name, make, s.train_path)
        return layer_spec.finish(injected)

    # conv_adapter
    if not spatial:
        raise ValueError('inject_adapters(method="conv_adapter"): no spatial convs given.')
    for name in resolve_names(model, spatial, 'Conv-Adapter layer'):
        s = layer_spec.spatial(name)
        if s is None:
            continue
        injected[name] = _wrap(model, name,
                               lambda layer: ConvAdapter(layer, s.rank_divisor, s.act))
    return layer_spec.finish(injected)


def _spatial_rank(layer: AdaptedLayer, gamma: int) -> int:
    r = layer.in_channels // gamma
    if r == 0:
        raise ValueError(f'{layer.describe()}: spatial rank r = C // gamma = '
                         f'{layer.in_channels} // {gamma} = 0; use gamma (or '
                         f'spatial_gamma) <= {layer.in_channels}.')
    return r


# ------------------------------------------------------------------- training set
def iter_adapted_layers(model: nn.Module) -> Iterator[Tuple[str, AdaptedLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            yield name, module


def norm_parameter_names(model: nn.Module) -> set:
    out = set()
    for mname, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            for pname, _ in module.named_parameters(recurse=False):
                out.add(f'{mname}.{pname}' if mname else pname)
    return out


def is_peft_trainable(name: str, norm_names: set) -> bool:
    """The PEFT trainable set: adapters, every bias, every normalisation layer."""
    return is_adapter_name(name) or name.rsplit('.', 1)[-1] == 'bias' or name in norm_names


def mark_trainable(model: nn.Module, method: str = 'colora') -> None:
    """Set ``requires_grad``: everything for ``'full'``; otherwise adapters, every bias
    and every normalisation layer, and nothing else (layer-scale ``gamma`` stays frozen;
    ``'bitfit'`` has no adapter, so biases and norms alone)."""
    if method not in METHODS and method is not None:
        raise ValueError(f'mark_trainable: method={method!r}; expected one of {METHODS}.')
    full = method in (None, 'full')
    norms = norm_parameter_names(model)
    for name, param in model.named_parameters():
        param.requires_grad_(full or is_peft_trainable(name, norms))


@torch.no_grad()
def reset_adapters_from_weights(model: nn.Module) -> int:
    """After the pretrained weights are loaded: re-seed partner buffers, run PiSSA's
    SVD. Returns the number of adapted layers visited."""
    count = 0
    for _, layer in iter_adapted_layers(model):
        layer.adapter_branch.reset_from_weights(layer)
        count += 1
    return count


def adapter_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Only the adapter tensors (parameters and persistent buffers)."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_name(k)}


# ------------------------------------------------------------------------- merge
@torch.no_grad()
def merge_adapters(model: nn.Module, replace: bool = True) -> List[str]:
    """Fold every foldable adapter into its base weight.

    Folded wrappers are swapped for plain ``nn.Linear``/``nn.Conv2d`` layers when
    ``replace`` is True (the default), so the result has the upstream structure.

    Returns:
        list[str]: Names of the layers whose adapter could not fold (they keep it).
    """
    layers = list(iter_adapted_layers(model))
    unfolded = []
    # Every update first, then the folds: a pair's update reads its partner's base weight.
    deltas = {name: layer.get_delta_weight() for name, layer in layers
              if not layer.merged and layer.foldable}
    for name, layer in layers:
        if layer.merged:
            continue
        if layer.foldable:
            layer.merge(deltas[name])
        else:
            unfolded.append(name)
    if replace:
        for name, layer in layers:
            if layer.merged:
                _set_module(model, name, layer.to_plain())
    return unfolded


@torch.no_grad()
def unmerge_adapters(model: nn.Module) -> int:
    """Undo :func:`merge_adapters(replace=False)`. Returns the number of layers restored."""
    count = 0
    for _, layer in iter_adapted_layers(model):
        if layer.merged:
            layer.unmerge()
            count += 1
    return count


def trainable_report(model: nn.Module) -> Dict[str, int]:
    """Parameter counts: total, trainable, adapter, and trainable non-adapter."""
    total = trainable = adapter = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if is_adapter_name(name):
            adapter += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    base = total - adapter
    return dict(total=total, base=base, trainable=trainable, adapter=adapter,
                trainable_other=trainable - adapter)
