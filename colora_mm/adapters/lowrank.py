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
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

Recipe = Tuple[str, tuple, object]


def producer_recipe(x: torch.Tensor) -> Optional[Recipe]:
    """How to recompute ``x`` from tensors its producer saved for backward, or None."""
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
def recompute(recipe: Recipe, dtype: torch.dtype) -> torch.Tensor:
    kind, tensors, extra = recipe
    if kind == 'gelu':
        x = F.gelu(tensors[0], approximate=extra)
    else:
        inp, mean, rstd, weight, bias = tensors
        x = (inp - mean) * rstd
        if weight is not None:
            x = x * weight
        if bias is not None:
            x = x + bias
    return x.to(dtype)


class LowRankProduct(torch.autograd.Function):
    """``(x @ left) @ right`` over the last axis of ``x``; see the module doc."""

    @staticmethod
    def forward(ctx, x, left, right, recipe):
        z = x @ left
        out = z @ right
        ctx.recipe = recipe
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        if recipe is None:
            ctx.save_for_backward(left, right, z, x)
        else:
            ctx.save_for_backward(left, right, z)
        return out

    @staticmethod
    def backward(ctx, grad):
        left, right, z, *kept = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(right.dtype)
        grad_x = grad_left = grad_right = None
        if ctx.needs_input_grad[2]:
            grad_right = z.reshape(-1, z.shape[-1]).t() @ g
        gz = g @ right.t()
        if ctx.needs_input_grad[1]:
            x = kept[0] if kept else recompute(ctx.recipe, ctx.x_dtype)
            grad_left = x.reshape(-1, x.shape[-1]).t() @ gz
        if ctx.needs_input_grad[0]:
            grad_x = (gz @ left.t()).reshape(ctx.x_shape)
        return grad_x, grad_left, grad_right, None


def low_rank_product(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                     dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``(x L) R`` with all three cast to ``dtype`` (default: ``x``'s). The recipe is
    read from ``x`` before the cast, so a cast copy is not kept either."""
    dtype = dtype or x.dtype
    grad = torch.is_grad_enabled() and (x.requires_grad or left.requires_grad
                                        or right.requires_grad)
    recipe = producer_recipe(x) if grad and left.requires_grad else None
    x, left, right = x.to(dtype), left.to(dtype), right.to(dtype)
    if not grad:
        return (x @ left) @ right
    return LowRankProduct.apply(x, left, right, recipe)
