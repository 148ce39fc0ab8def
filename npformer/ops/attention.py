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
    L, S = q.shape[-2], k.shape[-2]
    if causal:
        if mask is not None:
            raise ValueError("attention: causal=True cannot be combined with a mask")
        if (L == S and L >= 2 * CAUSAL_BLOCK and dropout_p == 0.0
                and q.shape[:-2] == k.shape[:-2] == v.shape[:-2]):
            return _causal_blocks(q, k, v, scale)
    # The scale goes on q (L x E), and in the backward on dq and dk, rather than on the
    # larger (S x L) scores; masks are applied in place where they do not enlarge the scores.
    z = k.data @ (q.data * scale).swapaxes(-1, -2)                     # s^T (..., S, L)
    live = mask is None             # no query can be left without keys (causal: query i sees key i)
    if causal:
        z += xp.where(xp.tri(L, S, dtype=bool).T, 0, -xp.inf).astype(z.dtype)   # key j sees query i >= j
    elif mask is not None:
        if backend.device_of(mask) != q.device:
            raise backend.DeviceMismatchError(f"attention: mask is on {backend.device_of(mask)} but q is on {q.device}")
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
    w = p
    scale_d = None
    if dropout_p > 0.0:
        rng = generator if generator is not None else random.default_generator(q.device)
        # drawn in (..., L, S) order, element (i, j) for query i and key j, then viewed as (S, L)
        drawn = rng.random(p.shape[:-2] + (L, S), dtype=p.dtype)
        scale_d = (drawn >= dropout_p).astype(p.dtype).swapaxes(-1, -2)
        scale_d *= 1.0 / (1.0 - dropout_p)
        w = p * scale_d
    out = w.swapaxes(-1, -2) @ v.data                                  # (..., L, Ev)

    def backward(g):
        dv = dq = dk = None
        if needs(v):
            dv = unbroadcast(w @ g, v.shape)
        if needs(q) or needs(k):
            dz = v.data @ g.swapaxes(-1, -2)                           # dW^T (..., S, L)
            if scale_d is not None:
                dz *= scale_d                                          # dP^T
            _softmax_backward_columns(dz, p, xp)                       # dS^T / scale
            if needs(q):
                dq = dz.swapaxes(-1, -2) @ k.data
                dq *= scale
                dq = unbroadcast(dq, q.shape)
            if needs(k):
                dk = dz @ q.data
                dk *= scale
                dk = unbroadcast(dk, k.shape)
        return dq, dk, dv
    return result(out, (q, k, v), backward, "attention")


def _causal_blocks(q, k, v, scale: float):
    """Causal self-attention with the queries in blocks [i0, i1), each against keys [0, i1).

    Block by block this is the computation above with the keys a block cannot see left
    out (their weights are exactly 0 there); only the block's last i1 - i0 keys need the
    triangular mask. The gradients of dv and dk sum over the blocks. Scores are held
    transposed, (i1 keys, i1 - i0 queries), as in `attention`.
    """
    xp = q.xp
    T = q.shape[-2]
    n = -(-T // CAUSAL_BLOCK)
    edges = [round(T * j / n) for j in range(n + 1)]
    blocks = list(zip(edges[:-1], edges[1:]))
    width = max(i1 - i0 for i0, i1 in blocks)
    table = xp.where(xp.tri(width, width, dtype=bool).T, 0, -xp.inf).astype(q.dtype)   # [key, query]: 0 / -inf
    qs = q.data * scale
    out = xp.empty(q.shape[:-1] + v.shape[-1:], dtype=xp.result_type(q.data, v.data))
    probs = []
    for i0, i1 in blocks:
        z = k.data[..., :i1, :] @ qs[..., i0:i1, :].swapaxes(-1, -2)  # (..., i1, i1 - i0)
        z[..., i0:, :] += table[:i1 - i0, :i1 - i0]
        p = _softmax_columns(z, xp, live=True)
        xp.matmul(p.swapaxes(-1, -2), v.data[..., :i1, :], out=out[..., i0:i1, :])
        probs.append(p)

    def backward(g):
        dv = xp.zeros_like(v.data) if needs(v) else None
        dq = xp.empty_like(q.data) if needs(q) else None
        dk = xp.zeros_like(k.data) if needs(k) else None
        for (i0, i1), p in zip(blocks, probs):
            gb = g[..., i0:i1, :]
            if dv is not None:
                dv[..., :i1, :] += p @ gb
            if dq is not None or dk is not None:
                dz = v.data[..., :i1, :] @ gb.swapaxes(-1, -2)
                _softmax_backward_columns(dz, p, xp)
                if dq is not None:
                    xp.matmul(dz.swapaxes(-1, -2), k.data[..., :i1, :], out=dq[..., i0:i1, :])
                if dk is not None:
                    dk[..., :i1, :] += dz @ q.data[..., i0:i1, :]
        if dq is not None:
            dq *= scale
        if dk is not None:
            dk *= scale
        return dq, dk, dv
    return result(out, (q, k, v), backward, "attention")
