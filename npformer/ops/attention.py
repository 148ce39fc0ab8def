"""Fused scaled dot-product attention: one graph node for softmax(q k^T * scale + mask) v.

The derivation of the backward is in docs/derivations.md#attention; the op is
gradient-checked in tests/test_ops_attention.py and compared with torch in
tests/test_verify_ops.py.
"""

from __future__ import annotations

from .. import backend, random
from ._core import needs, register, result, shape_error, tensors, unbroadcast


@register
def attention(q, k, v, mask=None, scale: float = 1.0, dropout_p: float = 0.0, generator=None):
    """out = W v with W = softmax(q k^T * scale + mask) (then dropout), over the last axis.

    q: (..., L, E); k: (..., S, E); v: (..., S, Ev); batch axes broadcast. mask: None,
    a bool array broadcastable to (..., L, S) with True = attend, or a float array that
    is added to the scores. A row with no attended key gets all-zero weights (its
    softmax denominator, otherwise >= 1, is clamped to 1), hence zero output and zero
    gradients. Returns out (..., L, Ev).

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
