"""Fused scaled dot-product attention: one graph node for softmax(q k^T * scale + mask) v.

The derivation of the backward is in docs/derivations.md#attention; the op is
gradient-checked in tests/test_ops_attention.py and compared with torch in
tests/test_verify_ops.py.
"""

from __future__ import annotations

from .. import backend, random
from ._core import needs, register, result, shape_error, tensors, unbroadcast

CAUSAL_BLOCK = 64   # query rows per block of the causal path (below 2 blocks it is not used)


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
    """
    q, k, v = tensors("attention", q, k, v)
    xp = q.xp
    if q.ndim < 2 or k.ndim < 2 or v.ndim < 2 or q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise shape_error("attention", q.shape, k.shape, v.shape,
                          why="(query (..., L, E), key (..., S, E), value (..., S, Ev)) do not fit together")
    if causal:
        if mask is not None:
            raise ValueError("attention: causal=True cannot be combined with a mask")
        L, S = q.shape[-2], k.shape[-2]
        if (L == S and L >= 2 * CAUSAL_BLOCK and dropout_p == 0.0
                and q.shape[:-2] == k.shape[:-2] == v.shape[:-2]):
            return _causal_blocks(q, k, v, scale)
        mask = xp.tri(L, S, dtype=bool)
    # The scale goes on q (L x E), and in the backward on dq and dk, rather than on the
    # larger (L x S) scores; masks are applied in place where they do not enlarge the scores.
    s = (q.data * scale) @ k.data.swapaxes(-1, -2)                     # (..., L, S)
    if mask is not None:
        if backend.device_of(mask) != q.device:
            raise backend.DeviceMismatchError(f"attention: mask is on {backend.device_of(mask)} but q is on {q.device}")
        in_place = xp.broadcast_shapes(mask.shape, s.shape) == s.shape
        if mask.dtype == bool:
            if in_place:                                               # adding a small 0/-inf table is
                s += xp.where(mask, 0, -xp.inf).astype(s.dtype)        # faster than a masked write
            else:
                s = xp.where(mask, s, -xp.inf)                         # broadcasts s up to the mask's shape
        elif in_place:
            s += mask
        else:
            s = s + mask.astype(s.dtype, copy=False)
    m = s.max(axis=-1, keepdims=True)                                  # (..., L, 1)
    if mask is not None:
        m[m == -xp.inf] = 0                                            # a dead row: exp(-inf - 0) = 0
    p = s
    p -= m
    xp.exp(p, out=p)
    denom = p.sum(axis=-1, keepdims=True)
    if mask is not None:
        xp.maximum(denom, 1, out=denom)                                # dead rows: 0 / 1 = 0
    p /= denom                                                         # P (..., L, S)
    w = p
    scale_d = None
    if dropout_p > 0.0:
        rng = generator if generator is not None else random.default_generator(q.device)
        scale_d = (rng.random(p.shape, dtype=p.dtype) >= dropout_p).astype(p.dtype)
        scale_d *= 1.0 / (1.0 - dropout_p)
        w = p * scale_d
    out = w @ v.data                                                   # (..., L, Ev)

    def backward(g):
        dv = dq = dk = None
        if needs(v):
            dv = unbroadcast(w.swapaxes(-1, -2) @ g, v.shape)
        if needs(q) or needs(k):
            ds = g @ v.data.swapaxes(-1, -2)                           # dW (..., L, S)
            if scale_d is not None:
                ds *= scale_d                                          # dP
            ds -= xp.einsum("...ij,...ij->...i", ds, p)[..., None]       # row sums of dP * P
            ds *= p                                                    # dS / scale
            if needs(q):
                dq = ds @ k.data
                dq *= scale
                dq = unbroadcast(dq, q.shape)
            if needs(k):
                dk = ds.swapaxes(-1, -2) @ q.data
                dk *= scale
                dk = unbroadcast(dk, k.shape)
        return dq, dk, dv
    return result(out, (q, k, v), backward, "attention")


def _causal_blocks(q, k, v, scale: float):
    """Causal self-attention with the queries in row blocks [i0, i1), each against keys [0, i1).

    Block by block this is the computation above with the keys a block cannot see left
    out (their weights are exactly 0 there); only the block's last i1 - i0 keys need the
    triangular mask. The gradients of dv and dk sum over the blocks.
    """
    xp = q.xp
    T = q.shape[-2]
    n = -(-T // CAUSAL_BLOCK)
    edges = [round(T * j / n) for j in range(n + 1)]
    blocks = list(zip(edges[:-1], edges[1:]))
    width = max(i1 - i0 for i0, i1 in blocks)
    table = xp.where(xp.tri(width, width, dtype=bool), 0, -xp.inf).astype(q.dtype)   # 0 / -inf
    qs = q.data * scale
    out = xp.empty(q.shape[:-1] + v.shape[-1:], dtype=xp.result_type(q.data, v.data))
    probs = []
    for i0, i1 in blocks:
        p = qs[..., i0:i1, :] @ k.data[..., :i1, :].swapaxes(-1, -2)   # (..., i1 - i0, i1)
        p[..., i0:] += table[:i1 - i0, :i1 - i0]
        p -= p.max(axis=-1, keepdims=True)
        xp.exp(p, out=p)
        p /= p.sum(axis=-1, keepdims=True)
        xp.matmul(p, v.data[..., :i1, :], out=out[..., i0:i1, :])
        probs.append(p)

    def backward(g):
        dv = xp.zeros_like(v.data) if needs(v) else None
        dq = xp.empty_like(q.data) if needs(q) else None
        dk = xp.zeros_like(k.data) if needs(k) else None
        for (i0, i1), p in zip(blocks, probs):
            gb = g[..., i0:i1, :]
            if dv is not None:
                dv[..., :i1, :] += p.swapaxes(-1, -2) @ gb
            if dq is not None or dk is not None:
                ds = gb @ v.data[..., :i1, :].swapaxes(-1, -2)
                ds -= xp.einsum("...ij,...ij->...i", ds, p)[..., None]
                ds *= p
                if dq is not None:
                    xp.matmul(ds, k.data[..., :i1, :], out=dq[..., i0:i1, :])
                if dk is not None:
                    dk[..., :i1, :] += ds.swapaxes(-1, -2) @ q.data[..., i0:i1, :]
        if dq is not None:
            dq *= scale
        if dk is not None:
            dk *= scale
        return dq, dk, dv
    return result(out, (q, k, v), backward, "attention")
