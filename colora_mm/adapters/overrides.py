"""Per-layer adapter settings: the ``overrides`` of an :class:`AdapterSpec`.

The CoLoRA paper uses one gamma and one share ratio for every layer and leaves a
layer-specific choice open (appendix, limitations). ``overrides`` gives stages, blocks or
single layers their own settings::

    adapter=dict(method='colora', gamma=16, share_ratio=0.5, overrides=[
        dict(pattern='stages.3.*', gamma=8, share_ratio=0.8),   # last stage: twice the rank
        dict(pattern='stages.0.*', method='none'),              # first stage: no adapter
    ])

Semantics:

* ``pattern`` is a shell-style glob (:func:`fnmatch.fnmatchcase`, case-sensitive)
  matched against the full qualified names of the layers the adapter targets, as they
  are named inside the model given to ``inject_adapters`` (for a backbone:
  ``'stages.3.0.pointwise_conv1'``, not ``'backbone.stages...'``). ``*`` also crosses
  dots: ``'stages.3.*'`` is every adapted layer of stage 3, ``'stages.[12].*'`` two
  stages, ``'*.depthwise_conv'`` every spatial conv; an exact name matches itself.
* A *target* is one adapter: a CoLoRA pair (both its layers; selected when the pattern
  matches either layer's name, since the pair is one adapter with one setting), a
  spatial conv, or one pointwise layer (LoRA, PiSSA, HiRA).
* First match wins: a target takes the settings of the first override that matches it,
  on top of the global spec; a target no override matches takes the global spec.
* An override may set any key of :class:`AdapterSpec` but ``merged`` and ``overrides``.
  ``method`` may only be ``'none'`` (no adapter on the matched targets: under PEFT their
  weights stay frozen, their biases and norms train as everywhere else) or the spec's
  own method. Each override is validated like the global spec when the spec is made.
* Every override must take effect: a pattern that matches no adapted layer (a typo, or a
  module that carries no adapter, such as a norm or a downsampling layer) is an error
  naming the pattern and real adapted names; so is an override that earlier ones
  shadow completely, and a key that none of the targets an override takes reads (a
  CoLoRA pair reads ``gamma``, ``share_ratio``, ``partner_policy``, ``train_path``; its
  spatial branch ``spatial``, ``spatial_gamma``, ``use_filter``, ``filter_lambda`` and
  ``gamma`` while ``spatial_gamma`` is None; LoRA and PiSSA ``gamma``, ``scaling``,
  ``train_path``; HiRA ``gamma``; Conv-Adapter ``gamma``, ``act``).
* A setting that leaves a narrow layer rank 0 is an error naming the layers, their
  width, where the setting comes from and the fix; and an error anywhere in
  ``inject_adapters`` restores the model as it was (:func:`all_or_nothing`): nothing is
  built half-way.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch.nn as nn

#: ``method`` of an override that leaves its targets without adapter.
NO_ADAPTER = 'none'
#: Spec keys an override cannot set.
NOT_OVERRIDABLE = ('merged', 'overrides')


def stage_of(name: str) -> str:
    """The stage a layer name belongs to: the name up to its first component holding a
    digit (``'stages.3.0.pointwise_conv1'`` -> ``'stages.3'``, ``'layer4.0.conv1'`` ->
    ``'layer4'``, ``'stages.2.blocks.1.ffn.layers.1'`` -> ``'stages.2'``)."""
    parts = name.split('.')
    for i, part in enumerate(parts):
        if any(c.isdigit() for c in part):
            return '.'.join(parts[:i + 1])
    return parts[0]


def stage_glob(name: str) -> str:
    """A pattern selecting the stage of layer ``name`` (``'stages.3.*'``), or the
    name itself when it belongs to no numbered stage."""
    stage = stage_of(name)
    return name if stage == name else f'{stage}.*'


def check_overrides(spec) -> Tuple[dict, ...]:
    """Validate ``spec.overrides`` (an :class:`AdapterSpec`); return them as a tuple of
    plain dicts. Called when the spec is made."""
    raw = spec.overrides
    if raw is None:
        return ()
    if isinstance(raw, (str, Mapping)) or not isinstance(raw, Sequence):
        raise ValueError('AdapterSpec: overrides must be a list of dicts such as '
                         "[dict(pattern='stages.3.*', gamma=8)]; got "
                         f'{type(raw).__name__}.')
    if raw and spec.method in ('full', 'bitfit'):
        raise ValueError(f"AdapterSpec: overrides with method={spec.method!r}: it "
                         'injects no adapter for an override to change; pick an adapter '
                         'method or drop the overrides.')
    known = {f.name for f in dataclasses.fields(spec)}
    settable = sorted(known - set(NOT_OVERRIDABLE))
    out = []
    for i, item in enumerate(raw):
        where = f'AdapterSpec.overrides[{i}]'
        if not isinstance(item, Mapping):
            raise ValueError(f'{where}: expected a dict such as dict(pattern=..., '
                             f'gamma=...), got {item!r}.')
        settings = dict(item)
        pattern = settings.pop('pattern', None)
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"{where}: needs pattern='...', a glob over the adapted "
                             "layers' names such as 'stages.3.*'; got keys "
                             f'{sorted(item)}.')
        where = f'{where} (pattern {pattern!r})'
        bad = sorted(k for k in settings if k not in known or k in NOT_OVERRIDABLE)
        if bad:
            raise ValueError(f'{where}: cannot set {bad}; an override sets any of '
                             f'{settable}.')
        if not settings:
            raise ValueError(f'{where}: sets nothing; give it a setting (gamma=..., '
                             "share_ratio=..., method='none'...).")
        method = settings.get('method', spec.method)
        if method not in (NO_ADAPTER, spec.method):
            raise ValueError(
                f"{where}: method={method!r}, but the spec's method is {spec.method!r}. "
                "An override can switch its layers off (method='none') or change "
                "the method's settings, not mix adapter methods.")
        # Validated like the global spec (with method='none', the other keys too),
        # and kept as the spec holds them (numpy scalars as Python values).
        values = {k: v for k, v in settings.items() if k != 'method'}
        try:
            checked = dataclasses.replace(spec, overrides=(), **values)
        except ValueError as err:
            raise ValueError(f'{where}: {err}') from None
        settings.update((k, getattr(checked, k)) for k in values)
        out.append(dict(settings, pattern=pattern))
    return tuple(out)


class LayerSpecs:
    """The spec each target of one ``inject_adapters`` call takes (first override that
    matches, else the global spec), with the checks of the module doc.

    Args:
        model (nn.Module): The model being adapted (for error messages).
        spec (AdapterSpec): The global spec, its overrides already validated.
    """

    def __init__(self, model: nn.Module, spec) -> None:
        self.model, self.spec = model, spec
        self.rules: List[Tuple[str, dict]] = [
            (o['pattern'], {k: v for k, v in o.items() if k != 'pattern'})
            for o in spec.overrides]
        self.specs = [None if s.get('method') == NO_ADAPTER
                      else dataclasses.replace(spec, overrides=(), **s)
                      for _, s in self.rules]
        self.hits = [0] * len(self.rules)
        # (first name of the target, index of the rule that took it)
        self.shadowed: List[List[Tuple[str, int]]] = [[] for _ in self.rules]
        # the keys the targets a rule took read, and what kind of targets they are
        self.read: List[set] = [set() for _ in self.rules]
        self.kinds: List[List[str]] = [[] for _ in self.rules]
        self.targets: List[str] = []

    # ------------------------------------------------------------ lookups
    def _match(self, names: Sequence[str]) -> Optional[int]:
        self.targets.extend(names)
        winner = None
        for i, (pattern, _) in enumerate(self.rules):
            if any(fnmatchcase(n, pattern) for n in names):
                if winner is None:
                    winner = i
                    self.hits[i] += 1
                else:
                    self.shadowed[i].append((names[0], winner))
        return winner

    def _resolve(self, names: Sequence[str], what: str, formula: str,
                 width: Optional[int], divisor: Callable, kind: str = '',
                 reads: Optional[Callable] = None):
        """The spec of one target; raises when its rank would be 0. ``divisor(spec)``
        gives ``(key, value)`` of the rank divisor, or None when nothing is built;
        ``reads(spec)`` the spec keys a target of this ``kind`` reads (None: any)."""
        index = self._match(names)
        spec = self.spec if index is None else self.specs[index]
        if index is not None:
            if kind and kind not in self.kinds[index]:
                self.kinds[index].append(kind)
            self.read[index] |= ({'method'} if spec is None else
                                 set(self.rules[index][1]) if reads is None
                                 else {'method'} | set(reads(spec)))
        if spec is None:
            return None
        key_value = divisor(spec)
        if width is None or key_value is None or width // key_value[1]:
            return spec
        key, value = key_value
        if index is None:
            origin = f"the spec's {key}={value}"
        elif key in self.rules[index][1]:
            origin = (f'{key}={value} from overrides[{index}] (pattern '
                      f'{self.rules[index][0]!r})')
        else:   # the override that matched leaves the key as the spec sets it
            origin = (f"the spec's {key}={value}; overrides[{index}] (pattern "
                      f'{self.rules[index][0]!r}), which takes these layers, does not '
                      f'set {key}')
        raise ValueError(
            f'{what}: {formula} = {width} // {value} = 0 ({origin}); change {key}: '
            f'use {key} <= {width} for these layers, e.g. with an override first in '
            f"the list, dict(pattern='{stage_glob(names[0])}', {key}={width}), or "
            "switch them off with dict(pattern=..., method='none').")

    def pair(self, n1: str, n2: str, widths: Tuple[int, int, int]):
        """Spec of the CoLoRA pair ``(n1, n2)`` mapping ``d -> d' -> d''``; None: no
        adapter."""
        n = min(widths)
        return self._resolve(
            (n1, n2), f'CoLoRA pair ({n1}, {n2}: {" -> ".join(map(str, widths))}), '
            f'block width n={n}', 'rank r = n // gamma', n,
            lambda s: ('gamma', s.rank_divisor), 'CoLoRA pairs',
            lambda s: ('gamma', 'share_ratio', 'partner_policy', 'train_path'))

    def spatial(self, name: str):
        """Spec of the spatial conv ``name`` (CoLoRA's branch or Conv-Adapter)."""
        module = self.model.get_submodule(name)
        if not isinstance(module, nn.Conv2d):    # the adapter itself refuses it
            return self._resolve((name,), name, '', None, lambda s: None)

        def reads(s):
            if s.method != 'colora':
                return _method_keys(s.method)
            if not s.spatial:
                return ('spatial',)
            # the branch's rank: spatial_gamma, or gamma while that is None
            return ('spatial', 'spatial_gamma', 'use_filter', 'filter_lambda') + (
                ('gamma',) if s.spatial_gamma is None else ())

        def divisor(s):
            if s.method != 'colora':
                return 'gamma', s.rank_divisor
            if not s.spatial:
                return None
            return ('spatial_gamma' if s.spatial_gamma is not None else 'gamma',
                    s.spatial_rank_divisor)
        c_in, c_out = module.in_channels, module.out_channels
        formula = ('Conv-Adapter width w = C_in // gamma' if self.spec.method ==
                   'conv_adapter' else 'spatial rank r = C_in // gamma')
        kind = ('Conv-Adapter layers' if self.spec.method == 'conv_adapter'
                else 'spatial branches')
        return self._resolve((name,), f'{name} ({c_in}->{c_out})', formula, c_in,
                             divisor, kind, reads)

    def pointwise(self, name: str):
        """Spec of the pointwise layer ``name`` (LoRA, PiSSA, HiRA)."""
        module = self.model.get_submodule(name)
        if isinstance(module, nn.Linear):
            c_in, c_out = module.in_features, module.out_features
        elif isinstance(module, nn.Conv2d):
            c_in, c_out = module.in_channels, module.out_channels
        else:                                    # the adapter itself refuses it
            return self._resolve((name,), name, '', None, lambda s: None)
        return self._resolve((name,), f'{name} ({c_in}->{c_out})',
                             'rank r = min(in, out) // gamma', min(c_in, c_out),
                             lambda s: ('gamma', s.rank_divisor), 'pointwise layers',
                             lambda s: _method_keys(s.method))

    # ------------------------------------------------------------ the end
    def finish(self, injected: Dict) -> Dict:
        """Check that every override took effect; return ``injected``."""
        for i, (pattern, _) in enumerate(self.rules):
            where = f'AdapterSpec.overrides[{i}] (pattern {pattern!r})'
            if self.hits[i]:
                unread = sorted(set(self.rules[i][1]) - self.read[i])
                if unread:
                    kinds = ' and '.join(self.kinds[i]) or 'layers'
                    hint = (' (a spatial branch takes its rank from spatial_gamma '
                            'where that is set, globally or here)'
                            if 'gamma' in unread and 'spatial branches' in self.kinds[i]
                            else '')
                    raise ValueError(
                        f'{where} sets {", ".join(unread)}, which the {kinds} it applies '
                        f'to do not read{hint}: it would change nothing. They read '
                        f'{", ".join(sorted(self.read[i] - {"method"})) or "nothing"}; '
                        'aim the pattern at the layers that read the setting, or drop '
                        'it.')
                continue
            if self.shadowed[i]:
                first = self.shadowed[i][0][1]
                raise ValueError(
                    f'{where} never applies: every layer it matches ('
                    f'{_sample([n for n, _ in self.shadowed[i]])}) is matched first by '
                    f'overrides[{first}] '
                    f'(pattern {self.rules[first][0]!r}); the first match wins, so put '
                    'the more specific pattern first.')
            raise ValueError(self._no_match(where, pattern))
        return injected

    def _no_match(self, where: str, pattern: str) -> str:
        msg = f'{where} matches no adapted layer of {type(self.model).__name__}'
        others = [n for n, _ in self.model.named_modules()
                  if n and fnmatchcase(n, pattern) and n not in self.targets]
        if others:
            msg += (f'; it matches {_sample(others)}, which carr'
                    f'{"ies" if len(others) == 1 else "y"} no adapter')
        if not self.targets:
            return msg + '.'
        return (f"{msg}. Patterns are globs over the adapted layers' names, such as "
                f'{_sample(_spread(self.targets), 6)}; '
                f'{stage_glob(self.targets[0])!r} selects a whole stage.')


def _method_keys(method: str) -> Tuple[str, ...]:
    """The spec keys every target of a one-kind method (LoRA, PiSSA, HiRA,
    Conv-Adapter) reads: what :func:`.inject.spec_keys_used` lists, less the keys that
    are not per-target settings."""
    from .inject import spec_keys_used          # inject imports this module
    return tuple(k for k in spec_keys_used(method) if k not in NOT_OVERRIDABLE)


def _spread(names: Sequence[str]) -> List[str]:
    """One name per stage, first and last layer of the first stage, in order."""
    seen, out = set(), []
    for name in names:
        stage = stage_of(name)
        if stage not in seen:
            seen.add(stage)
            out.append(name)
    return out or list(names)


def _sample(names: Sequence[str], limit: int = 3) -> str:
    names = list(dict.fromkeys(names))
    shown = ', '.join(repr(n) for n in names[:limit])
    return shown + (f' and {len(names) - limit} more' if len(names) > limit else '')


def all_or_nothing(inject: Callable) -> Callable:
    """Decorate an injection function ``f(model, ...)``: if it raises, every module of
    ``model`` gets back the children it had before the call, so a failed injection
    leaves the model exactly as it was (adapters never modify the wrapped weights)."""

    @functools.wraps(inject)
    def wrapper(model: nn.Module, *args, **kwargs):
        saved = [(m, dict(m._modules)) for m in model.modules()]
        try:
            return inject(model, *args, **kwargs)
        except BaseException:
            for module, children in saved:
                module._modules.clear()
                module._modules.update(children)
            raise
    return wrapper
