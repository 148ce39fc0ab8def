"""Fused scaled dot-product attention: one graph node for softmax(q k^T * scale + mask) v.

The derivation of the backward is in docs/derivations.md#attention; the op is
gradient-checked in tests/test_ops_attention.py and compared with torch in
tests/test_verify_ops.py.

Layout: the scores are computed and kept transposed, as Z = s^T with keys on the rows
(..., S, L), i.e. Z = k (q * scale)^T. The softmax then reduces over axis -2, where NumPy's
max is an elementwise maximum over contiguous rows (3x faster than its max along a short
last axis), and the row sums are products with a vector of ones. Every product with the
weights uses a transposed view, which BLAS takes without a copy.
"""

from __future__ import annotations

import math
import numbers

from .. import backend, random
from ._core import needs, register, result, shape_error, tensors, unbroadcast

CAUSAL_BLOCK = 64   # query rows per block of the causal path (below 2 blocks it is not used)


def _softmax_columns(z, xp, live: bool):
    """In place: z (..., S, L) -> its softmax over axis -2 (each query's column of scores).

    live=False: some column may be all -inf (a query that attends to nothing); it is shifted
    by 0 instead of by its max and its denominator clamped to 1, so that its weights are 0.
    """
    m = z.max(axis=-2, keepdims=True)                                  # (..., 1, L)
    if not live:
        m[m == -xp.inf] = 0                                            # a dead column: exp(-inf - 0) = 0
    z -= m
    xp.exp(z, out=z)
    denom = xp.ones(z.shape[-2], dtype=z.dtype) @ z                    # (..., L): column sums
    if not live:
        xp.maximum(denom, 1, out=denom)                                # dead columns: 0 / 1 = 0
    z /= denom[..., None, :]
    return z


def _softmax_backward_columns(dz, z, xp):
    """In place: dz = dP^T (..., S, L) -> dS^T = P^T * (dP^T - column sums of dP^T * P^T)."""
    dz -= xp.einsum("...ji,...ji->...i", dz, z)[..., None, :]
    dz *= z
    return dz


@register
def attention(q, k, v, mask=None, scale: float = 1.0, dropout_p: float = 0.0, generator=None,
              causal: bool = False):
    """out = W v with W = softmax(q k^T * scale + mask) (then dropout), over the last axis.

    q: (..., L, E); k: (..., S, E); v: (..., S, Ev); batch axes broadcast. mask: None,
    a bool array broadcastable to (..., L, S) with True = attend, or a float array that
    is added to the scores. A row with no attended key gets all-zero weights (its
    softmax denominator, otherwise >= 1, is clamped to 1), hence zero output and zero
    gradients. Returns out (..., L, Ev).

    causal=True: the mask is the top-left aligned lower triangle (query i attends keys
    0..i; no other mask allowed). For self-attention (L == S, equal batch axes, no
    dropout) the queries are then taken in blocks of CAUSAL_BLOCK rows, each against only
    the keys it can see: about 40% less work and memory than the full L x S scores at
    L = 256 (docs/derivations.md#causal-blocks).

    Backward (docs/derivations.md#attention), with P the softmax, D the dropout scaling
    (keep / (1 - p), or 1) and W = P * D:
      dv = W^T g;  dW = g v^T;  dP = dW * D;  dS = P * (dP - sum(dP * P, -1));
      dq = dS k * scale;  dk = dS^T q * scale.
    The code holds every (L, S) array transposed, (S, L), as the module docstring says.
    """
    q, k, v = tensors("attention", q, k, v)
    xp = q.xp
    if q.ndim < 2 or k.ndim < 2 or v.ndim < 2 or q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise shape_error("attention", q.shape, k.shape, v.shape,
                          why="(query (..., L, E), key (..., S, E), value (..., S, Ev)) do not fit together")
    if causal and mask is not None:
        raise ValueError("attention: causal=True cannot be combined with a mask")
    if mask is not None and backend.device_of(mask) != q.device:
        raise backend.DeviceMismatchError(f"attention: mask is on {backend.device_of(mask)} but q is on {q.device}")
    if causal and _blockable(q.shape, k.shape, v.shape, dropout_p):
        out = xp.empty(q.shape[:-1] + v.shape[-1:], dtype=xp.result_type(q.data, v.data))
        blocks, probs = _blocks_forward(xp, q.data, k.data, v.data, scale, out)

        def backward(g):
            dv = xp.zeros_like(v.data) if needs(v) else None
            dq = xp.empty_like(q.data) if needs(q) else None
            dk = xp.zeros_like(k.data) if needs(k) else None
            _blocks_backward(xp, g, q.data, k.data, v.data, scale, blocks, probs, dq, dk, dv)
            return dq, dk, dv
        return result(out, (q, k, v), backward, "attention")

    saved = _weights(xp, q.data, k.data, scale, mask, causal, dropout_p, generator, q.device)
    out = saved[1].swapaxes(-1, -2) @ v.data                           # W v (..., L, Ev)

    def backward(g):
        dq, dk, dv = _general_backward(xp, g, q.data, k.data, v.data, scale, saved,
                                       needs(q), needs(k), needs(v))
        return (None if dq is None else unbroadcast(dq, q.shape), None if dk is None else unbroadcast(dk, k.shape),
                None if dv is None else unbroadcast(dv, v.shape))
    return result(out, (q, k, v), backward, "attention")


@register
def self_attention(qkv, n_head: int, scale=None, causal: bool = False, dropout_p: float = 0.0, generator=None):
    """Multi-head self-attention on packed projections, heads split and merged inside the op.

    qkv: (..., T, 3 E), the concatenation [q | k | v] along the last axis, each (..., T, E)
    with E = n_head * D laid out head by head (GPT-2's c_attn output). Returns (..., T, E):
    head h of query t is attention(q_h, k_h, v_h)[t] (scale defaults to 1 / sqrt(D)),
    written to columns h D .. (h + 1) D - 1 of row t.

    The same computation as splitting qkv, reshaping and transposing each part to
    (..., n_head, T, D), calling `attention` and merging the heads back, with the same
    float results; but the three views, their backward copies and the merge copy are not
    made: the heads are strided views of qkv, the output is written in merged layout and
    the backward writes dq, dk and dv straight into one (..., T, 3 E) gradient.
    """
    (x,) = tensors("self_attention", qkv)
    xp = x.xp
    if isinstance(n_head, bool) or not isinstance(n_head, numbers.Integral) or n_head < 1:
        raise ValueError(f"self_attention: n_head must be a positive int; got {n_head!r}")
    if x.ndim < 2 or x.shape[-1] % (3 * n_head) != 0:
        raise ValueError(f"self_attention: qkv of shape {x.shape} must be (..., T, 3 * E) with E a multiple of "
                         f"n_head = {n_head}, so its last axis a multiple of {3 * n_head}")
    *batch, T, E3 = x.shape
    n_head = int(n_head)
    batch, D = tuple(batch), E3 // (3 * n_head)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)   # as scaled_dot_product_attention
    heads = x.data.reshape(batch + (T, 3, n_head, D))
    q, k, v = (heads[..., i, :, :].swapaxes(-3, -2) for i in range(3))   # 3 x (..., n_head, T, D) views
    out = xp.empty(batch + (T, n_head, D), dtype=x.dtype)
    out_heads = out.swapaxes(-3, -2)                                   # (..., n_head, T, D) view
    if causal and _blockable(q.shape, k.shape, v.shape, dropout_p):
        blocks, probs = _blocks_forward(xp, q, k, v, scale, out_heads)
        saved = None
    else:
        saved = _weights(xp, q, k, scale, None, causal, dropout_p, generator, x.device)
        xp.matmul(saved[1].swapaxes(-1, -2), v, out=out_heads)

    def backward(g):
        g = g.reshape(batch + (T, n_head, D)).swapaxes(-3, -2)         # (..., n_head, T, D)
        d = xp.empty(batch + (T, 3, n_head, D), dtype=x.dtype)
        dq, dk, dv = (d[..., i, :, :].swapaxes(-3, -2) for i in range(3))
        if saved is None:
            d[..., 1:, :, :] = 0                                       # dk and dv are sums over blocks
            _blocks_backward(xp, g, q, k, v, scale, blocks, probs, dq, dk, dv)
        else:
            _general_backward(xp, g, q, k, v, scale, saved, True, True, True, out=(dq, dk, dv))
        return (d.reshape(x.shape),)
    return result(out.reshape(batch + (T, n_head * D)), (x,), backward, "self_attention")


# ----------------------------------------------------------------------------- the array code

def _weights(xp, q, k, scale, mask, causal, dropout_p, generator, device):
    """(P^T, W^T, D^T or None), each (..., S, L): the softmax weights, after dropout, and its scaling."""
    L, S = q.shape[-2], k.shape[-2]
    # The scale goes on q (L x E), and in the backward on dq and dk, rather than on the
    # larger (S x L) scores; masks are applied in place where they do not enlarge the scores.
    z = k @ (q * scale).swapaxes(-1, -2)                               # s^T (..., S, L)
    live = mask is None             # no query can be left without keys (causal: query i sees key i)
    if causal:
        z += xp.where(xp.tri(L, S, dtype=bool).T, 0, -xp.inf).astype(z.dtype)   # key j sees query i >= j
    elif mask is not None:
        if mask.ndim < 2:
            mask = mask.reshape((1,) * (2 - mask.ndim) + mask.shape)
        mask_t = mask.swapaxes(-1, -2)                                 # (..., S, L), a view
        in_place = xp.broadcast_shapes(mask_t.shape, z.shape) == z.shape
        if mask.dtype == bool:
            if in_place:                                               # adding a small 0/-inf table is
                z += xp.where(mask_t, 0, -xp.inf).astype(z.dtype)      # faster than a masked write
            else:
                z = xp.where(mask_t, z, -xp.inf)                       # broadcasts z up to the mask's shape
        elif in_place:
            z += mask_t
        else:
            z = z + mask_t.astype(z.dtype, copy=False)
    p = _softmax_columns(z, xp, live)                                  # P^T (..., S, L)
    if dropout_p == 0.0:
        return p, p, None
    rng = generator if generator is not None else random.default_generator(device)
    # drawn in (..., L, S) order, element (i, j) for query i and key j, then viewed as (S, L)
    drawn = rng.random(p.shape[:-2] + (L, S), dtype=p.dtype)
    scale_d = (drawn >= dropout_p).astype(p.dtype).swapaxes(-1, -2)
    scale_d *= 1.0 / (1.0 - dropout_p)
    return p, p * scale_d, scale_d


def _general_backward(xp, g, q, k, v, scale, saved, want_q, want_k, want_v, out=None):
    """(dq, dk, dv) of the full-score path, in broadcast shapes (None where not wanted).

    out: (dq, dk, dv) arrays to write into (same shapes as q, k, v; no broadcasting), or None.
    """
    p, w, scale_d = saved
    dq_out, dk_out, dv_out = out if out is not None else (None, None, None)
    dq = dk = dv = None
    if want_v:
        dv = xp.matmul(w, g, out=dv_out)                               # W^T g
    if want_q or want_k:
        dz = v @ g.swapaxes(-1, -2)                                    # dW^T (..., S, L)
        if scale_d is not None:
            dz *= scale_d                                              # dP^T
        _softmax_backward_columns(dz, p, xp)                           # dS^T / scale
        if want_q:
            dq = xp.matmul(dz.swapaxes(-1, -2), k, out=dq_out)
            dq *= scale
        if want_k:
            dk = xp.matmul(dz, q, out=dk_out)
            dk *= scale
    return dq, dk, dv


def _blockable(q_shape, k_shape, v_shape, dropout_p) -> bool:
    """Whether causal attention takes the blocked path: self-attention of >= 2 blocks, no dropout."""
    L, S = q_shape[-2], k_shape[-2]
    return (L == S and L >= 2 * CAUSAL_BLOCK and dropout_p == 0.0
            and q_shape[:-2] == k_shape[:-2] == v_shape[:-2])


def _blocks_forward(xp, q, k, v, scale, out):
    """Causal self-attention with the queries in blocks [i0, i1), each against keys [0, i1).

    Block by block this is the computation above with the keys a block cannot see left
    out (their weights are exactly 0 there); only the block's last i1 - i0 keys need the
    triangular mask. Scores are held transposed, (i1 keys, i1 - i0 queries), as in
    `attention`. Writes out (..., T, Ev); returns (blocks, the blocks' P^T) for the backward.
    """
    T = q.shape[-2]
    n = -(-T // CAUSAL_BLOCK)
    edges = [round(T * j / n) for j in range(n + 1)]
    blocks = list(zip(edges[:-1], edges[1:]))
    width = max(i1 - i0 for i0, i1 in blocks)
    table = xp.where(xp.tri(width, width, dtype=bool).T, 0, -xp.inf).astype(q.dtype)   # [key, query]: 0 / -inf
    qs = q * scale
    probs = []
    for i0, i1 in blocks:
        z = k[..., :i1, :] @ qs[..., i0:i1, :].swapaxes(-1, -2)         # (..., i1, i1 - i0)
        z[..., i0:, :] += table[:i1 - i0, :i1 - i0]
        p = _softmax_columns(z, xp, live=True)
        xp.matmul(p.swapaxes(-1, -2), v[..., :i1, :], out=out[..., i0:i1, :])
        probs.append(p)
    return blocks, probs


def _blocks_backward(xp, g, q, k, v, scale, blocks, probs, dq, dk, dv) -> None:
    """Into dq (any contents), dk and dv (zeros); None where not wanted. dk and dv sum over blocks."""
    for (i0, i1), p in zip(blocks, probs):
        gb = g[..., i0:i1, :]
        if dv is not None:
            dv[..., :i1, :] += p @ gb
        if dq is not None or dk is not None:
            dz = v[..., :i1, :] @ gb.swapaxes(-1, -2)
            _softmax_backward_columns(dz, p, xp)
            if dq is not None:
                xp.matmul(dz.swapaxes(-1, -2), k[..., :i1, :], out=dq[..., i0:i1, :])
            if dk is not None:
                dk[..., :i1, :] += dz @ q[..., i0:i1, :]
    if dq is not None:
        dq *= scale
    if dk is not None:
        dk *= scale
