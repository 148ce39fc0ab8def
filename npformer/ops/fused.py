"""Fused neural-network ops with hand-derived backwards: softmax, log_softmax,
cross_entropy (log-softmax + NLL with label smoothing), layer_norm, rms_norm; plus
embedding and dropout.

Each backward is derived in docs/derivations.md and gradient-checked in
tests/test_ops_fused.py (rms_norm's in tests/test_ops_rms_norm.py). The fast layer_norm and
embedding are in npformer/fast/fused.py.
"""

from __future__ import annotations

from .. import backend, random
from ._core import constant, normalize_axis, register, result, tensors


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
    y = log_softmax_array(a.data, axis, xp)

    def backward(g):
        return (g - xp.exp(y) * g.sum(axis=axis, keepdims=True),)
    return result(y, (a,), backward, "log_softmax")


def log_softmax_array(a, axis, xp):
    """a - max - log(sum(exp(a - max))) along `axis`: the log-softmax of an array (log_softmax, cross_entropy)."""
    shifted = a - a.max(axis=axis, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))


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
    t = constant("cross_entropy", target, x, "target is", "logits are")
    xp = x.xp
    if t.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: target must hold integer class indices; got dtype {t.dtype}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none'; got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1]; got {label_smoothing}")
    if x.ndim == 0:
        raise ValueError("cross_entropy: logits must be (C,), (N, C) or (N, C, d1, ...); got a 0-d tensor")
    expected = () if x.ndim == 1 else x.shape[:1] + x.shape[2:]
    if tuple(t.shape) != tuple(expected):
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

    logp = log_softmax_array(z, 1, xp)                                     # (M, C)
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

    mu = mean(x), xc = x - mu, v = mean(xc^2) (biased), rstd = (v + eps)^(-1/2),
    xhat = xc * rstd, y = xhat * weight + bias. Backward, with dxhat = g * weight and
    means over the normalized axes:
      dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
      dweight = sum(g * xhat), dbias = sum(g)  over the other axes.
    The backward keeps xhat and rstd.   (docs/derivations.md#layer-norm)
    """
    a, w, b, normalized_shape = check_layer_norm(a, normalized_shape, weight, bias)
    x = a.data
    norm = tuple(range(x.ndim - len(normalized_shape), x.ndim))      # the normalized axes
    lead = tuple(range(x.ndim - len(normalized_shape)))               # the others
    mu = x.mean(axis=norm, keepdims=True)
    xc = x - mu
    v = (xc * xc).mean(axis=norm, keepdims=True)
    rstd = (v + eps) ** -0.5
    xhat = xc * rstd
    y = xhat
    if w is not None:
        y = y * w.data
    if b is not None:
        y = y + b.data

    def backward(g):
        dxhat = g * w.data if w is not None else g
        dx = rstd * (dxhat - dxhat.mean(axis=norm, keepdims=True)
                     - xhat * (dxhat * xhat).mean(axis=norm, keepdims=True))
        dweight = (g * xhat).sum(axis=lead) if w is not None else None
        dbias = g.sum(axis=lead) if b is not None else None
        return tuple(d for d, p in ((dx, a), (dweight, w), (dbias, b)) if p is not None)
    return result(y, tuple(p for p in (a, w, b) if p is not None), backward, "layer_norm")


def check_layer_norm(a, normalized_shape, weight, bias):
    """(a, weight or None, bias or None) as Tensors on one device and normalized_shape as a
    tuple; raise unless a ends with normalized_shape and weight and bias have that shape."""
    return check_norm("layer_norm", a, normalized_shape, weight, bias)


def check_norm(name: str, a, normalized_shape, weight, bias):
    """check_layer_norm for op `name` (layer_norm, rms_norm), whose errors name it."""
    normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    ts = tensors(name, a, *(p for p in (weight, bias) if p is not None))
    a = ts[0]
    w = ts[1] if weight is not None else None
    b = ts[-1] if bias is not None else None
    k = len(normalized_shape)
    if a.dtype.kind != "f":
        raise TypeError(f"{name}: the input must be floating point; got {a.dtype} (cast it with .astype)")
    if k == 0 or a.shape[a.ndim - k:] != normalized_shape:
        raise ValueError(f"{name}: input of shape {a.shape} does not end with normalized_shape {normalized_shape}")
    for what, p in (("weight", w), ("bias", b)):
        if p is not None and p.shape != normalized_shape:
            raise ValueError(f"{name}: {what} has shape {p.shape}; expected normalized_shape {normalized_shape}")
    return a, w, b, normalized_shape


@register
def rms_norm(a, normalized_shape, weight=None, eps=None):
    """Divide by the root mean square over the trailing `normalized_shape` axes, then scale
    (torch.nn.functional.rms_norm; LLaMA's norm, a layer norm without the centring and the bias).

    ms = mean(x^2), rstd = (ms + eps)^(-1/2), xhat = x * rstd, y = xhat * weight.
    eps=None: rms_norm_eps(dtype), the machine epsilon, as torch. Backward, with
    dxhat = g * weight and means over the normalized axes:
      dx = rstd * (dxhat - xhat * mean(dxhat * xhat))
      dweight = sum(g * xhat)  over the other axes.
    The backward keeps xhat and rstd.   (docs/derivations.md#rms-norm)
    """
    a, w, _, normalized_shape = check_norm("rms_norm", a, normalized_shape, weight, None)
    x = a.data
    norm = tuple(range(x.ndim - len(normalized_shape), x.ndim))      # the normalized axes
    lead = tuple(range(x.ndim - len(normalized_shape)))               # the others
    eps = rms_norm_eps(a.xp, x.dtype) if eps is None else eps
    ms = (x * x).mean(axis=norm, keepdims=True)
    rstd = (ms + eps) ** -0.5
    xhat = x * rstd
    y = xhat * w.data if w is not None else xhat

    def backward(g):
        dxhat = g * w.data if w is not None else g
        dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(axis=norm, keepdims=True))
        if w is None:
            return (dx,)
        return dx, (g * xhat).sum(axis=lead)
    return result(y, (a,) if w is None else (a, w), backward, "rms_norm")


def rms_norm_eps(xp, dtype) -> float:
    """rms_norm's eps when none is given: torch.finfo(dtype).eps for float32 and float64, and
    float32's for float16 (torch computes a float16 rms_norm in float32, with float32's eps)."""
    return float(xp.finfo(xp.promote_types(dtype, xp.float32)).eps)


@register
def embedding(weight, indices):
    """Rows of `weight` (V, D) picked by integer `indices` (any shape) -> (*indices.shape, D).

    Backward: scatter-add the output gradient's rows into a zero (V, D) array,
    dweight[indices[n]] += g[n] for every n (a row picked twice gets both).
    """
    return embedding_with(weight, indices, backend.scatter_add)


def embedding_with(weight, indices, scatter_add):
    """embedding, its backward adding the rows with `scatter_add(dweight, idx, g)`: backend.scatter_add
    here, backend.scatter_add_rows in npformer/fast/fused.py."""
    w, idx = check_embedding(weight, indices)
    out = w.data[idx]

    def backward(g):
        dweight = w.xp.zeros(w.shape, dtype=g.dtype)
        scatter_add(dweight, idx, g)
        return (dweight,)
    return result(out, (w,), backward, "embedding")


def check_embedding(weight, indices):
    """(weight as a Tensor, indices as an array on its device); raise unless they fit."""
    (w,) = tensors("embedding", weight)
    idx = constant("embedding", indices, w, "indices are", "weight is")
    if idx.dtype.kind not in "iu":
        raise TypeError(f"embedding: indices must be integers; got dtype {idx.dtype}")
    if w.ndim != 2:
        raise ValueError(f"embedding: weight must be 2-D (num_embeddings, embedding_dim); got shape {w.shape}")
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= w.shape[0]):
        bad = int(idx.max()) if int(idx.max()) >= w.shape[0] else int(idx.min())
        raise IndexError(f"embedding: index {bad} is out of range for {w.shape[0]} rows")
    return w, idx


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
        return mul_const(a, a.xp.zeros((), dtype=a.dtype), name="dropout")
    rng = generator if generator is not None else random.default_generator(a.device)
    # uniforms in float32 for a float32 input; float64 for the rest (generators cannot draw float16)
    keep = rng.random(a.shape, dtype="float32" if a.dtype == "float32" else "float64") >= p
    scale = keep.astype(a.dtype) * (1.0 / (1.0 - p))
    return mul_const(a, scale, name="dropout")


def mul_const(a, c, name: str):
    """a * c for a constant array c of broadcastable shape (no gradient to c)."""
    return result(a.data * c, (a,), lambda g: (g * c,), name)
