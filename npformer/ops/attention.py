"""Scaled dot-product attention as one graph node, and self-attention on packed projections.

The reference ops: forward and backward are the lines of docs/derivations.md#attention,
symbol for symbol. The fast versions of both (scores held transposed, causal query blocks,
heads read in place from the packed projections) are in npformer/fast/attention.py and
are tested equal to these in tests/test_fast.py.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from .. import random
from ..tensor import Tensor
from ._core import constant, needs, register, result, shape_error, tensors, unbroadcast
from .dtype import astype
from .shape import reshape, split, transpose


@register
def attention(q, k, v, mask=None, scale: float = 1.0, dropout_p: float = 0.0, generator=None,
              causal: bool = False, bias=None):
    """out = W v with W = dropout(softmax(q k^T * scale + bias)), the softmax over the keys `mask` allows.

    q: (..., L, E); k: (..., S, E); v: (..., S, Ev); batch axes broadcast. bias: None or a
    float Tensor (or array) broadcastable to (..., L, S), ADDED to the scores: an additive
    mask (-inf masks), T5's relative position bias, ALiBi's distance penalties; it is an input
    like q, k and v, with a gradient when it requires grad. mask: None or a bool array
    broadcastable to (..., L, S), True = attend, never a gradient; a floating-point mask is
    taken as `bias`. causal=True: the top-left aligned lower triangle (query i attends keys
    0..i); it combines with a bias, not with a bool mask. A row with no attended key gets
    all-zero weights, hence zero output and zero gradients. dropout_p in [0, 1] drops each weight
    with that probability (generator: where the draws come from; the device's global one when
    None). Returns out (..., L, Ev).

    The backward keeps P (the softmax) and D (the dropout scaling keep / (1 - p)), with
    W = P * D:
      dv = W^T g;  dW = g v^T;  dP = dW * D;  dS = P * (dP - sum(dP * P, -1));
      dq = dS k * scale;  dk = dS^T q * scale;  dbias = dS;
    each summed over the axes its input was broadcast along.
    """
    q, k, v = tensors("attention", q, k, v)
    mask, bias = check_attention(q, k, v, mask, bias, causal)
    xp = q.xp
    if causal:
        mask = xp.tri(q.shape[-2], k.shape[-2], dtype=bool)              # (L, S): query i sees keys 0..i
    S = q.data @ k.data.swapaxes(-1, -2) * scale                         # (..., L, S)
    if bias is not None:
        S = S + bias.data
    if mask is not None:
        S = xp.where(mask, S, -xp.inf)
    P = masked_softmax(S, xp)                                            # (..., L, S)
    D = dropout_scale(P.shape, P.dtype, dropout_p, generator, q.device)  # (..., L, S) or None
    W = P if D is None else P * D
    out = W @ v.data                                                     # (..., L, Ev)
    inputs = (q, k, v) if bias is None else (q, k, v, bias)

    def backward(g):
        dv = W.swapaxes(-1, -2) @ g
        dW = g @ v.data.swapaxes(-1, -2)
        dP = dW if D is None else dW * D
        dS = P * (dP - (dP * P).sum(axis=-1, keepdims=True))
        dq = dS @ k.data * scale
        dk = dS.swapaxes(-1, -2) @ q.data * scale
        return input_grads(inputs, (dq, dk, dv, dS))                     # dbias = dS
    return result(out, inputs, backward, "attention")


@register
def self_attention(qkv, n_head: int, scale=None, causal: bool = False, dropout_p: float = 0.0, generator=None):
    """Multi-head self-attention on packed projections: split the heads, attend, merge them.

    qkv: (..., T, 3 E), the concatenation [q | k | v] along the last axis, each (..., T, E)
    with E = n_head * D laid out head by head (GPT-2's c_attn output). Returns (..., T, E):
    head h of query t is attention(q_h, k_h, v_h)[t] (scale defaults to 1 / sqrt(D), as
    scaled_dot_product_attention's), in columns h D .. (h + 1) D - 1 of row t. Its gradient
    is that of the ops it is made of.
    """
    (x,) = tensors("self_attention", qkv)
    batch, T, n_head, D, scale = packed_heads(x, n_head, scale)
    q, k, v = split(x, n_head * D, axis=-1)                              # 3 x (..., T, E)
    q, k, v = (transpose(reshape(t, batch + (T, n_head, D)), -3, -2) for t in (q, k, v))   # (..., n_head, T, D)
    y = attention(q, k, v, scale=scale, causal=causal, dropout_p=dropout_p, generator=generator)
    return reshape(transpose(y, -3, -2), batch + (T, n_head * D))        # (..., T, E)


# ----------------------------------------------------------------------------- shared with npformer/fast

def check_attention(q, k, v, mask, bias, causal):
    """Raise unless q (..., L, E), k (..., S, E), v (..., S, Ev), the mask and the bias fit.

    Returns (mask, bias): the bool mask as an array, the bias as a Tensor in the scores' dtype
    (cast with the astype op, so its gradient comes back in its own dtype), each or None. A
    floating-point mask is taken as the bias; an integer one is refused.
    """
    if q.ndim < 2 or k.ndim < 2 or v.ndim < 2 or q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise shape_error("attention", q.shape, k.shape, v.shape,
                          why="(query (..., L, E), key (..., S, E), value (..., S, Ev)) do not fit together")
    xp = q.xp
    try:
        scores = xp.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2]) + (q.shape[-2], k.shape[-2])
    except ValueError:
        raise shape_error("attention", q.shape, k.shape, v.shape, why="have batch axes that do not broadcast") from None
    if mask is not None:
        data = constant("attention", mask, q, "mask is", "q is")
        if data.dtype.kind == "f":
            if bias is not None:
                raise ValueError("attention: a floating-point mask is a bias (added to the scores); "
                                 "pass it or bias=, not both")
            mask, bias = None, mask
        elif data.dtype == bool:
            mask = data
        else:
            raise TypeError(f"attention: mask must be bool (True = attend) or floating point (added to the "
                            f"scores); got dtype {data.dtype}")
    if causal and mask is not None:
        raise ValueError("attention: causal=True cannot be combined with a mask")
    if bias is not None:
        data = constant("attention", bias, q, "bias is", "q is")
        if data.dtype.kind != "f":
            raise TypeError(f"attention: bias must be floating point; got dtype {data.dtype}")
        bias = astype(bias if isinstance(bias, Tensor) else Tensor(data), xp.result_type(q.dtype, k.dtype))
    for name, m in (("mask", mask), ("bias", bias)):
        try:
            if m is not None:
                xp.broadcast_shapes(tuple(m.shape), scores)
        except ValueError:
            raise ValueError(f"attention: {name} of shape {tuple(m.shape)} does not broadcast with the scores "
                             f"(..., L, S) = {scores}") from None
    return mask, bias


def input_grads(inputs, grads):
    """Per input, its gradient summed over the axes it was broadcast along; None where none is wanted."""
    return tuple(unbroadcast(d, t.shape) if needs(t) else None for t, d in zip(inputs, grads))


def packed_heads(x, n_head, scale):
    """(batch, T, n_head, D, scale) of packed projections x (..., T, 3 n_head D); raise when they do not fit."""
    if isinstance(n_head, bool) or not isinstance(n_head, numbers.Integral) or n_head < 1:
        raise ValueError(f"self_attention: n_head must be a positive int; got {n_head!r}")
    if x.ndim < 2 or x.shape[-1] % (3 * n_head) != 0:
        raise ValueError(f"self_attention: qkv of shape {x.shape} must be (..., T, 3 * E) with E a multiple of "
                         f"n_head = {n_head}, so its last axis a multiple of {3 * n_head}")
    *batch, T, E3 = x.shape
    D = E3 // (3 * int(n_head))
    return tuple(batch), T, int(n_head), D, 1.0 / math.sqrt(D) if scale is None else float(scale)


def masked_softmax(S, xp):
    """softmax(S) over the last axis; a row of all -inf (no key to attend) gets all-zero weights.

    Such a row is shifted by 0 instead of its max, so its exps are 0, and every denominator
    is clamped to at least 1: a live row's is >= 1 already (its max contributes exp(0) = 1).
    """
    m = S.max(axis=-1, keepdims=True)
    m = xp.where(m == -xp.inf, 0, m)
    e = xp.exp(S - m)
    return e / xp.maximum(e.sum(axis=-1, keepdims=True), 1)


def dropout_scale(shape, dtype, p, generator, device):
    """D (shape) = keep / (1 - p), keep = (u >= p) for u uniform in [0, 1) drawn in `dtype` (float64 for float16), so each
    element is kept with probability 1 - p; all zeros when p = 1; None (nothing drawn) when p = 0.
    Raises unless 0 <= p <= 1."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1]; got {p}")
    if p == 0.0:
        return None
    rng = generator if generator is not None else random.default_generator(device)
    draw = dtype if np.dtype(dtype) == np.float32 else np.float64        # generators draw only these two
    D = (rng.random(shape, dtype=draw) >= p).astype(dtype)
    if p < 1.0:                                                          # p = 1: nothing kept, D = 0
        D *= 1.0 / (1.0 - p)
    return D
