"""The adapter contract shared by every method in this package.

An :class:`AdaptedLayer` replaces a ``nn.Linear`` or ``nn.Conv2d`` in place. It keeps the
base layer's ``weight`` and ``bias`` under their original names, so checkpoints of the
plain model load into the adapted one unchanged, and it delegates the adaptation to a
strategy module, an :class:`Adapter`, stored under ``adapter_branch``.

An adapter answers a small contract:

* ``low_rank(layer)``: for an update of low rank, its thin factors ``(L, R)`` in the
  paper's orientation, ``dW = L R`` with ``L (in x k)`` and ``R (k x out)``, scalings
  included; ``None`` otherwise. A low-rank update trains on activations,
  ``y = base(x) + (x L) R``, or through the weight, ``y = x (W + L R)``: the layer picks
  the cheaper of the two for its shape and the number of tokens (:mod:`.paths`);
* ``delta_weight(layer)``: the weight update (PyTorch layout, ``(out, in)`` or
  ``(out, in, kh, kw)``), or ``None`` when the adapter is a parallel branch instead;
  ``adapted_weight(layer)``: the weight the weight path uses, ``W + dW`` by default;
* ``branch(layer, x)``: the output of a parallel branch, or ``None``;
* ``foldable``: whether the whole adaptation is a weight update that can be baked into
  the base weight, and ``fold_delta(layer)``, that update;
* ``has_independent_part``: whether ``fold_independent_(layer)`` folds anything (a
  layer-independent low-rank part; what ``MergeReinitHook`` folds and re-initialises);
* ``after_forward(layer, factors)``: called after every forward pass with the factors
  (or ``None``) that were applied;
* ``reset_from_weights(layer)``: re-derive state that depends on the base weights (partner
  snapshots, PiSSA's SVD) after a pretrained checkpoint has been loaded.

Precision: factors, scalings and deltas are computed in ``max(float32, parameter
dtype)`` (:func:`compute_dtype`) with autocast off, so float64 models stay float64 and
half-precision models still form their updates in float32. The products with the
activations (the frozen base op and ``(x L) R``) run in the autocast dtype when autocast
is on.

Every parameter or buffer of an adapter lives under a name component starting with
:data:`ADAPTER_PREFIX`; that prefix is the single rule for "what belongs to an adapter".
"""
from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Callable, Iterator, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .lowrank import (autocast_dtype, compiling, fused_inputs, linear_low_rank,
                      low_rank_product, producer_recipe)
from .paths import TRAIN_PATHS, prefer_activation_path

ADAPTER_PREFIX = 'adapter_'

BaseLayer = Union[nn.Linear, nn.Conv2d]


class NotFoldableError(RuntimeError):
    """Raised when an adapter that cannot be expressed as a weight update is merged."""


def is_adapter_name(name: str) -> bool:
    """Whether a parameter/buffer/module name belongs to an adapter."""
    return any(part.startswith(ADAPTER_PREFIX) for part in name.split('.'))


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """``max(float32, dtype of the tensors)``: the dtype adapter updates are formed in."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def no_autocast(device: torch.device):
    """A context in which autocast is off on ``device``."""
    return torch.autocast(device_type=device.type, enabled=False)


@contextlib.contextmanager
def exact_fp32():
    """A context in which CUDA matmuls and cuDNN convolutions run in full fp32, without
    TF32 (cuDNN's default on Ampere and newer GPUs: ~1e-4 relative), for comparisons at
    fp32 tolerances."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class Adapter(nn.Module):
    """Strategy interface. Subclasses override what applies to them."""

    #: A short method name, used in reports ("colora", "lora", ...).
    method: str = 'adapter'

    @property
    def foldable(self) -> bool:
        return False

    @property
    def has_independent_part(self) -> bool:
        """Whether :meth:`fold_independent_` folds anything. Default: no."""
        return False

    def low_rank(self, layer: 'AdaptedLayer') -> Optional[tuple]:
        """``(L, R)`` with ``dW = L R`` in paper orientation, or None."""
        return None

    def forward_factors(self, layer: 'AdaptedLayer') -> Optional[tuple]:
        """:meth:`low_rank` for the layer's forward pass, which may take them *fused*:
        without autograd history, with a rebuild whose ``grad_inputs`` its low-rank op
        takes instead (:mod:`.lowrank`); the layer asks the rebuild for the factors
        with their history (``rebuild.tracked()``) wherever it uses them otherwise."""
        return self.low_rank(layer)

    def delta_weight(self, layer: 'AdaptedLayer') -> Optional[torch.Tensor]:
        factors = self.low_rank(layer)
        if factors is None:
            return None
        return layer.delta_from_factors(*factors)

    def adapted_weight(self, layer: 'AdaptedLayer') -> Optional[torch.Tensor]:
        """The weight the weight path runs the base op with: ``W + dW``."""
        delta = self.delta_weight(layer)
        if delta is None:
            return None
        return layer.weight + delta.to(layer.weight.dtype)

    def before_load(self) -> None:
        """Called before a state dict loads into the layer (its base weight among the
        first): finish whatever reads the tensors the load replaces in place."""

    def branch(self, layer: 'AdaptedLayer', x: torch.Tensor,
               into: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """A parallel branch's output, added to the layer's, or None. ``into`` (the
        layer's output, free to change in place) lets a branch add itself there: it
        then returns ``into`` itself."""
        return None

    def fold_delta(self, layer: 'AdaptedLayer') -> torch.Tensor:
        """The weight update equivalent to this adapter (eval-mode semantics)."""
        if not self.foldable:
            raise NotFoldableError(
                f'{type(self).__name__} on {layer.describe()} is not a weight update '
                'and cannot be folded into the base weight; keep it as a branch.')
        delta = self.delta_weight(layer)
        assert delta is not None
        return delta

    def after_forward(self, layer: 'AdaptedLayer', factors: Optional[tuple]) -> None:
        """Called after every forward pass with the low-rank factors that were applied
        (None for an adapter without them)."""

    @torch.no_grad()
    def reset_from_weights(self, layer: 'AdaptedLayer') -> None:
        """Re-derive weight-dependent state once pretrained weights are loaded."""

    @torch.no_grad()
    def fold_independent_(self, layer: 'AdaptedLayer') -> list:
        """Fold the layer-independent low-rank part into the base weight and
        re-initialise it so that the output is unchanged. Returns the parameters that
        were re-initialised (their optimiser state should be reset). Default: nothing
        to fold."""
        return []


def keep_gradient_strides(module: nn.Module) -> None:
    """Give each trainable 2-D parameter of ``module`` with a dimension of size 1 (a
    rank-1 factor, ``d x 1`` or ``1 x d``) its gradient in the parameter's own strides.

    The gradient of such a factor often arrives as a slice or a transpose whose
    strides differ from the parameter's only along the size-1 dimension; PyTorch still
    counts it as contiguous, so autograd keeps it as it is, and DDP, which copies
    gradients into its buckets by stride, warns on every process ("Grad strides do not
    match bucket view strides"). A gradient hook copies it into the parameter's
    strides (``d`` floats, the values unchanged). Other parameters need none: where
    their gradient's strides differ, autograd copies it into the parameter's layout
    itself. A deep copy of the module drops the hooks (an :class:`AdaptedLayer` adds
    them back to its copies itself); calling this again adds them once."""
    for param in _restored_parameters(module):
        if param.requires_grad and param.dim() == 2 and 1 in param.shape and not any(
                getattr(hook, 'func', None) is _in_parameter_strides
                for hook in (param._backward_hooks or {}).values()):
            param.register_hook(functools.partial(_in_parameter_strides,
                                                  weakref.ref(param)))


def _restored_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    """``module.parameters()``, skipping the modules a deep copy or an unpickling has
    created but not filled yet: a pair reached through its second layer is restored
    after its first layer, and gives its own parameters their hooks itself
    (:meth:`.CoLoRAPair.__setstate__`)."""
    seen, visited, stack = set(), set(), [module]
    while stack:
        mod = stack.pop()
        state = vars(mod)
        if id(mod) in visited or '_parameters' not in state:
            continue
        visited.add(id(mod))
        for param in state['_parameters'].values():
            if param is not None and id(param) not in seen:
                seen.add(id(param))
                yield param
        stack.extend(m for m in reversed(list(state.get('_modules', {}).values()))
                     if m is not None)


def _in_parameter_strides(ref, grad: torch.Tensor) -> Optional[torch.Tensor]:
    param = ref()
    if (param is None or grad.layout != torch.strided or grad.shape != param.shape
            or grad.stride() == param.stride()):
        return None
    return torch.empty_strided(param.shape, param.stride(), dtype=grad.dtype,
                               device=grad.device).copy_(grad)


class AdaptedLayer(nn.Module):
    """A ``nn.Linear`` or ``nn.Conv2d`` with an adapter.

    Keeps ``weight`` and ``bias`` (the very same ``Parameter`` objects as the base layer)
    and the convolution's hyper-parameters, so that ``to_plain()`` gives back an
    upstream layer with identical state-dict keys.

    Args:
        base (nn.Linear | nn.Conv2d): The layer to adapt.
        make_adapter (callable): Builds the strategy from this (wrapped) layer, which
            gives it the shapes, stride and a name for its error messages.
        name (str): The module's qualified name, for error messages. Defaults to ''.
        train_path (str): How a low-rank update is applied: ``'activation'``
            (``base(x) + (x L) R``: no weight-sized tensor or gradient), ``'weight'``
            (``x (W + L R)``) or ``'auto'`` (per forward, the cheaper one for this
            layer's shape and the number of tokens, :func:`.paths.prefer_activation_path`).
            Both compute the same function. Defaults to 'auto'.
    """

    def __init__(self, base: BaseLayer, make_adapter: Callable[['AdaptedLayer'], Adapter],
                 name: str = '', train_path: str = 'auto') -> None:
        super().__init__()
        if isinstance(base, AdaptedLayer):
            raise ValueError(f'{name or "module"} already carries an adapter '
                             f'({base.adapter_branch.method}); inject once per layer.')
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise TypeError(f'{name or "module"}: adapters wrap nn.Linear or nn.Conv2d, '
                            f'got {type(base).__name__}.')
        self.layer_name = name
        self.is_conv = isinstance(base, nn.Conv2d)
        self.weight = base.weight
        self.bias = base.bias
        if self.is_conv:
            self.in_channels = base.in_channels
            self.out_channels = base.out_channels
            self.kernel_size = base.kernel_size
            self.stride = base.stride
            self.padding = base.padding
            self.dilation = base.dilation
            self.groups = base.groups
            self.padding_mode = base.padding_mode
            if base.padding_mode != 'zeros':
                raise ValueError(f'{self.describe()}: padding_mode={base.padding_mode!r} '
                                 'is not supported, only zero padding; leave this layer '
                                 'out of the targets.')
        else:
            self.in_channels = base.in_features
            self.out_channels = base.out_features
        if train_path not in TRAIN_PATHS:
            raise ValueError(f'{name or "module"}: train_path={train_path!r}; expected one '
                             f'of {TRAIN_PATHS}.')
        self.train_path = train_path
        #: The path the last forward pass took: 'activation', 'weight' or None (no
        #: low-rank update on this layer, or not run yet).
        self.last_path: Optional[str] = None
        self.merged = False
        self.adapter_branch = make_adapter(self)
        weight = base.weight
        if weight.device.type != 'meta':
            # where the layer is and in its precision: injecting into a float64 or a
            # CUDA model is injecting and then calling ``.to()`` on the model
            self.adapter_branch.to(device=weight.device, dtype=weight.dtype
                                   if weight.is_floating_point() else None)
        keep_gradient_strides(self.adapter_branch)
        # The delta baked in by merge(), kept so that unmerge() is exact even for
        # adapters whose delta depends on the base weight (HiRA).
        self._merged_delta: Optional[torch.Tensor] = None
        # Take the replaced layer's mode: injecting into a model already in eval mode must
        # not leave train-mode adapters behind (they would update partner buffers).
        self.train(base.training)

    def __setstate__(self, state: dict) -> None:
        # A deep copy or an unpickled module gets new parameters without their tensor
        # hooks (autograd does not copy them): give the rank-1 factors theirs again.
        super().__setstate__(state)
        keep_gradient_strides(self.adapter_branch)

    # ----------------------------------------------------------- checkpoints
    #: Under this name a layer merged in place (``merge()``) stores the update it baked
    #: into ``weight``: a checkpoint says whether its weight is merged, and restores
    #: the layer as it was (merged, and exactly unmergeable).
    MERGED_DELTA = ADAPTER_PREFIX + 'merged_delta'

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged and self._merged_delta is not None:
            delta = self._merged_delta
            destination[prefix + self.MERGED_DELTA] = delta if keep_vars else delta.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs) -> None:
        self.adapter_branch.before_load()
        key = prefix + self.MERGED_DELTA
        delta = state_dict.get(key)
        if delta is not None and tuple(delta.shape) != tuple(self.weight.shape):
            error_msgs.append(f'{self.describe()}: the checkpoint\'s {key} has shape '
                              f'{tuple(delta.shape)}, not the weight\'s; the checkpoint '
                              'is of another architecture.')
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
        if key in unexpected_keys:
            unexpected_keys.remove(key)
        if prefix + 'weight' in state_dict:
            # the checkpoint's weight is merged exactly when it carries the update
            if delta is not None:
                self._merged_delta = delta.detach().to(self.weight.device,
                                                       self.weight.dtype).clone()
            else:
                self._merged_delta = None
            self.merged = delta is not None
        elif self.merged:
            # the adapter is loaded without the weight: the update baked in is stale
            self.unmerge()

    # --------------------------------------------------------------- helpers
    @property
    def is_pointwise(self) -> bool:
        return (not self.is_conv) or (tuple(self.kernel_size) == (1, 1)
                                      and self.groups == 1)

    def describe(self) -> str:
        kind = 'Linear' if not self.is_conv else (
            f'Conv2d k={tuple(self.kernel_size)} groups={self.groups}')
        return (f'{self.layer_name or "<layer>"} ({kind}, '
                f'{self.in_channels}->{self.out_channels}, weight {tuple(self.weight.shape)})')

    def weight_matrix(self, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The PyTorch ``(out, in)`` matrix of a pointwise layer."""
        w = self.weight if weight is None else weight
        return w.reshape(w.shape[0], -1)

    def as_weight_shape(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.reshape(self.weight.shape)

    def delta_from_factors(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """``dW = L R`` (paper orientation) as this layer's weight-shaped update."""
        with no_autocast(left.device):
            return self.as_weight_shape((left @ right).t())

    def unmerged_weight(self) -> torch.Tensor:
        """The base weight without a merged update (``weight`` unless merged)."""
        if self.merged and self._merged_delta is not None:
            return self.weight - self._merged_delta
        return self.weight

    def base_forward(self, x: torch.Tensor,
                     weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        w = self.weight if weight is None else weight
        if self.is_conv:
            return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation,
                            self.groups)
        return F.linear(x, w, self.bias)

    # --------------------------------------------------------------- forward
    def tokens(self, x: torch.Tensor) -> int:
        """Positions the layer is applied at (rows of the GEMM)."""
        return x.numel() // max(self.in_channels, 1)

    def use_activation_path(self, x: torch.Tensor, rank: int) -> bool:
        if self.train_path != 'auto':
            return self.train_path == 'activation'
        if not self.is_pointwise:
            return False
        training = torch.is_grad_enabled() and self.training
        if training and not self.is_conv and producer_recipe(x) is not None:
            # keeps no copy of x (the weight path would keep x and W + dW): the
            # memory of the frozen layer, whatever the time model says
            return True
        return prefer_activation_path(self.tokens(x), self.in_channels, self.out_channels,
                                      rank, training, x.device.type)

    def low_rank_forward(self, x: torch.Tensor, left: torch.Tensor,
                         right: torch.Tensor, rebuild=None) -> torch.Tensor:
        """``(x L) R`` on this layer's input layout: the low-rank update applied to the
        activations. A 1x1 conv keeps its stride and padding (the zero padding gives zero
        rows, so base and update still add up to ``x (W + L R)``). ``rebuild``
        (:class:`.lowrank.FactorRebuild`) is taken by the channels-last op only."""
        autocast = autocast_dtype(x.device.type)
        if not self.is_conv:
            # the thin products run in the autocast dtype, else in the input's
            return low_rank_product(x, left, right, autocast or x.dtype, rebuild=rebuild)
        if autocast is None:
            left, right = left.to(x.dtype), right.to(x.dtype)
        k = left.shape[1]
        down = left.t().reshape(k, self.in_channels, 1, 1)
        up = right.t().reshape(self.out_channels, k, 1, 1)
        z = F.conv2d(x, down, None, self.stride, self.padding, self.dilation)
        return F.conv2d(z, up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_conv and x.dim() == 3:
            # an unbatched (C, H, W) map, which nn.Conv2d takes too
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if self.merged:
            return self.base_forward(x)
        width = (x.shape[-3] if x.dim() >= 3 else None) if self.is_conv else x.shape[-1]
        if width is not None and width != self.in_channels:
            # before the low-rank ops, whose matmul error would show their own shapes
            where = 'its channel dim' if self.is_conv else 'its last dim (features)'
            raise ValueError(f'{self.describe()}: input {tuple(x.shape)} has {width} '
                             f'in {where}; the layer takes {self.in_channels}. Feed it '
                             'what the upstream layer takes (the adapter does not change '
                             'the layer\'s shapes).')
        autocast = autocast_dtype(x.device.type)
        if autocast is None and x.dtype != self.weight.dtype:
            # what the upstream layer refuses too, whichever path this forward takes
            raise ValueError(f'{self.describe()}: input {tuple(x.shape)} is {x.dtype}, the '
                             f'weight {self.weight.dtype}; convert one to the other '
                             '(model.to(dtype) or x.to(dtype)), or run under '
                             'torch.autocast.')
        if self.is_conv and x.dtype == torch.float32 and autocast is not None:
            # One cast for the base convolution and the adapter's (the activation path's
            # down-projection, a spatial branch's): autocast would cast ``x`` for each
            # on its own, and each would save its own low-precision copy for backward.
            x = x.to(autocast)
        adapter = self.adapter_branch
        # fused factors only where a channels-last op may take them (a 1x1 conv and
        # the weight path need the factors with their history)
        fusable = not self.is_conv and self.train_path != 'weight'
        factors = adapter.forward_factors(self) if fusable else adapter.low_rank(self)
        activation = factors is not None and self.use_activation_path(x, factors[0].shape[1])
        if not activation and fused_inputs(getattr(factors, 'rebuild', None)):
            # 'auto' chose the weight path after all (a linear layer whose input no
            # producer recomputes, on many tokens): the factors with their history
            factors = factors.rebuild.tracked()
        if activation:
            # factors that can be formed again are not kept by the op (an adapter reads
            # ``factors.rebuild.taken`` in after_forward)
            rebuild = getattr(factors, 'rebuild', None)
            if not self.is_conv and not self.weight.requires_grad:
                # one op: the update accumulates into the base GEMM's output
                out = linear_low_rank(x, self.weight, self.bias, *factors,
                                      dtype=autocast or x.dtype, rebuild=rebuild)
            else:
                # out of place: F.linear's output can be a view, which an in-place
                # sum would make autograd copy back in the backward pass
                out = self.base_forward(x)
                out = out + self.low_rank_forward(x, *factors,
                                                  rebuild=rebuild).to(out.dtype)
            self.last_path = 'activation'
        else:
            if factors is not None:
                delta = self.delta_from_factors(*factors)
                weight = self.weight + delta.to(self.weight.dtype)
            else:
                weight = adapter.adapted_weight(self)
            out = self.base_forward(x, weight)
            self.last_path = None if weight is None else 'weight'
        # in place unless ``out`` is a view (or under torch.compile, which fuses it);
        # a branch may add itself into ``out`` and return it
        in_place = not (compiling() or out._is_view())
        extra = adapter.branch(self, x, into=out if in_place else None)
        if extra is not None and extra is not out:
            extra = extra.to(out.dtype)
            out = out.add_(extra) if in_place else out + extra
        adapter.after_forward(self, factors)
        return out

    # --------------------------------------------------------------- merge
    @property
    def foldable(self) -> bool:
        return self.adapter_branch.foldable

    @torch.no_grad()
    def get_delta_weight(self) -> torch.Tensor:
        """The update that :meth:`merge` adds to ``weight``, in eval-mode semantics."""
        return self.adapter_branch.fold_delta(self).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self, delta: Optional[torch.Tensor] = None) -> None:
        """Bake the adapter into ``weight`` (``delta``: its :meth:`get_delta_weight`,
        when already computed). Raises if already merged or not foldable."""
        if self.merged:
            raise RuntimeError(f'{self.describe()} is already merged; unmerge() first.')
        if delta is None:
            delta = self.get_delta_weight()
        self.weight.add_(delta)
        self._merged_delta = delta
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError(f'{self.describe()} is not merged.')
        self.weight.sub_(self._merged_delta)
        self._merged_delta = None
        self.merged = False

    def to_plain(self) -> BaseLayer:
        """The upstream layer with the current (merged) weights; adapter dropped."""
        if not self.merged:
            raise RuntimeError(f'{self.describe()}: merge() before to_plain(), or the '
                               'adaptation would be lost.')
        return self.base_view()

    def base_view(self) -> BaseLayer:
        """A plain ``nn.Linear``/``nn.Conv2d`` sharing this layer's ``weight`` and
        ``bias`` (the same ``Parameter`` objects), without the adapter."""
        if self.is_conv:
            plain = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size,
                              self.stride, self.padding, self.dilation, self.groups,
                              bias=self.bias is not None, device='meta')
        else:
            plain = nn.Linear(self.in_channels, self.out_channels,
                              bias=self.bias is not None, device='meta')
        plain.weight = self.weight
        plain.bias = self.bias
        plain.train(self.training)
        return plain

    def extra_repr(self) -> str:
        return f'{self.describe()}, merged={self.merged}'
