"""Fast attention and self_attention: the reference ops of npformer/ops/attention.py, faster.

Three changes of layout, none of algebra (docs/derivations.md#transposed-scores):

- Transposed scores. Every (L, S) array is held as its transpose (..., S, L), keys on the
  rows: Z = S^T = k (q * scale)^T. The softmax then reduces over axis -2, where NumPy's max
  is an elementwise maximum over contiguous rows (3x faster than its max along a short last
  axis), row sums are products with a vector of ones, and the updates are in place.
- Causal query blocks. causal=True self-attention (L == S, equal batch axes, no dropout, no
  bias) takes the queries in blocks of `causal_block` rows, each against only the keys it can see.
- Packed heads. self_attention reads q, k, v as strided views of the packed projections and
  writes the output (and, in the backward, dq, dk, dv) in place: no split, no merge copy.

Tested equal to the reference in float64 in tests/test_fast.py.
"""

from __future__ import annotations

from ..ops._core import needs, register_fast, result, tensors
from ..ops.attention import check_attention, dropout_scale, input_grads, packed_heads

CAUSAL_BLOCK = 64   # query rows per block of the causal path (below 2 blocks it is not used)


@register_fast
def attention(q, k, v, mask=None, scale: float = 1.0, dropout_p: float = 0.0, generator=None,
              causal: bool = False, bias=None, causal_block: int = CAUSAL_BLOCK):
    """npformer.ops.attention, with the scores transposed and causal self-attention in blocks.

    causal_block: query rows per block of the causal path; it is taken for self-attention
    (L == S, equal batch axes, no dropout, no bias) of at least two blocks.
    """
    q, k, v = tensors("attention", q, k, v)
    mask, bias = check_attention(q, k, v, mask, bias, causal)
    xp = q.xp
    if causal and bias is None and _blockable(q.shape, k.shape, v.shape, dropout_p, causal_block):
        out = xp.empty(q.shape[:-1] + v.shape[-1:], dtype=xp.result_type(q.data, k.data, v.data))
        blocks, probs = _blocks_forward(xp, q.data, k.data, v.data, scale, out, causal_block)

        def backward(g):
            dv = xp.zeros_like(v.data) if needs(v) else None
            dq = xp.empty_like(q.data) if needs(q) else None
            dk = xp.zeros_like(k.data) if needs(k) else None
            _blocks_backward(xp, g, q.data, k.data, v.data, scale, blocks, probs, dq, dk, dv)
            return dq, dk, dv
        return result(out, (q, k, v), backward, "attention")

    saved = _weights(xp, q.data, k.data, scale, mask, None if bias is None else bias.data, causal, dropout_p,
                     generator, q.device)
    out = saved[1].swapaxes(-1, -2) @ v.data                           # W v (..., L, Ev)
    inputs = (q, k, v) if bias is None else (q, k, v, bias)

    def backward(g):
        grads = _general_backward(xp, g, q.data, k.data, v.data, scale, saved, *(needs(t) for t in inputs))
        return input_grads(inputs, grads)
    return result(out, inputs, backward, "attention")


@register_fast
def self_attention(qkv, n_head: int, scale=None, causal: bool = False, dropout_p: float = 0.0, generator=None,
                   causal_block: int = CAUSAL_BLOCK):
    """npformer.ops.self_attention without its split, merge and their copies.

    The heads are strided views of qkv, the output is written in merged layout, and the
    backward writes dq, dk and dv straight into one (..., T, 3 E) gradient. Same floats.
    """
    (x,) = tensors("self_attention", qkv)
    xp = x.xp
    batch, T, n_head, D, scale = packed_heads(x, n_head, scale)
    heads = x.data.reshape(batch + (T, 3, n_head, D))
    q, k, v = (heads[..., i, :, :].swapaxes(-3, -2) for i in range(3))   # 3 x (..., n_head, T, D) views
    out = xp.empty(batch + (T, n_head, D), dtype=x.dtype)
    out_heads = out.swapaxes(-3, -2)                                   # (..., n_head, T, D) view
    if causal and _blockable(q.shape, k.shape, v.shape, dropout_p, causal_block):
        blocks, probs = _blocks_forward(xp, q, k, v, scale, out_heads, causal_block)
        saved = None
    else:
        saved = _weights(xp, q, k, scale, None, None, causal, dropout_p, generator, x.device)
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


# ----------------------------------------------------------------------------- transposed scores

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


def _weights(xp, q, k, scale, mask, bias, causal, dropout_p, generator, device):
    """(P^T, W^T, D^T or None), each (..., S, L): the softmax weights, after dropout, and its scaling."""
    L, S = q.shape[-2], k.shape[-2]
    # The scale goes on q (L x E), and in the backward on dq and dk, rather than on the
    # larger (S x L) scores; the bias and the mask are applied in place where they do not
    # enlarge the scores.
    z = k @ (q * scale).swapaxes(-1, -2)                               # S^T (..., S, L)
    live = mask is None and bias is None    # no query can be left without keys (causal: query i sees key i)
    if bias is not None:
        z = _add_in_place(z, _transposed(bias), xp)
    if causal:
        z += xp.where(xp.tri(L, S, dtype=bool).T, 0, -xp.inf).astype(z.dtype)   # key j sees query i >= j
    elif mask is not None:                                             # bool, True = attend
        mask_t = _transposed(mask)
        if xp.broadcast_shapes(mask_t.shape, z.shape) == z.shape:      # adding a small 0/-inf table is
            z += xp.where(mask_t, 0, -xp.inf).astype(z.dtype)          # faster than a masked write
        else:
            z = xp.where(mask_t, z, -xp.inf)                           # broadcasts z up to the mask's shape
    p = _softmax_columns(z, xp, live)                                  # P^T (..., S, L)
    if dropout_p == 0.0:
        return p, p, None
    # drawn in (..., L, S) order, element (i, j) for query i and key j, then viewed as (S, L):
    # the reference's draws, so one seed gives the same mask on both paths
    scale_d = dropout_scale(p.shape[:-2] + (L, S), p.dtype, dropout_p, generator, device).swapaxes(-1, -2)
    return p, p * scale_d, scale_d


def _transposed(a):
    """A mask or bias broadcastable to (..., L, S) as a view broadcastable to (..., S, L)."""
    return a.reshape((1,) * (2 - a.ndim) + a.shape).swapaxes(-1, -2)


def _add_in_place(z, a, xp):
    """z + a, written into z where that does not enlarge it."""
    if xp.broadcast_shapes(a.shape, z.shape) != z.shape:
        return z + a
    z += a
    return z


def _general_backward(xp, g, q, k, v, scale, saved, want_q, want_k, want_v, want_bias=False, out=None):
    """(dq, dk, dv, dbias) of the full-score path, in broadcast shapes (None where not wanted).

    dbias = dS, the scores' gradient (..., L, S). out: (dq, dk, dv) arrays to write into (same
    shapes as q, k, v; no broadcasting), or None.
    """
    p, w, scale_d = saved
    dq_out, dk_out, dv_out = out if out is not None else (None, None, None)
    dq = dk = dv = dbias = None
    if want_v:
        dv = xp.matmul(w, g, out=dv_out)                               # W^T g
    if want_q or want_k or want_bias:
        dz = v @ g.swapaxes(-1, -2)                                    # dW^T (..., S, L)
        if scale_d is not None:
            dz *= scale_d                                              # dP^T
        _softmax_backward_columns(dz, p, xp)                           # dS^T
        if want_q:
            dq = xp.matmul(dz.swapaxes(-1, -2), k, out=dq_out)
            dq *= scale
        if want_k:
            dk = xp.matmul(dz, q, out=dk_out)
            dk *= scale
        if want_bias:
            dbias = xp.ascontiguousarray(dz.swapaxes(-1, -2))          # dS
    return dq, dk, dv, dbias


# ----------------------------------------------------------------------------- causal blocks

def _blockable(q_shape, k_shape, v_shape, dropout_p, causal_block) -> bool:
    """Whether causal attention takes the blocked path: self-attention of >= 2 blocks, no dropout."""
    L, S = q_shape[-2], k_shape[-2]
    return (L == S and L >= 2 * causal_block and dropout_p == 0.0
            and q_shape[:-2] == k_shape[:-2] == v_shape[:-2])


def _blocks_forward(xp, q, k, v, scale, out, causal_block):
    """Causal self-attention with the queries in blocks [i0, i1), each against keys [0, i1).

    Block by block this is the reference computation with the keys a block cannot see left
    out (their weights are exactly 0 there); only the block's last i1 - i0 keys need the
    triangular mask. Scores are held transposed, (i1 keys, i1 - i0 queries), as above.
    Writes out (..., T, Ev); returns (blocks, the blocks' P^T) for the backward.
    """
    T = q.shape[-2]
    n = -(-T // causal_block)
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
