"""Fused neural-network ops with hand-derived backwards: softmax, log_softmax,
cross_entropy (log-softmax + NLL with label smoothing), layer_norm; plus
embedding and dropout.

Each backward is derived in docs/derivations.md and gradient-checked in
tests/test_ops_fused.py.
"""

from __future__ import annotations

import math

from .. import backend, random
from ..tensor import Tensor
from ._core import needs, normalize_axis, register, result, tensors


@register
def softmax(a, axis=-1):
    """y = exp(a - max) / sum(exp(a - max)) along `axis`.

    Backward: da = y * (g - sum(g * y, axis)).   (docs/derivations.md#softmax)
    """
    (a,) = tensors("softmax", a)
    normalize_axis("softmax", axis, a.ndim)          # an out-of-range axis names the op
    xp = a.xp
    e = xp.exp(a.data - a.data.max(axis=axis, keepdims=True))
    y = e / e.sum(axis=axis, keepdims=True)

    def backward(g):
        gy = g * y
        return (gy - y * gy.sum(axis=axis, keepdims=True),)
    return result(y, (a,), backward, "softmax")


@register
def log_softmax(a, axis=-1):
    """y = a - max - log(sum(exp(a - max))) along `axis`.

    Backward: da = g - exp(y) * sum(g, axis).   (docs/derivations.md#log-softmax)
    """
    (a,) = tensors("log_softmax", a)
    normalize_axis("log_softmax", axis, a.ndim)
    xp = a.xp
    shifted = a.data - a.data.max(axis=axis, keepdims=True)
    y = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))

    def backward(g):
        return (g - xp.exp(y) * g.sum(axis=axis, keepdims=True),)
    return result(y, (a,), backward, "log_softmax")


@register
def cross_entropy(logits, target, ignore_index: int = -100, label_smoothing: float = 0.0,
                  reduction: str = "mean"):
    """Cross-entropy between logits and integer class targets (torch.nn.functional.cross_entropy).

    logits: (C,), (N, C) or (N, C, d1, ...), classes on axis 1 as in torch.
    target: integer (), (N,) or (N, d1, ...); entries equal to `ignore_index`
    contribute nothing. With p = softmax(logits), eps = label_smoothing and
    q = (1 - eps) onehot(target) + eps / C, each loss is -sum_c q_c log p_c.
    reduction: "mean" (over non-ignored targets), "sum" or "none". With every
    target ignored, "mean" is nan (0/0) and the gradient zero, as in torch.

    Backward: dlogits = (p - q) * g / n, masked where ignored.   (docs/derivations.md#cross-entropy)
    """
    (x,) = tensors("cross_entropy", logits)
    t = target.data if isinstance(target, Tensor) else target
    xp = x.xp
    if not backend.is_array(t):
        t = xp.asarray(t)
    if backend.device_of(t) != x.device:
        raise backend.DeviceMismatchError(f"cross_entropy: target is on {backend.device_of(t)} but logits are on {x.device}")
    if t.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: target must hold integer class indices; got dtype {t.dtype}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none'; got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1]; got {label_smoothing}")
    expected = x.shape[1:] if x.ndim == 1 else (x.shape[:1] + x.shape[2:])
    expected = () if x.ndim == 1 else expected
    if x.ndim == 0 or tuple(t.shape) != tuple(expected):
        raise ValueError(f"cross_entropy: logits of shape {x.shape} need target of shape {expected} "
                         f"(classes on axis 1); got target of shape {tuple(t.shape)}")

    C = x.shape[0] if x.ndim == 1 else x.shape[1]
    z = x.data if x.ndim <= 2 else xp.moveaxis(x.data, 1, -1)   # (..., C)
    z = z.reshape(-1, C)                                         # (M, C)
    tf = t.reshape(-1)                                           # (M,)
    valid = tf != ignore_index
    safe = xp.where(valid, tf, 0)
    if tf.size and (int(safe.min()) < 0 or int(safe.max()) >= C):
        bad = int(safe.max()) if int(safe.max()) >= C else int(safe.min())
        raise IndexError(f"cross_entropy: target {bad} is out of range for {C} classes")

    shifted = z - z.max(axis=1, keepdims=True)
    logp = shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))   # (M, C)
    rows = xp.arange(z.shape[0])
    nll = -logp[rows, safe]                                                # (M,)
    eps = float(label_smoothing)
    per = (1.0 - eps) * nll - eps * logp.mean(axis=1) if eps else nll
    vmask = valid.astype(z.dtype)
    per = per * vmask
    n_valid = valid.sum()
    if reduction == "mean":
        out = per.sum() / n_valid.astype(z.dtype)
    elif reduction == "sum":
        out = per.sum()
    else:
        out = per.reshape(t.shape)

    def backward(g):
        d = xp.exp(logp)                                  # p, (M, C)
        d[rows, safe] -= 1.0 - eps
        if eps:
            d -= eps / C
        if reduction == "none":
            scale = g.reshape(-1) * vmask
        elif reduction == "sum":
            scale = g * vmask
        else:
            # every target ignored: the loss is 0/0 = nan, but the gradient is 0 (as in torch)
            scale = (g / xp.maximum(n_valid, 1).astype(z.dtype)) * vmask
        d *= scale[:, None]
        if x.ndim <= 2:
            return (d.reshape(x.shape),)
        moved = d.reshape(x.shape[:1] + x.shape[2:] + (C,))
        return (xp.moveaxis(moved, -1, 1),)
    return result(out, (x,), backward, "cross_entropy")


@register
def layer_norm(a, normalized_shape, weight=None, bias=None, eps: float = 1e-5):
    """Normalize over the trailing `normalized_shape` axes, then scale and shift.

    y = xhat * weight + bias,  xhat = (a - mean) / sqrt(var + eps)  (biased var).
    Backward, with dxhat = g * weight and means over the normalized axes:
      da = (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) / sqrt(var + eps)
      dweight = sum(g * xhat), dbias = sum(g)  over the other axes.
    (docs/derivations.md#layer-norm)
    """
    normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    ins = [a] + [p for p in (weight, bias) if p is not None]
    ts = tensors("layer_norm", *ins)
    a = ts[0]
    w = ts[1] if weight is not None else None
    b = ts[-1] if bias is not None else None
    k = len(normalized_shape)
    if k == 0 or a.shape[a.ndim - k:] != normalized_shape:
        raise ValueError(f"layer_norm: input of shape {a.shape} does not end with normalized_shape {normalized_shape}")
    for name, p in (("weight", w), ("bias", b)):
        if p is not None and p.shape != normalized_shape:
            raise ValueError(f"layer_norm: {name} has shape {p.shape}; expected normalized_shape {normalized_shape}")
    xp = a.xp
    n = math.prod(normalized_shape)
    inv_n = 1.0 / n
    # Rows of n normalized values. Row sums are matrix-vector products with a vector of ones
    # (BLAS, no temporary) and sums of products are einsum contractions (no temporary): this op
    # runs twice per block on every token, and its reductions cost more than its arithmetic.
    x2 = a.data.reshape(-1, n)                                       # (R, n)
    ones = xp.ones(n, dtype=x2.dtype)
    mu = x2 @ ones
    mu *= inv_n
    xhat = x2 - mu[:, None]                                          # x - mean
    rstd = xp.einsum("ij,ij->i", xhat, xhat)
    rstd *= inv_n
    rstd += eps
    xp.sqrt(rstd, out=rstd)
    xp.divide(1.0, rstd, out=rstd)                                   # 1 / sqrt(var + eps)
    rstd = rstd[:, None]
    xhat *= rstd
    wf = w.data.reshape(n) if w is not None else None
    out = xhat * wf if w is not None else xhat
    if b is not None:
        out = out + b.data.reshape(n) if w is None else out.__iadd__(b.data.reshape(n))
    out = out.reshape(a.shape)
    a_shape, need_a = a.shape, needs(a)     # not `a` itself: its data is not needed here

    def backward(g):
        g2 = g.reshape(-1, n)
        dxhat = g2 * wf if w is not None else g2
        da = None
        if need_a:
            m1 = dxhat @ ones
            m1 *= inv_n                                              # mean(dxhat)
            m2 = xp.einsum("ij,ij->i", dxhat, xhat)
            m2 *= inv_n                                              # mean(dxhat * xhat)
            da = xhat * m2[:, None]
            da += m1[:, None]
            xp.subtract(dxhat, da, out=da)
            da *= rstd
            da = da.reshape(a_shape)
        grads = [da]
        if w is not None:
            grads.append(xp.einsum("ij,ij->j", g2, xhat).reshape(normalized_shape) if needs(w) else None)
        if b is not None:
            grads.append((xp.ones(g2.shape[0], dtype=g2.dtype) @ g2).reshape(normalized_shape) if needs(b) else None)
        return tuple(grads)
    return result(out, ts, backward, "layer_norm")


@register
def embedding(weight, indices):
    """Rows of `weight` (V, D) picked by integer `indices` (any shape) -> (*indices.shape, D).

    Backward: scatter-add the output gradient's rows into a zero (V, D) array.
    """
    (w,) = tensors("embedding", weight)
    idx = indices.data if isinstance(indices, Tensor) else indices
    if not backend.is_array(idx):
        idx = w.xp.asarray(idx)
    if backend.device_of(idx) != w.device:
        raise backend.DeviceMismatchError(f"embedding: indices are on {backend.device_of(idx)} but weight is on {w.device}")
    if idx.dtype.kind not in "iu":
        raise TypeError(f"embedding: indices must be integers; got dtype {idx.dtype}")
    if w.ndim != 2:
        raise ValueError(f"embedding: weight must be 2-D (num_embeddings, embedding_dim); got shape {w.shape}")
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= w.shape[0]):
        bad = int(idx.max()) if int(idx.max()) >= w.shape[0] else int(idx.min())
        raise IndexError(f"embedding: index {bad} is out of range for {w.shape[0]} rows")
    out = w.data[idx]

    def backward(g):
        full = w.xp.zeros(w.shape, dtype=g.dtype)
        backend.scatter_add(full, idx.reshape(-1), g.reshape(-1, w.shape[1]))
        return (full,)
    return result(out, (w,), backward, "embedding")


@register
def dropout(a, p: float = 0.5, training: bool = True, generator=None):
    """Zero each element with probability `p` and scale the rest by 1/(1-p); identity when not training.

    generator: a backend random generator (npformer.random.Generator); the
    global one (npformer.manual_seed) when None. Backward: g * mask / (1 - p).
    """
    (a,) = tensors("dropout", a)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p must be in [0, 1]; got {p}")
    if not training or p == 0.0:
        return a
    if p == 1.0:
        return mul_const(a, a.xp.zeros((), dtype=a.dtype))
    rng = generator if generator is not None else random.default_generator(a.device)
    keep = rng.random(a.shape, dtype=a.dtype if a.dtype.kind == "f" else None) >= p
    scale = keep.astype(a.dtype) * (1.0 / (1.0 - p))
    return mul_const(a, scale, name="dropout")


def mul_const(a, c, name="mul_const"):
    """a * c for a constant array c of broadcastable shape (no gradient to c)."""
    return result(a.data * c, (a,), lambda g: (g * c,), name)
