"""Functional forms of the layers, with torch.nn.functional's names and torch-style ``dim``.

The maths lives in npformer.ops (which spells axes NumPy's way, ``axis``); this
file adapts the names and adds ``linear`` and ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import math

import numpy as np

from .. import ops
from ..ops._core import constant
from ..tensor import Tensor


def linear(x, weight, bias=None):
    """y = x @ weight^T + bias.  x: (..., in); weight: (out, in) as torch; bias: (out,)."""
    return ops.linear(x, weight, bias)


def softmax(x, dim: int = -1):
    return ops.softmax(x, axis=dim)


def log_softmax(x, dim: int = -1):
    return ops.log_softmax(x, axis=dim)


def cross_entropy(input, target, *, ignore_index: int = -100, label_smoothing: float = 0.0,
                  reduction: str = "mean"):
    """torch.nn.functional.cross_entropy without class weights: input (N, C) or (N, C, d1, ...)."""
    return ops.cross_entropy(input, target, ignore_index=ignore_index,
                             label_smoothing=label_smoothing, reduction=reduction)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps: float = 1e-5):
    return ops.layer_norm(x, normalized_shape, weight, bias, eps)


def rms_norm(x, normalized_shape, weight=None, eps=None):
    """x / sqrt(mean(x^2) + eps) * weight over the trailing `normalized_shape` axes; eps=None: the
    dtype's machine epsilon (torch.nn.functional.rms_norm)."""
    return ops.rms_norm(x, normalized_shape, weight, eps)


def gelu(x, approximate: str = "none"):
    return ops.gelu(x, approximate=approximate)


def silu(x):
    """x * sigmoid(x)."""
    return ops.silu(x)


def relu(x):
    return ops.relu(x)


def tanh(x):
    return ops.tanh(x)


def dropout(x, p: float = 0.5, training: bool = True, generator=None):
    return ops.dropout(x, p=p, training=training, generator=generator)


def embedding(input, weight):
    """Rows of weight (V, D) at integer indices `input` (any shape) -> (*input.shape, D)."""
    return ops.embedding(weight, input)


# ----------------------------------------------------------------------------- attention

def mask_array(mask, like: Tensor):
    """A mask (Tensor, array or nested list) as an array on `like`'s device; None stays None."""
    return None if mask is None else constant("attention", mask, like, "mask is", "the inputs are")


def mask_tensor(mask, like: Tensor):
    """A mask as a Tensor on `like`'s device: a Tensor is kept, graph and all, so that a float mask
    that requires grad gets its gradient; an array or nested list is wrapped. None stays None."""
    data = mask_array(mask, like)
    return mask if data is None or isinstance(mask, Tensor) else Tensor(data)


def check_mask(where: str, name: str, mask, ok: bool, expected: str) -> None:
    """Raise unless `mask` is bool or floating (TypeError) and `ok` says its shape fits (ValueError)."""
    if mask.dtype != np.bool_ and mask.dtype.kind != "f":
        raise TypeError(f"{where}: {name} must be a bool or floating-point mask; got dtype {mask.dtype} "
                        f"(shape {tuple(mask.shape)})")
    if not ok:
        raise ValueError(f"{where}: {name} has shape {tuple(mask.shape)}; expected {expected}")


def _broadcasts_to(shape, target) -> bool:
    """True when `shape` broadcasts to `target` without enlarging it."""
    try:
        return np.broadcast_shapes(tuple(shape), tuple(target)) == tuple(target)
    except ValueError:
        return False


def causal_mask(L: int, S: int, xp=np):
    """(L, S) bool, True on and below the diagonal (top-left aligned): query i may attend keys 0..i."""
    return xp.tri(L, S, dtype=bool)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale=None, need_weights: bool = False,
                                 generator=None):
    """softmax(q k^T * scale + mask) v, torch.nn.functional.scaled_dot_product_attention's semantics.

    query: (..., L, E); key: (..., S, E); value: (..., S, Ev); batch axes broadcast.
    attn_mask: broadcastable to (..., L, S). Boolean: True = ATTEND, False = masked
        out (torch's SDPA polarity; nn.MultiheadAttention's is the opposite). Floating:
        ADDED to the scores (use -inf to mask), an additive bias such as T5's relative
        position bias or ALiBi's; a Tensor that requires grad gets its gradient, dL/dscores
        summed over the axes it was broadcast along (ops.attention's `bias`).
    is_causal: mask with the top-left aligned lower triangle, query i seeing keys 0..i;
        cannot be combined with attn_mask.
    scale: defaults to 1 / sqrt(E).  dropout_p: dropout on the attention weights.
    need_weights: also return the weights (..., L, S) that multiply v (after dropout).

    A query row whose keys are all masked gets all-zero weights, hence a zero
    output and zero gradients (never NaN). torch's SDPA also returns zeros there;
    other torch code paths (nn.MultiheadAttention with need_weights=True) give NaN.
    """
    q, k, v = (t if isinstance(t, Tensor) else Tensor(t) for t in (query, key, value))
    where = "scaled_dot_product_attention"
    if q.ndim < 2 or k.ndim < 2 or v.ndim < 2:
        raise ValueError(f"{where}: query, key and value need at least 2 dimensions; got shapes "
                         f"{q.shape}, {k.shape}, {v.shape}")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError(f"{where}: query (..., L, E) {q.shape}, key (..., S, E) {k.shape} and value "
                         f"(..., S, Ev) {v.shape} do not fit together")
    if is_causal and attn_mask is not None:
        raise ValueError(f"{where}: is_causal=True cannot be combined with an explicit attn_mask")
    L, S = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale

    if is_causal and not need_weights:
        return ops.attention(q, k, v, scale=scale, dropout_p=dropout_p, generator=generator, causal=True)
    if is_causal:
        attn_mask = causal_mask(L, S, q.xp)
    m = mask_tensor(attn_mask, q)
    if m is not None:
        try:
            score_shape = np.broadcast_shapes(q.shape[:-2], k.shape[:-2]) + (L, S)
        except ValueError:
            raise ValueError(f"{where}: batch axes of query {q.shape} and key {k.shape} cannot be "
                             f"broadcast together") from None
        check_mask(where, "attn_mask", m, _broadcasts_to(m.shape, score_shape),
                   f"a shape broadcastable to the attention scores (..., L, S) = {score_shape}")
    mask = m.data if m is not None and m.dtype == np.bool_ else None      # bool: True = attend
    bias = m if m is not None and mask is None else None                  # float: added, a graph input
    if not need_weights:
        return ops.attention(q, k, v, mask, scale=scale, dropout_p=dropout_p, generator=generator, bias=bias)
    # The attention weights are wanted: compose the same computation from primitive ops.
    scores = ops.matmul(q, ops.transpose(k, -2, -1)) * scale          # (..., L, S)
    xp = scores.xp
    if bias is not None:
        scores = scores + ops.astype(bias, scores.dtype)
    if mask is not None:
        scores = ops.masked_fill(scores, ~mask, -np.inf)
    # Rows with every score -inf would give 0/0 in softmax: give them zero weights instead.
    dead = xp.all(scores.data == -np.inf, axis=-1, keepdims=True) if m is not None else None
    if dead is not None and bool(dead.any()):
        weights = ops.masked_fill(ops.softmax(ops.masked_fill(scores, dead, 0.0), axis=-1), dead, 0.0)
    else:
        weights = ops.softmax(scores, axis=-1)
    if dropout_p > 0.0:
        weights = ops.dropout(weights, p=dropout_p, training=True, generator=generator)
    out = ops.matmul(weights, v)                                      # (..., L, Ev)
    return (out, weights) if need_weights else out
