r"""CoLoRA's correlated low-rank pair (Eqs. 14-15 of the CoLoRA paper).

Two chained pointwise layers ``X -> X W1 -> (X W1) W2`` with ``W1 (d x d')`` and
``W2 (d' x d'')`` in the paper's notation (PyTorch stores the transposes,
``weight1 (d' x d)`` and ``weight2 (d'' x d')``) are adapted jointly::

    W1' = W1 + s1 A1 B1 + s  As (Bs W2^T)          (14)
    W2' = W2 + s2 A2 B2 + s  (W1^T As) Bs          (15)

``A1 (d x rl)``, ``B1 (rl x d')``, ``A2 (d' x rl)``, ``B2 (rl x d'')`` are each layer's
own low-rank update; ``As (d x rs)``, ``Bs (rs x d'')`` are shared by both layers and
couple their updates. With ``n = min(d, d', d'')``: ``r = n // gamma``,
``rs = floor(r * share_ratio)``, ``rl = r - rs``; trainable count
``r (d + d'') + 2 rl d'``.

Scalings follow the paper's Lemma 3.1 (``Var[A A^T] ~ r sigma_A^4``) and are recomputed
from the current parameters at every forward pass::

    s_i = 1 / (sqrt(rl) * (std(A_i) + std(B_i)))
    s   = 1 / ((rs * n)^(1/4) * (std(Bs W2^T) + std(As)))      in W1'
    s   = 1 / ((rs * n)^(1/4) * (std(W1^T As) + std(Bs)))      in W2'

The partner weights (``W2`` inside Eq. 14, ``W1`` inside Eq. 15) are the partner layer's
base weight plus a low-rank offset kept in persistent buffers, ``P = W + L R``, never a
full copy. ``'frozen'``: the offset is empty, the partner is the base weight (a fold of
the independent part into the base, :meth:`CoLoRAPairLayer.fold_independent_`, records
its negative so the partner does not move). ``'effective'``: after every training-mode
forward pass the offset takes the detached factors that pass formed, so the next pass
sees ``W + dW`` of this one (``r (d_in + d_out)`` floats per side). Evaluation never
changes them. A training pass that runs inside a backward pass (activation
checkpointing recomputing it, after the partners moved on) is refused.

Where a side's factors come from the CPU's C++ node and its layer runs the activation
path on channels-last features (``nn.Linear``: ConvNeXt's pointwise layers), the side
is formed without a node of its own and the layer's low-rank op takes the pair's
parameters as its inputs (:class:`.up3x3.PairSideRebuild`): one autograd node per
adapted layer, the same values and gradients bit for bit. The low-rank op keeps none
of the factors (:class:`.lowrank.FactorRebuild`), and
neither does the offset until the backward pass: that op forms them again there, bit
for bit, and the offset takes them (a step never holds two generations of offsets at
its peak, the ones its forward pass reads and the ones it forms). Reading an offset
before then (a second forward pass before the backward one), saving or loading the
state dict (into the pair or into either of its layers, whose base weights the pending
offsets are formed from), moving, copying or folding the pair, or an
``optimizer.step()`` that updates the pair forms the pending ones first (from the
tensors that pass read; where they were changed in place outside a step, the previous
offsets stay, with a warning).

Precision: the factors, the scalings (their stds) and the partner products
``Bs W2^T`` / ``W1^T As`` are formed in ``max(float32, parameter dtype)`` with autocast
off; the products with the activations run in the autocast dtype.
"""
from __future__ import annotations

import math
import threading
import warnings
import weakref
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .base import (AdaptedLayer, Adapter, compute_dtype, keep_gradient_strides,
                   no_autocast)
from .lowrank import FactorRebuild, compiling
from .init import init_a_
from .scaling import plain_scaled, scaled_columns
from .up3x3 import pair_side_factors, pair_side_kernel_applies

PARTNER_POLICIES = ('effective', 'frozen')
#: Buffer names of the partner offsets, ``partner_i = base_i + L_i R_i``.
OFFSET_NAMES = (('partner_l1', 'partner_r1'), ('partner_l2', 'partner_r2'))
#: Full partner copies of an earlier storage layout, converted on load.
LEGACY_PARTNER_NAMES = ('partner_w1', 'partner_w2')


#: Pairs with partner offsets left to a backward pass (:meth:`CoLoRAPair.settle`), and
#: the lock of that set (models may train in several threads).
_UNSETTLED: 'weakref.WeakSet[CoLoRAPair]' = weakref.WeakSet()
_UNSETTLED_LOCK = threading.Lock()


def _unsettled(pair: 'CoLoRAPair', add: bool) -> None:
    with _UNSETTLED_LOCK:
        if add:
            _UNSETTLED.add(pair)
        else:
            _UNSETTLED.discard(pair)


def _in_backward() -> bool:
    """Whether this thread is running an autograd backward pass (a graph task)."""
    graph_task = getattr(torch._C, '_current_graph_task_id', None)
    return graph_task is not None and graph_task() != -1


def _settle_before_step(optimizer, args, kwargs) -> None:
    """Before an ``optimizer.step()``: form the partner offsets a training forward pass
    left to a backward pass that did not form them (one that never ran, or did not reach
    the pair's layers), of the pairs whose parameters the optimizer updates, while the
    parameters are still the ones that pass used. After a backward pass there are none:
    the step pays for nothing."""
    if not len(_UNSETTLED):
        return
    with _UNSETTLED_LOCK:
        pairs = list(_UNSETTLED)
    updated = {id(p) for group in optimizer.param_groups for p in group['params']}
    for pair in pairs:
        if any(id(p) in updated for p in pair.parameters()):
            pair.settle()


register_optimizer_step_pre_hook(_settle_before_step)


def _adopter(pair: 'CoLoRAPair', index: int, rebuild: FactorRebuild):
    """``callback(L, R)`` for a rebuild's :attr:`~.lowrank.FactorRebuild.on_rebuilt`:
    the factors a backward pass formed again become side ``index``'s partner offset
    (weak references: the callback keeps neither the pair nor the rebuild alive)."""
    pair_ref, rebuild_ref = weakref.ref(pair), weakref.ref(rebuild)

    def adopt(left: torch.Tensor, right: torch.Tensor) -> None:
        owner, source = pair_ref(), rebuild_ref()
        if owner is not None and source is not None:
            owner._adopt(index, source, left, right)
    return adopt


def state_dict_differences(own: dict, state: dict) -> tuple:
    """``(missing, unexpected, reshaped)`` between a model's state dict (``own``)
    and a checkpoint's, up to what loading adapts: a CoLoRA pair's partner offsets
    take the checkpoint's inner width (a model built fresh has none, a trained one
    has ``r``), and the full partner copies of the earlier layout convert to offsets.
    ``missing`` and ``unexpected`` are sets of names, ``reshaped`` the names both have
    with other shapes."""
    offsets = tuple(n for pair in OFFSET_NAMES for n in pair)
    missing = set(own) - set(state)
    unexpected = set(state) - set(own)
    legacy = {k for k in unexpected if k.rsplit('.', 1)[-1] in LEGACY_PARTNER_NAMES}
    prefixes = {k.rsplit('.', 1)[0] for k in legacy}
    missing = {k for k in missing if not (k.rsplit('.', 1)[-1] in offsets
                                          and k.rsplit('.', 1)[0] in prefixes)}
    unexpected -= legacy
    reshaped = sorted(k for k in set(own) & set(state)
                      if tuple(state[k].shape) != tuple(own[k].shape)
                      and k.rsplit('.', 1)[-1] not in offsets)
    return missing, unexpected, reshaped


def pair_ranks(n: int, gamma: int, share_ratio: float, where: str = '') -> tuple:
    """``(r, rs, rl)`` for a block of width ``n``; raises on an empty adapter."""
    if isinstance(share_ratio, bool) or not isinstance(share_ratio, (int, float)) \
            or not 0.0 <= share_ratio <= 1.0:
        raise ValueError(f'{where}: share_ratio={share_ratio!r} must lie in [0, 1] '
                         '(the fraction of the rank shared by the pair).')
    if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma <= 0:
        raise ValueError(f'{where}: gamma={gamma!r} must be a positive integer.')
    r = n // gamma
    if r == 0:
        raise ValueError(f'{where}: rank r = n // gamma = {n} // {gamma} = 0 for block '
                         f'width n={n}; use gamma <= {n}.')
    # floor(r * share_ratio) of the ratio meant: in binary floating point 90 * 0.7 is
    # 62.99..., which is 63 here (a product within 1e-9 below an integer is that
    # integer; no ratio of up to eight decimals lands that close otherwise)
    rs = math.floor(r * share_ratio + 1e-9)
    return r, rs, r - rs


@torch.no_grad()
def compact_factors(left: torch.Tensor, right: torch.Tensor,
                    tol: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(L', R')`` with ``L' R' = L R`` and the inner width cut to the numerical rank
    of the product (SVD in float64; singular values up to ``tol``, by default the
    factors' rounding level of the largest one, are dropped)."""
    product = left.double() @ right.double()
    u, s, vh = torch.linalg.svd(product, full_matrices=False)
    if s.numel() == 0 or s[0] == 0:
        return left.new_zeros(left.shape[0], 0), right.new_zeros(0, right.shape[1])
    if tol is None:
        tol = s[0] * max(product.shape) * torch.finfo(left.dtype).eps
    k = int((s > tol).sum())
    root = s[:k].sqrt()
    return ((u[:, :k] * root).to(left.dtype).contiguous(),
            (root[:, None] * vh[:k]).to(right.dtype).contiguous())


class CoLoRAPair(nn.Module):
    """Parameters and partner offsets of one correlated pair (paper orientation).

    Args:
        d (int): Input width of the first layer.
        d_mid (int): Output width of the first layer = input width of the second.
        d_out (int): Output width of the second layer.
        gamma (int): Rank divisor, ``r = min(d, d_mid, d_out) // gamma``.
            Defaults to 16.
        share_ratio (float): Fraction of ``r`` given to the shared part.
            Defaults to 0.5.
        partner_policy (str): ``'effective'`` or ``'frozen'``. Defaults to
            ``'effective'``.
        where (str): Names of the two layers, for error messages. Defaults to ''.
    """

    def __init__(self, d: int, d_mid: int, d_out: int, gamma: int = 16,
                 share_ratio: float = 0.5, partner_policy: str = 'effective',
                 where: str = '') -> None:
        super().__init__()
        if partner_policy not in PARTNER_POLICIES:
            raise ValueError(f'{where}: partner_policy={partner_policy!r}; expected one '
                             f'of {PARTNER_POLICIES}.')
        self.d, self.d_mid, self.d_out = d, d_mid, d_out
        self.n = min(d, d_mid, d_out)
        self.r, self.rs, self.rl = pair_ranks(self.n, gamma, share_ratio, where)
        self.gamma, self.share_ratio = gamma, share_ratio
        self.partner_policy = partner_policy
        self.where = where
        rl, rs = self.rl, self.rs
        # An empty part (share_ratio 0 or 1) has no parameters at all: a zero-size
        # parameter would never receive a gradient (and stop DDP).
        self._new_param('A1', (d, rl), rl)
        self._new_param('B1', (rl, d_mid), rl)
        self._new_param('A2', (d_mid, rl), rl)
        self._new_param('B2', (rl, d_out), rl)
        self._new_param('As', (d, rs), rs)
        self._new_param('Bs', (rs, d_out), rs)
        # Partner offsets in paper orientation, empty at first: partner_i = base_i.
        for (lname, rname), (din, dout) in zip(OFFSET_NAMES, self.side_shapes()):
            self.register_buffer(lname, torch.zeros(din, 0))
            self.register_buffer(rname, torch.zeros(0, dout))
        # The two adapted layers (set by CoLoRAPairLayer; plain attributes, so the
        # module tree has no cycle). A pair on its own has zero base weights.
        self._layers: List[Optional[AdaptedLayer]] = [None, None]
        self._layer_names: Tuple[str, str] = ('', '')
        # The first layer's next offset, held until the second layer has run: the
        # detached factors, or their rebuild (see the module doc).
        self._pending: Optional[object] = None
        # Each side's next offset, left to the backward pass to form (a rebuild).
        self._deferred: List[Optional[FactorRebuild]] = [None, None]
        # Full partner copies read from an earlier checkpoint layout, converted to
        # offsets once both base weights are loaded (see _load_from_state_dict).
        self._legacy_partners: Optional[List[torch.Tensor]] = None
        # Constant tensors of the fused scalings, per side, device and dtype.
        self._scaling_cache: Tuple[dict, dict] = ({}, {})
        # Each side's (L, R) of the current training forward pass, where they were
        # formed with the other pairs of the same shape (:mod:`.pair_batch`); taken
        # once by :meth:`factors`.
        self._stacked: List[Optional[tuple]] = [None, None]
        self.reset_parameters()

    def __getstate__(self) -> dict:
        # a copy (or pickle) holds its offsets, not rebuilds reading this pair's tensors
        self.settle()
        return super().__getstate__()

    def _apply(self, fn, recurse=True):
        self.settle()           # formed on the tensors' device before they move
        return super()._apply(fn, recurse)

    def __setstate__(self, state: dict) -> None:
        # A copy of a model whose second layer comes first reaches this pair through
        # that layer and restores it after its first layer: the first layer could not
        # give these parameters their gradient-stride hooks then, so the pair does.
        super().__setstate__(state)
        self.__dict__.setdefault('_deferred', [None, None])   # a pickle of an older release
        keep_gradient_strides(self)

    def _new_param(self, name: str, shape: tuple, rank: int) -> None:
        self.register_parameter(name, nn.Parameter(torch.zeros(shape)) if rank else None)

    def side_shapes(self) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        """Paper-orientation ``(in, out)`` of W1 and W2."""
        return (self.d, self.d_mid), (self.d_mid, self.d_out)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.rl:
            init_a_(self.A1, self.d)
            init_a_(self.A2, self.d_mid)
            self.B1.zero_()
            self.B2.zero_()
        if self.rs:
            init_a_(self.As, self.d)
            self.Bs.zero_()

    def num_trainable(self) -> int:
        """Closed form ``r (d + d'') + 2 rl d'`` (appendix Table 1)."""
        return self.r * (self.d + self.d_out) + 2 * self.rl * self.d_mid

    def attach(self, index: int, layer: AdaptedLayer) -> None:
        self._layers[index] = layer
        names = list(self._layer_names)
        names[index] = layer.layer_name
        self._layer_names = tuple(names)

    def _compute_dtype(self) -> torch.dtype:
        return compute_dtype(*(p for p in self.parameters()), *self._base_weights())

    def _base_weights(self) -> List[torch.Tensor]:
        return [layer.unmerged_weight() for layer in self._layers if layer is not None]

    # -------------------------------------------------------------- partners
    def offset(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._legacy_partners is not None:
            self._convert_legacy_partners()
        if self._deferred[index] is not None:
            self._form_deferred(index)
        lname, rname = OFFSET_NAMES[index]
        return getattr(self, lname), getattr(self, rname)

    # ------------------------------------------------- offsets left to backward
    def _stage(self, index: int, staged) -> None:
        """Make ``staged`` side ``index``'s next offset: detached factors at once, a
        rebuild when the backward pass forms it (or when first read)."""
        if isinstance(staged, FactorRebuild):
            self._deferred[index] = staged
            _unsettled(self, True)
        else:
            self._deferred[index] = None
            self.set_partner_offset(index, *staged)

    def _adopt(self, index: int, rebuild: FactorRebuild, left: torch.Tensor,
               right: torch.Tensor) -> None:
        """The factors a backward pass formed again from ``rebuild``: side ``index``'s
        offset if that rebuild is still its next one (or the first layer's pending one);
        from any other (an older pass, a pass before a load) they are dropped."""
        if index == 0 and self._pending is rebuild:
            self._pending = (left, right)
        elif self._deferred[index] is rebuild:
            self._deferred[index] = None
            self.set_partner_offset(index, left, right)
        if self._deferred == [None, None] and not isinstance(self._pending, FactorRebuild):
            _unsettled(self, False)

    def _formed(self, rebuild: FactorRebuild) -> Optional[tuple]:
        """``rebuild``'s factors, or None (with a warning) where a parameter they are
        formed from changed in place since its forward pass."""
        if rebuild.stale:
            warnings.warn(
                f'{self.where}: its parameters were changed in place after a '
                'training forward pass whose backward pass did not reach the pair, '
                'outside optimizer.step(); the partner offsets that pass formed cannot '
                'be formed again and the previous ones are kept. Run backward() (or '
                'optimizer.step()) before changing the parameters.', stacklevel=3)
            return None
        return rebuild()

    def _form_deferred(self, index: int) -> None:
        rebuild, self._deferred[index] = self._deferred[index], None
        formed = self._formed(rebuild)
        if formed is not None:
            self.set_partner_offset(index, *formed)

    def settle(self) -> None:
        """Form the partner offsets left to a backward pass (module doc) now: their
        values are the same, only when they are formed changes."""
        if isinstance(self._pending, FactorRebuild):
            self._pending = self._formed(self._pending)
        for index in (0, 1):
            if self._deferred[index] is not None:
                self._form_deferred(index)
        _unsettled(self, False)

    def partner_base(self, index: int) -> Optional[torch.Tensor]:
        """The partner layer's base weight in PyTorch layout ``(out, in)`` (W1^T or
        W2^T of the paper), or None for a pair without layers (zero base)."""
        layer = self._layers[index]
        if layer is None:
            return None
        return layer.weight_matrix(layer.unmerged_weight())

    def partner(self, index: int) -> torch.Tensor:
        """The partner ``W_i + L_i R_i`` in paper orientation ``(in x out)``, detached,
        in the compute dtype. Formed here for inspection only: the deltas never build it."""
        with torch.no_grad(), no_autocast(self.partner_l1.device):
            dtype = self._compute_dtype()
            din, dout = self.side_shapes()[index]
            base = self.partner_base(index)
            out = (torch.zeros(din, dout, dtype=dtype, device=self.partner_l1.device)
                   if base is None else base.detach().t().to(dtype))
            left, right = self.offset(index)
            if left.shape[1]:
                out = out + left.to(dtype) @ right.to(dtype)
            return out

    @property
    def partner_w1(self) -> torch.Tensor:
        """W1 as the pair sees it (paper orientation ``d x d'``); read-only."""
        return self.partner(0)

    @property
    def partner_w2(self) -> torch.Tensor:
        """W2 as the pair sees it (paper orientation ``d' x d''``); read-only."""
        return self.partner(1)

    @torch.no_grad()
    def set_partner_offset(self, index: int, left: torch.Tensor,
                           right: torch.Tensor) -> None:
        """Make ``partner_index = base + left @ right`` (paper orientation). Rebinds the
        buffers: a pending backward pass keeps the tensors it saved."""
        din, dout = self.side_shapes()[index]
        if left.dim() != 2 or right.dim() != 2 or left.shape[0] != din \
                or right.shape[1] != dout or left.shape[1] != right.shape[0]:
            raise ValueError(f'{self.where}: partner offset of W{index + 1} must be '
                             f'({din} x k) @ (k x {dout}); got {tuple(left.shape)} @ '
                             f'{tuple(right.shape)}.')
        lname, rname = OFFSET_NAMES[index]
        ref = getattr(self, lname)
        setattr(self, lname, left.detach().to(ref.dtype).contiguous())
        setattr(self, rname, right.detach().to(ref.dtype).contiguous())

    # ------------------------------------------------------------------ deltas
    def _norms(self) -> Tuple[float, float]:
        """The scalings' normalisers ``k``: ``sqrt(rl)`` for each side's own term,
        ``(rs n)^(1/4)`` for the shared one."""
        return math.sqrt(self.rl), (self.rs * self.n) ** 0.25

    def _terms(self, index: int, dtype: torch.dtype,
               partner_product: Optional[torch.Tensor] = None) -> list:
        """The scaled terms of side ``index``: ``(X, Y, k)`` with ``dW = sum_j s_j X_j
        Y_j`` and ``s_j = 1 / (k_j (std(X_j) + std(Y_j)))``: ``(A_i, B_i, sqrt(rl))``,
        then ``(As, Bs W2p^T, (rs n)^(1/4))`` for W1' or ``(W1p^T As, Bs, ...)`` for
        W2'. The partner enters as its base weight and its low-rank offset, never as a
        formed sum; ``partner_product``, where given, is that product formed already."""
        terms = []
        if self.rl:
            A, B = (self.A1, self.B1) if index == 0 else (self.A2, self.B2)
            terms.append((A.to(dtype), B.to(dtype), self._norms()[0]))
        if self.rs:
            C = (self._partner_product(index, dtype) if partner_product is None
                 else partner_product)
            As, Bs = self.As.to(dtype), self.Bs.to(dtype)
            terms.append((As, C, self._norms()[1]) if index == 0
                         else (C, Bs, self._norms()[1]))
        return terms

    def _partner_product(self, index: int, dtype: torch.dtype,
                         offset: bool = True) -> torch.Tensor:
        """``Bs W2p^T`` (``rs x d'``, index 0) or ``W1p^T As`` (``d' x rs``, index 1):
        the base weight's product, plus the offset's (``offset``, where it is not
        empty)."""
        other = 1 - index
        base = self.partner_base(other)           # W2^T (d'' x d') or W1^T (d' x d)
        left, right = (t.to(dtype) for t in self.offset(other))
        if index == 0:
            # C = Bs W2p^T = Bs W2^T + (Bs R2^T) L2^T                      (rs x d')
            Bs = self.Bs.to(dtype)
            C = Bs @ base.to(dtype) if base is not None else Bs.new_zeros(self.rs, self.d_mid)
            if offset and left.shape[1]:
                C = C + (Bs @ right.t()) @ left.t()
            return C
        # C = W1p^T As = W1^T As + R1^T (L1^T As)                             (d' x rs)
        As = self.As.to(dtype)
        C = base.to(dtype) @ As if base is not None else As.new_zeros(self.d_mid, self.rs)
        if offset and left.shape[1]:
            C = C + right.t() @ (left.t() @ As)
        return C

    def factors(self, index: int, fused: bool = False) -> tuple:
        """``(L, R)`` with ``dW_index = L R`` (paper orientation, inner width ``r``):
        both terms of Eq. 14 (or 15) as one product, ``[s1 A1 | s As] @ [B1 ; Bs W2^T]``.
        In ``max(float32, parameter dtype)``, autocast off; in a training step on the
        CPU the whole side is one C++ autograd node (:meth:`_one_node_factors`), else
        the scalings run as one autograd op (:mod:`.scaling`), in an adapted backbone's
        training forward pass for all its pairs of this shape at once (formed when the
        pass begins, taken here once: :mod:`.pair_batch`). ``fused``: where the C++
        node applies, the factors come without it, for a low-rank op that takes the
        parameters itself (:class:`.up3x3.PairSideRebuild`)."""
        with no_autocast(self.partner_l1.device):
            ready = self._stacked[index]
            if ready is not None:
                # formed with the other pairs of this shape (:mod:`.pair_batch`)
                self._stacked[index] = None
                return ready
            dtype = self._compute_dtype()
            one = self._one_node_factors(index, dtype, fused)
            if one is not None:
                return one
            terms = self._terms(index, dtype)
            left = scaled_columns(terms, self._scaling_cache[index])
            if len(terms) == 1:
                return left, terms[0][1]
            return left, torch.cat([y for _, y, _ in terms], dim=0)

    def _one_node_factors(self, index: int, dtype: torch.dtype,
                          fused: bool = False) -> Optional[tuple]:
        """``(L, R)`` of a training step as one C++ autograd node on the CPU
        (:func:`.up3x3.pair_side_factors`: the same values, the same gradients up to
        rounding), or None where it does not apply: no gradient needed, a pair with an
        empty part or without layers, another device."""
        args = self._one_node_args(index, dtype)
        return None if args is None else pair_side_factors(
            *args, where=f'{self.where}, W{index + 1}', fused=fused)

    def _one_node_args(self, index: int, dtype: torch.dtype) -> Optional[tuple]:
        """The arguments of :func:`.up3x3.pair_side_factors` for side ``index``, or None
        where a training step has no use for the node (see :meth:`_one_node_factors`)."""
        if not (self.rl and self.rs) or not torch.is_grad_enabled() \
                or self.As.device.type != 'cpu':
            return None
        A, B = (self.A1, self.B1) if index == 0 else (self.A2, self.B2)
        if not any(p.requires_grad for p in (A, B, self.As, self.Bs)):
            return None
        base = self.partner_base(1 - index)
        if base is None:
            return None
        left, right = self.offset(1 - index)
        return (index, A.to(dtype), B.to(dtype), self.As.to(dtype), self.Bs.to(dtype),
                base.to(dtype), left.to(dtype), right.to(dtype), *self._norms())

    def one_node_applies(self, index: int) -> bool:
        """Whether a training step on this pair's device forms side ``index`` as the
        CPU's C++ node (:meth:`_one_node_factors`)."""
        if not (self.rl and self.rs) or self.As.device.type != 'cpu':
            return False
        args = self._one_node_args(index, self._compute_dtype())
        return args is not None and pair_side_kernel_applies(*args[1:8])

    def delta(self, index: int) -> torch.Tensor:
        """``dW1`` (index 0, ``d x d'``) or ``dW2`` (index 1, ``d' x d''``), paper
        orientation, in ``max(float32, parameter dtype)``: a single GEMM of inner width
        ``r``; autograd keeps only the thin factors."""
        left, right = self.factors(index)
        with no_autocast(left.device):
            return left @ right

    def _independent(self, index: int) -> Optional[tuple]:
        """``(s_i A_i, B_i)`` of side ``index``, or None without an independent part."""
        if self.rl == 0:
            return None
        A, B, k = self._terms(index, self._compute_dtype())[0]
        return plain_scaled(A, B, k), B

    # ------------------------------------------------------------ checkpoints
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs) -> None:
        # formed before the load changes what they are formed from; the checkpoint's
        # offsets, where it has them, then replace them
        self.settle()
        legacy = [prefix + name for name in LEGACY_PARTNER_NAMES]
        if any(k in state_dict for k in legacy):
            if not all(k in state_dict for k in legacy):
                error_msgs.append(f'{self.where}: the checkpoint has only one of '
                                  f'{prefix}partner_w1 / partner_w2.')
                return
            expected = self.side_shapes()
            stored = [tuple(state_dict[k].shape) for k in legacy]
            if stored != [tuple(e) for e in expected]:
                name = prefix.rstrip('.') or type(self).__name__
                layers = f' (layers {self.where})' if self.where else ''
                error_msgs.append(
                    f'{name}{layers}: the checkpoint\'s full partner copies '
                    f'{prefix}partner_w1 {stored[0]} / {prefix}partner_w2 {stored[1]} do '
                    f'not fit this pair, which takes {tuple(expected[0])} (d x d\') and '
                    f'{tuple(expected[1])} (d\' x d\'\'): the checkpoint is of another '
                    'architecture; build the model with the config the checkpoint was '
                    'trained with, or load a checkpoint of this one.')
                return
            # A module sees only its own keys while loading, and the second layer's
            # base weight is loaded after this: keep the copies, convert on first use.
            self._legacy_partners = [state_dict[k] for k in legacy]
            state_dict = {k: v for k, v in state_dict.items() if k not in legacy}
            for index, (lname, rname) in enumerate(OFFSET_NAMES):
                din, dout = self.side_shapes()[index]
                state_dict[prefix + lname] = torch.zeros(din, 0)
                state_dict[prefix + rname] = torch.zeros(0, dout)
        # The offsets' inner width varies (0, r, or more after a fold): take the
        # checkpoint's; any other shape is refused here, not at the first forward.
        bad = self._misfit_offsets(state_dict, prefix)
        if bad:
            error_msgs.extend(dict.fromkeys(bad.values()))
            state_dict = {k: (getattr(self, k[len(prefix):]) if k in bad else v)
                          for k, v in state_dict.items()}
        for lname, rname in OFFSET_NAMES:
            for name in (lname, rname):
                key = prefix + name
                if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                    ref = getattr(self, name)
                    setattr(self, name, ref.new_zeros(state_dict[key].shape))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    def _misfit_offsets(self, state_dict, prefix) -> dict:
        """``{key: message}`` for each stored partner offset whose shape does not fit
        this pair (``(d_in x k) @ (k x d_out)``, one inner width ``k`` per side)."""
        bad = {}
        name = prefix.rstrip('.') or type(self).__name__
        layers = f' (layers {self.where})' if self.where else ''
        for index, (lname, rname) in enumerate(OFFSET_NAMES):
            din, dout = self.side_shapes()[index]
            lkey, rkey = prefix + lname, prefix + rname
            left, right = state_dict.get(lkey), state_dict.get(rkey)
            shapes = [None if t is None else tuple(t.shape) for t in (left, right)]
            fits = [t is None or (t.dim() == 2 and t.shape[j] == want)
                    for j, (t, want) in enumerate(((left, din), (right, dout)))]
            inner = (left is None or right is None or not all(fits)
                     or left.shape[1] == right.shape[0])
            if all(fits) and inner:
                continue
            why = ('their inner widths differ' if all(fits) else
                   'the outer sizes are not the layers\' widths')
            message = (f'{name}{layers}: the checkpoint\'s partner offset of W{index + 1}, '
                       f'{lkey} {shapes[0]} @ {rkey} {shapes[1]}, does not fit ({why}); '
                       f'this pair takes ({din} x k) @ (k x {dout}) with one inner width '
                       'k: the checkpoint is of another architecture or was altered; '
                       'build the model with the config it was trained with, or load it '
                       'without these keys and call reset_adapters_from_weights().')
            for key, ok in ((lkey, fits[0] and inner), (rkey, fits[1] and inner)):
                if key in state_dict and not ok:
                    bad[key] = message
        return bad

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        if self._legacy_partners is not None:
            self._convert_legacy_partners()
        self.settle()
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # An offset taken from factors formed with other pairs (:mod:`.pair_batch`) is a
        # view of their stack: saved on its own, it would carry the whole stack.
        for name in (n for names in OFFSET_NAMES for n in names):
            value = destination.get(prefix + name)
            if value is not None and \
                    value.untyped_storage().nbytes() > value.numel() * value.element_size():
                destination[prefix + name] = value.clone()

    @torch.no_grad()
    def _convert_legacy_partners(self) -> None:
        """Full partner copies of an earlier checkpoint layout become low-rank offsets
        ``partner - base`` (exact to the copies' rounding: they were ``W + dW`` with
        ``dW`` of rank <= r, or the base itself)."""
        stored, self._legacy_partners = self._legacy_partners, None
        if any(layer is None for layer in self._layers):
            raise RuntimeError(
                f'{self.where}: this checkpoint stores full partner copies '
                '(partner_w1/partner_w2), which convert to partner offsets only in a '
                'pair injected into its two layers; load the whole model\'s state dict.')
        for index, full in enumerate(stored):
            base = self.partner_base(index).double().t()              # paper (in x out)
            diff = full.double().to(base.device) - base
            # what the stored copy's own rounding cannot tell apart from zero
            tol = torch.finfo(full.dtype).eps * float(full.double().norm())
            left, right = compact_factors(diff, torch.eye(diff.shape[1], dtype=diff.dtype,
                                                          device=diff.device), tol)
            lname, _ = OFFSET_NAMES[index]
            dtype = getattr(self, lname).dtype
            self.set_partner_offset(index, left.to(dtype), right.to(dtype))


class CoLoRAPairLayer(Adapter):
    """One side (``index`` 0 or 1) of a :class:`CoLoRAPair` on an :class:`AdaptedLayer`.

    The first side owns the pair's parameters (registered as ``pair``); the second side
    refers to the same object without registering it, so every tensor appears once in
    the state dict.
    """

    method = 'colora'

    def __init__(self, pair: CoLoRAPair, index: int,
                 layer: Optional[AdaptedLayer] = None) -> None:
        super().__init__()
        self.index = index
        if index == 0:
            self.pair = pair
        else:
            object.__setattr__(self, '_pair_ref', pair)
        if layer is not None:
            pair.attach(index, layer)

    def get_pair(self) -> CoLoRAPair:
        return self.pair if self.index == 0 else self._pair_ref

    @property
    def foldable(self) -> bool:
        return True

    @property
    def has_independent_part(self) -> bool:
        """The pair has an independent part (``rl > 0``, i.e. ``share_ratio < 1``)."""
        return self.get_pair().rl > 0

    def low_rank(self, layer: AdaptedLayer, fused: bool = False) -> tuple:
        pair = self.get_pair()
        if pair.partner_policy == 'effective' and self.training and \
                torch.is_grad_enabled() and not compiling() and _in_backward():
            # activation checkpointing (torch.utils.checkpoint, mmengine's
            # `activation_checkpointing`) runs the forward pass again inside backward
            raise RuntimeError(
                f'{layer.describe()}: a training forward pass of a CoLoRA pair with '
                "partner_policy='effective' runs inside a backward pass: activation "
                'checkpointing recomputes the forward there, after the effective partner '
                'weights have moved on, so the gradients would belong to another '
                'function. Leave the blocks with CoLoRA pairs out of activation '
                "checkpointing (with_cp, `activation_checkpointing`), or use adapter "
                "partner_policy='frozen'.")
        return pair.factors(self.index, fused=fused)

    def forward_factors(self, layer: AdaptedLayer) -> tuple:
        # the layer's own low-rank op takes the side's parameters (one autograd node)
        return self.low_rank(layer, fused=True)

    def before_load(self) -> None:
        # the offsets left to a backward pass are formed from this layer's base weight,
        # which the load overwrites in place: form them first (their values are the
        # same), as the pair does before its own tensors load
        self.get_pair().settle()

    def after_forward(self, layer: AdaptedLayer, factors: Optional[tuple]) -> None:
        pair = self.get_pair()
        if not self.training or pair.partner_policy != 'effective' or factors is None:
            return
        rebuild = getattr(factors, 'rebuild', None)
        if rebuild is not None and rebuild.taken:
            # the layer's op keeps no factors: the backward pass forms them again and
            # hands them to this side's offset (the module doc)
            rebuild.on_rebuilt = _adopter(pair, self.index, rebuild)
            staged = rebuild
        else:
            staged = tuple(f.detach() for f in factors)
            if not compiling() and torch.is_inference_mode_enabled():
                # a training-mode forward under torch.inference_mode(): the offsets must
                # be normal tensors, or the next training step could not save them
                with torch.inference_mode(False):
                    staged = tuple(f.clone() for f in staged)
        if self.index == 0:
            # Hold W1's offset until the second layer has used this step's partner W1.
            pair._pending = staged
            if isinstance(staged, FactorRebuild):
                _unsettled(pair, True)
        else:
            pair._stage(1, staged)
            if pair._pending is not None:
                pair._stage(0, pair._pending)
                pair._pending = None

    @torch.no_grad()
    def reset_from_weights(self, layer: AdaptedLayer) -> None:
        pair = self.get_pair()
        din, dout = pair.side_shapes()[self.index]
        pair._pending = None
        pair._deferred[self.index] = None
        left, right = pair.offset(self.index)
        pair.set_partner_offset(self.index, left.new_zeros(din, 0), right.new_zeros(0, dout))

    @torch.no_grad()
    def fold_independent_(self, layer: AdaptedLayer) -> list:
        """Add ``s_i A_i B_i`` to the base weight, record ``-s_i A_i B_i`` in this side's
        partner offset (the partner does not move), re-initialise ``A_i, B_i``."""
        pair = self.get_pair()
        pair.settle()             # before the parameters they are formed from change
        part = pair._independent(self.index)
        if part is None:
            return []
        scaled_a, b = part
        layer.weight.add_(layer.as_weight_shape((scaled_a @ b).t()).to(layer.weight.dtype))
        left, right = pair.offset(self.index)
        left = torch.cat([left.to(scaled_a.dtype), -scaled_a], dim=1)
        right = torch.cat([right.to(b.dtype), b], dim=0)
        din, dout = pair.side_shapes()[self.index]
        if left.shape[1] > min(din, dout):
            left, right = compact_factors(left, right)
        pair.set_partner_offset(self.index, left, right)
        A, B = (pair.A1, pair.B1) if self.index == 0 else (pair.A2, pair.B2)
        init_a_(A, pair.d if self.index == 0 else pair.d_mid)
        B.zero_()
        return [A, B]

    def extra_repr(self) -> str:
        p = self.get_pair()
        return (f'index={self.index}, r={p.r}, rs={p.rs}, rl={p.rl}, '
                f'partner_policy={p.partner_policy!r}')
