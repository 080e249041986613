r"""``(x L) R`` for a low-rank update on activations, with a backward pass that keeps
no copy of ``x`` when autograd already holds what ``x`` was computed from.

The factor gradient ``dL = x^T (dy R^T)`` needs the layer input ``x``. A frozen base
layer needs none (its weight gets no gradient), so a naive low-rank path would keep
one more activation per adapted layer: in a ConvNeXt block the LayerNorm output (``T
x C``) and the GELU output (``T x 4C``), about as much as full fine-tuning keeps. But
the op that produced ``x`` already saved its own input for its backward pass: GELU
keeps ``u`` (``x = gelu(u)``), LayerNorm keeps its input, mean and ``1/std``. Here the
backward recomputes ``x`` from those (an element-wise op on tensors that stay alive
anyway) instead of saving it; for any other producer ``x`` itself is saved (a ReLU
output, for one, is already kept by the ReLU, so that costs nothing extra either).

The recomputed ``x`` equals the forward one up to rounding (GELU: bit for bit;
LayerNorm: ``(x - mean) rstd w + b`` in another order than the fused kernel), so the
factor gradients agree with the plain autograd ones to float rounding.

For a frozen ``nn.Linear`` (ConvNeXt's pointwise layers) :func:`linear_low_rank` runs
base op and update as one op: ``z R`` accumulates into the base GEMM's output
(``addmm_``) and ``dz L^T`` into the input gradient ``dy W``, so the update adds no
output-sized tensor, no separate sum, and none of the copies autograd makes for an
in-place sum on ``F.linear``'s (view) output.

Both ops keep the thin products transposed, ``z^T = L^T x^T`` (``k x T``), and form
every product with the rank ``k`` as the GEMM's row count: CPU GEMMs run a ``k``-row
output several times faster than the same product as a ``k``-column one. Where ``x``
is recomputed and the layer widens (``d_in <= d_out``: the LayerNorm-fed first
pointwise layer of a ConvNeXt block) ``z^T`` is not kept either: the backward forms
it again from each recomputed piece of ``x`` (:func:`recomputes_z`). The pieces, a few
MiB each, are the CPU's (:func:`piece_bytes`); a GPU recomputes ``x`` whole.

The factors themselves are kept for the backward pass, except where they come as
:class:`Factors` with a :class:`FactorRebuild`: then the op keeps the rebuild (which
holds what the factors are formed from) and forms ``L`` and ``R`` again, bit for bit,
in its backward pass. CoLoRA's pairs on the CPU form their factors that way
(:func:`.up3x3.pair_side_factors`): none of a side's ``r (d_in + d_out)`` floats
lives from forward to backward. A rebuild with :attr:`grad_inputs` (a *fused* one,
:class:`.up3x3.PairSideRebuild`) comes with factors that have no autograd history:
the op takes those tensors (the pair's parameters) as inputs of its own and turns the
factors' gradients into theirs in its backward pass (``rebuild.input_grads``), so the
side's factors and the layer are one autograd node, not two.
"""
from __future__ import annotations

import itertools
import math
from contextlib import nullcontext
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

Recipe = Tuple[str, tuple, object]


class FactorRebuild:
    """Forms a low-rank update's factors ``(L, R)`` again, bit for bit, from
    ``tensors`` (what they were formed from and what lives on anyway: the parameters,
    e.g. CoLoRA's partner weights): ``form(*tensors)`` without a gradient,
    ``form_graph(*tensors)`` (where given) as the forward pass formed them, with their
    autograd history. ``checked`` (indices, default all) are the tensors whose in-place
    change makes the factors impossible to form again (:attr:`stale`).

    A low-rank op given one keeps it and its tensors (``save_for_backward``) instead of
    ``L`` and ``R`` (and sets :attr:`taken`); its backward pass forms them with
    :meth:`backward_factors` (with their history where that pass records a graph,
    ``create_graph=True``), hands them to :attr:`on_rebuilt` (``callback(L, R)``),
    where set, and drops the rebuild's own references to the tensors: after the
    backward pass a graph kept alive keeps none of them."""

    __slots__ = ('_form', '_form_graph', '_tensors', '_checked', '_versions', 'where',
                 'taken', 'on_rebuilt', '__weakref__')

    def __init__(self, form, tensors: tuple, form_graph=None, checked=None,
                 where: str = '') -> None:
        self._form, self._form_graph = form, form_graph
        self._tensors: Optional[tuple] = tuple(tensors)
        self._checked = tuple(range(len(self._tensors)) if checked is None else checked)
        self._versions = self._tensor_versions()
        self.where = where
        self.taken = False
        self.on_rebuilt = None

    def _tensor_versions(self) -> tuple:
        return tuple(self._tensors[i]._version for i in self._checked)

    @property
    def tensors(self) -> tuple:
        """The tensors the factors are formed from (empty once a backward pass formed
        them)."""
        return self._tensors or ()

    @property
    def stale(self) -> bool:
        """Whether the factors can no longer be formed here: a tensor they are formed
        from changed in place since, or a backward pass formed them already."""
        return self._tensors is None or self._tensor_versions() != self._versions

    def __call__(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(L, R)`` without a gradient, from the rebuild's own tensors."""
        if self.stale:
            raise RuntimeError(
                f'{self.where or "low-rank update"}: a tensor its factors were formed '
                'from (a parameter) was modified in place since they were formed, or a '
                'backward pass formed them already, so they cannot be formed again.')
        with torch.no_grad():
            left, right = self._form(*self._tensors)
        return left, right

    def backward_factors(self, tensors: tuple,
                         dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(L, R)`` in ``dtype`` (cast as the forward cast them) in an op's backward
        pass, from the op's saved ``tensors`` (autograd checked their versions); the
        uncast ones, detached, go to :attr:`on_rebuilt`."""
        if torch.is_grad_enabled() and self._form_graph is not None:
            left, right = self._form_graph(*tensors)
        else:
            with torch.no_grad():
                left, right = self._form(*tensors)
        if self.on_rebuilt is not None:
            self.on_rebuilt(left.detach(), right.detach())
        self._tensors = None
        return left.to(dtype), right.to(dtype)


class Factors(tuple):
    """``(L, R)`` of a low-rank update, ``dW = L R``, with an optional :attr:`rebuild`
    (:class:`FactorRebuild`) that forms them again: a plain pair of tensors
    otherwise."""

    def __new__(cls, left: torch.Tensor, right: torch.Tensor,
                rebuild: Optional[FactorRebuild] = None) -> 'Factors':
        self = super().__new__(cls, (left, right))
        self.rebuild = rebuild
        return self


def compiling() -> bool:
    """Whether TorchDynamo is tracing (``torch.compile``): autograd's graph and a tensor's
    views are not visible there, and AOTAutograd chooses what to recompute itself."""
    compiler = getattr(torch, 'compiler', None)
    return bool(compiler is not None and getattr(compiler, 'is_compiling', lambda: False)())


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype in effect on ``device_type`` (``'cuda'``, ``'cpu'``, ...), or
    None where autocast is off there. torch >= 2.4 takes the device type; older releases
    (``setup.py`` admits 2.1) have one query per device."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):
        if device_type == 'cuda':
            return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
        if device_type == 'cpu':
            return (torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled()
                    else None)
        return None


def producer_recipe(x: torch.Tensor) -> Optional[Recipe]:
    """How to recompute ``x`` from tensors its producer saved for backward, or None
    (always None under ``torch.compile``, which reads no ``grad_fn``)."""
    if compiling():
        return None
    fn = x.grad_fn
    if fn is None or x.output_nr != 0:
        return None
    kind = type(fn).__name__
    try:
        if kind == 'GeluBackward0':
            u = fn._saved_self
            if u.shape == x.shape:
                return 'gelu', (u,), fn._saved_approximate
        elif kind == 'NativeLayerNormBackward0':
            inp = fn._saved_input
            if inp.shape == x.shape:
                return 'layer_norm', (inp, fn._saved_result1, fn._saved_result2,
                                      fn._saved_weight, fn._saved_bias), None
    except RuntimeError:     # saved tensors already freed or hooked: keep x itself
        return None
    return None


@torch.no_grad()
def recompute(recipe: Recipe, dtype: torch.dtype, index: tuple = ()) -> torch.Tensor:
    """``x`` (or the part ``x[index]``, ``index`` over its leading axes), contiguous."""
    kind, tensors, extra = recipe
    if kind == 'gelu':
        x = F.gelu(tensors[0][index], approximate=extra)
    else:
        inp, mean, rstd, weight, bias = tensors
        inp, mean, rstd = inp[index], mean[index], rstd[index]
        # into a contiguous buffer: LayerNorm's input is often a permuted view
        # (ConvNeXt's channels-last), and the factor gradient needs x as a matrix
        x = torch.empty(inp.shape, dtype=inp.dtype, device=inp.device)
        torch.sub(inp, mean, out=x).mul_(rstd)
        if weight is not None:
            x.mul_(weight)
        if bias is not None:
            x.add_(bias)
    return x.to(dtype)


#: Bytes of recomputed input per piece of the factor gradient on the CPU: small enough
#: for the piece to stay in cache between being recomputed and being multiplied.
RECOMPUTE_PIECE_BYTES = 1 << 22


def piece_bytes(device_type: str) -> Optional[int]:
    """Bytes per recomputed piece on ``device_type``, or None for ``x`` whole. Pieces
    serve the CPU's caches and keep the heap from holding a full-size recomputed input;
    a GPU's GEMMs do not run from the last-level cache that way, its caching allocator
    reuses the block, and each piece would cost 2-7 more kernel launches (the
    recompute's element-wise ops and one or two thin GEMMs)."""
    return RECOMPUTE_PIECE_BYTES if device_type == 'cpu' else None


def _pieces(recipe: Recipe, shape: torch.Size, itemsize: int, device_type: str = 'cpu'):
    """``(index, first_row, end_row)`` cutting ``x`` (``shape``) into pieces of
    :func:`piece_bytes` along its leading axes (one piece where that is None), each a
    contiguous range of the flattened rows. Only axes the recipe can slice are cut (not
    LayerNorm's normalised axes)."""
    lead = list(shape[:-1])
    limit = piece_bytes(device_type)
    if limit is None:
        yield (), 0, math.prod(lead)
        return
    cut = len(lead)
    if recipe[0] == 'layer_norm':
        mean = recipe[1][1]
        cut = 0
        while cut < len(lead) and mean.shape[cut] == lead[cut]:
            cut += 1
    max_rows = max(1, limit // max(1, shape[-1] * itemsize))
    # the axis to step along: the first one whose inner rows fit in a piece
    axis, inner = 0, math.prod(lead)
    while axis < cut and inner > max_rows:
        inner //= lead[axis]
        axis += 1
    if axis == 0:
        yield (), 0, math.prod(lead)
        return
    axis -= 1
    inner = math.prod(lead[axis + 1:])
    step = max(1, max_rows // max(1, inner))
    for outer in itertools.product(*(range(n) for n in lead[:axis])):
        base = 0
        for i, n in zip(outer, lead[:axis]):
            base = base * n + i
        for a in range(0, lead[axis], step):
            b = min(a + step, lead[axis])
            first = (base * lead[axis] + a) * inner
            yield outer + (slice(a, b),), first, first + (b - a) * inner


def recomputes_z(recipe: Optional[Recipe], d_in: int, d_out: int) -> bool:
    """Whether the backward pass recomputes ``z = x L`` as well as ``x`` instead of
    keeping ``z^T``: where ``x`` is recomputed and the layer widens (``d_in <= d_out``,
    ConvNeXt's first pointwise layer). There the recompute costs ``T k d_in``
    multiply-adds, at most a sixth of what the thin GEMMs already cost, for ``T k``
    fewer floats kept; on a narrowing layer (the second pointwise one, ``4C -> C``) it
    would cost 5-8% of the layer's forward + backward time, and ``z^T`` is kept."""
    return recipe is not None and d_in <= d_out


def _factor_gradients(ctx, g: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                      zt: Optional[torch.Tensor], kept: list, need_left: bool,
                      need_right: bool) -> tuple:
    """``(dz^T, dL, dR)`` from the output gradient ``g`` (2-D): ``dz^T = R g^T``,
    ``dR = z^T g`` and ``dL = (dz^T x)^T``; a gradient not needed is None. ``x`` is
    ``kept[0]``, or recomputed piece by piece (``ctx`` holds the recipe and ``x``'s
    shape and dtype), each piece multiplied while it is still in cache; ``z^T`` is
    ``zt``, or (None) recomputed from the same pieces (``L^T x^T``, ``k`` rows each)."""
    gzt = right @ g.t()
    grad_right = zt @ g if need_right and zt is not None else None
    if kept:
        x = kept[0]
        grad_left = (gzt @ x.reshape(-1, x.shape[-1])).t() if need_left else None
        return gzt, grad_left, grad_right
    need_z = need_right and zt is None
    grad_left_t = None
    if need_left or need_z:
        shape, dtype = ctx.x_shape, ctx.x_dtype
        left_t = left.t()
        for index, first, end in _pieces(ctx.recipe, shape, torch.finfo(dtype).bits // 8,
                                         g.device.type):
            piece = recompute(ctx.recipe, dtype, index).reshape(-1, shape[-1])
            if need_left:
                part = gzt[:, first:end]
                grad_left_t = (part @ piece if grad_left_t is None
                               else grad_left_t.addmm_(part, piece))
            if need_z:
                zt_piece = left_t @ piece.t()
                rows = g[first:end]
                grad_right = (zt_piece @ rows if grad_right is None
                              else grad_right.addmm_(zt_piece, rows))
    return gzt, None if grad_left_t is None else grad_left_t.t(), grad_right


def fused_inputs(rebuild: Optional[FactorRebuild]) -> tuple:
    """The tensors a fused rebuild's factors are differentiated by (the op's extra
    inputs), or ``()``."""
    return tuple(getattr(rebuild, 'grad_inputs', ())) if rebuild is not None else ()


def _fused_grads(ctx, grad_left: Optional[torch.Tensor],
                 grad_right: Optional[torch.Tensor], first: int) -> tuple:
    """The gradients of a fused rebuild's inputs (the op's inputs from ``first`` on)
    from those of the factors; ``()`` without one."""
    n = ctx.n_fused
    if not n:
        return ()
    needs = ctx.needs_input_grad[first:first + n]
    rebuild = ctx.rebuild
    if torch.is_grad_enabled():
        # a backward pass that records a graph (create_graph=True) formed the factors
        # with their history; the parameters' gradients would need the pair node's
        # second derivative, which it does not have
        if any(needs) and _engine_runs(ctx, n):
            raise RuntimeError('colora_mm pair factors: the CPU op has no second '
                               'derivative; set COLORA_MM_UP3X3=conv for '
                               'create_graph=True')
        return (None,) * n
    if not any(needs):
        rebuild.input_grads(None, None)
        return (None,) * n
    grads = rebuild.input_grads(grad_left, grad_right)
    return tuple(g if need else None for g, need in zip(grads, needs))


def _engine_runs(ctx, n: int) -> bool:
    """Whether this backward pass goes on past the op's last ``n`` inputs (a pass
    asked only for other gradients, ``torch.autograd.grad(..., inputs)``, does not)."""
    will_run = getattr(torch._C, '_will_engine_execute_node', None)
    if will_run is None:
        return True
    return any(fn is not None and will_run(fn) for fn, _ in ctx.next_functions[-n:])


def _save(ctx, fixed: tuple, zt: torch.Tensor, x: torch.Tensor,
          recipe: Optional[Recipe], left: torch.Tensor, right: torch.Tensor,
          rebuild: Optional[FactorRebuild]) -> None:
    """Save ``fixed``, then the factors ``left`` and ``right`` (``k x d_out``) unless
    ``rebuild`` forms them again (its tensors saved instead, the rebuild marked taken),
    and, for the factor
    gradients: ``z^T`` and ``x`` (no recipe), ``z^T`` (``x`` recomputed), or neither
    (both recomputed, :func:`recomputes_z`)."""
    ctx.recipe = recipe
    ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
    ctx.z_kept = not recomputes_z(recipe, x.shape[-1], right.shape[1])
    ctx.rebuild, ctx.factor_dtype = rebuild, right.dtype
    ctx.n_fused = len(fused_inputs(rebuild))
    if rebuild is None:
        fixed = fixed + (left, right)
        ctx.n_rebuild = 0
    else:
        rebuild.taken = True
        ctx.n_rebuild = len(rebuild.tensors)
        fixed = fixed + rebuild.tensors
    ctx.n_fixed = len(fixed)
    if recipe is None:
        ctx.save_for_backward(*fixed, zt, x)
    elif ctx.z_kept:
        ctx.save_for_backward(*fixed, zt)
    else:
        ctx.save_for_backward(*fixed)


def _saved(ctx) -> tuple:
    """``(fixed, (left, right), zt or None, kept)`` from what :func:`_save` saved, the
    factors formed again where a rebuild was kept."""
    saved = ctx.saved_tensors
    fixed, rest = saved[:ctx.n_fixed], saved[ctx.n_fixed:]
    if ctx.rebuild is None:
        fixed, factors = fixed[:-2], fixed[-2:]
    else:
        cut = len(fixed) - ctx.n_rebuild
        fixed, factors = fixed[:cut], ctx.rebuild.backward_factors(fixed[cut:],
                                                                   ctx.factor_dtype)
    zt = rest[0] if ctx.z_kept else None
    return fixed, factors, zt, list(rest[1:] if ctx.z_kept else rest)


class LowRankProduct(torch.autograd.Function):
    """``(x @ left) @ right`` over the last axis of ``x``; see the module doc."""

    @staticmethod
    def forward(ctx, x, left, right, recipe, rebuild, *grad_inputs):
        x2 = x.reshape(-1, x.shape[-1])
        zt = left.t() @ x2.t()
        out = zt.t() @ right
        _save(ctx, (), zt, x, recipe, left, right, rebuild)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        _, (left, right), zt, kept = _saved(ctx)
        g = grad.reshape(-1, grad.shape[-1]).to(right.dtype)
        need = _need_factor_grads(ctx, 1, 5)
        gzt, grad_left, grad_right = _factor_gradients(ctx, g, left, right, zt, kept, *need)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (gzt.t() @ left.t()).reshape(ctx.x_shape)
        fused = _fused_grads(ctx, grad_left, grad_right, 5)
        if fused:
            grad_left = grad_right = None
        return (grad_x, grad_left, grad_right, None, None) + fused


def _need_factor_grads(ctx, first: int, fused_first: int) -> Tuple[bool, bool]:
    """Whether the backward pass needs ``(dL, dR)``: for the factors themselves
    (inputs ``first``, ``first + 1``) or for a fused rebuild's inputs (from
    ``fused_first`` on, which need both)."""
    if ctx.n_fused and any(ctx.needs_input_grad[fused_first:fused_first + ctx.n_fused]):
        return True, True
    return ctx.needs_input_grad[first], ctx.needs_input_grad[first + 1]


def low_rank_product(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                     dtype: Optional[torch.dtype] = None,
                     rebuild: Optional[FactorRebuild] = None) -> torch.Tensor:
    """``(x L) R`` with all three cast to ``dtype`` (default: ``x``'s). The recipe is
    read from ``x`` before the cast, so a cast copy is not kept either; ``rebuild``
    (:class:`FactorRebuild` of ``L`` and ``R``), where given, is kept instead of the
    factors."""
    dtype = dtype or x.dtype
    extra = fused_inputs(rebuild)
    factor_grad = left.requires_grad or any(t.requires_grad for t in extra)
    grad = torch.is_grad_enabled() and (x.requires_grad or factor_grad
                                        or right.requires_grad)
    recipe = producer_recipe(x) if grad and factor_grad else None
    x, left, right = x.to(dtype), left.to(dtype), right.to(dtype)
    if not grad or compiling():    # compiled: AOTAutograd derives and fuses the backward
        return (x @ left) @ right
    return LowRankProduct.apply(x, left, right, recipe, rebuild, *extra)


def _linear_low_rank(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     left: torch.Tensor, right: torch.Tensor) -> tuple:
    """``(x W^T + b + z R, z^T)`` with ``z = x L``: two GEMMs into one output."""
    zt = left.t() @ x2.t()
    out = (torch.addmm(bias, x2, weight.t()) if bias is not None
           else x2 @ weight.t())
    return out.addmm_(zt.t(), right), zt


class LinearLowRank(torch.autograd.Function):
    """``x W^T + b + (x L) R`` for a frozen ``W`` on 2-D ``x``, as one op: the update
    is accumulated into the base GEMM's output (and the input gradient
    ``dy W + (dy R^T) L^T`` into one buffer), so no output-sized intermediate, sum or
    in-place copy is formed. ``x`` is recomputed as in :class:`LowRankProduct` when its
    producer allows. ``weight`` may be of another dtype than ``x2`` (the frozen float32
    weight under autocast): the op casts it for the GEMM and keeps the weight itself,
    casting it again in backward, so that no low-precision copy of a weight-sized
    tensor lives from forward to backward (autocast's own cast, which ``F.linear``
    would keep, is one per layer); in ``x2``'s dtype the cast is the weight itself."""

    @staticmethod
    def forward(ctx, x2, weight, bias, left, right, recipe, x_shape, rebuild, *grad_inputs):
        out, zt = _linear_low_rank(x2, weight.to(x2.dtype), bias, left, right)
        ctx.has_bias = bias is not None
        _save(ctx, (weight,), zt, x2, recipe, left, right, rebuild)
        ctx.x_shape = x_shape
        return out

    @staticmethod
    def backward(ctx, g):
        (weight,), (left, right), zt, kept = _saved(ctx)
        g = g.to(right.dtype)
        need = _need_factor_grads(ctx, 3, 8)
        gzt, grad_left, grad_right = _factor_gradients(ctx, g, left, right, zt, kept, *need)
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            # cast as forward cast it: the same values it multiplied with
            grad_x = (g @ weight.to(right.dtype)).addmm_(gzt.t(), left.t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        fused = _fused_grads(ctx, grad_left, grad_right, 8)
        if fused:
            grad_left = grad_right = None
        return (grad_x, None, grad_bias, grad_left, grad_right, None, None, None) + fused


def linear_low_rank(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    left: torch.Tensor, right: torch.Tensor,
                    dtype: Optional[torch.dtype] = None,
                    rebuild: Optional[FactorRebuild] = None) -> torch.Tensor:
    """``F.linear(x, W, b) + (x L) R`` for a frozen ``W`` (``weight`` must not require a
    gradient), all in ``dtype`` (default: ``x``'s; under autocast pass its dtype: the
    op runs with autocast off on tensors cast to it); ``rebuild`` as in
    :func:`low_rank_product`."""
    if weight.requires_grad:
        raise ValueError('linear_low_rank: the base weight must be frozen '
                         '(requires_grad=False); use F.linear + low_rank_product.')
    dtype = dtype or x.dtype
    extra = fused_inputs(rebuild)
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, bias, left, right, *extra))
    factor_grad = left.requires_grad or any(t.requires_grad for t in extra)
    recipe = producer_recipe(x) if grad and factor_grad else None
    autocast = autocast_dtype(x.device.type) is not None
    ctx = torch.autocast(x.device.type, enabled=False) if autocast else nullcontext()
    with ctx:
        x, left, right = (t.to(dtype) for t in (x, left, right))
        bias = bias.to(dtype) if bias is not None else None
        x2 = x.reshape(-1, x.shape[-1])
        if grad and compiling():   # AOTAutograd derives and fuses the backward itself
            out = F.linear(x2, weight.to(dtype), bias) + (x2 @ left) @ right
        elif grad:
            # the frozen weight goes in uncast: the op keeps it, not a cast copy
            out = LinearLowRank.apply(x2, weight, bias, left, right, recipe, x.shape,
                                      rebuild, *extra)
        else:
            out, _ = _linear_low_rank(x2, weight.to(dtype), bias, left, right)
        return out.view(*x.shape[:-1], out.shape[-1])
