"""Matrix product with NumPy's ``matmul`` rules: batched, broadcasting batch axes, 1-D operands."""

from __future__ import annotations

from ._core import needs, register, result, shape_error, tensors, unbroadcast
from .shape import transpose


@register
def matmul(a, b):
    """a @ b.  a: (..., n, k) or (k,); b: (..., k, m) or (k,); out: (..., n, m) minus 1-D axes.

    With A, B the operands promoted to 2-D (a 1-D `a` as a row, a 1-D `b` as a
    column) and G the output gradient promoted the same way:
    dA = G @ B^T and dB = A^T @ G, each summed over broadcast batch axes.
    """
    a, b = tensors("matmul", a, b)
    if a.ndim == 0 or b.ndim == 0:
        raise shape_error("matmul", a.shape, b.shape, why="are invalid: matmul needs operands with at least 1 dimension")
    k_a = a.shape[-1]
    k_b = b.shape[0] if b.ndim == 1 else b.shape[-2]
    if k_a != k_b:
        raise shape_error("matmul", a.shape, b.shape, why=f"are not aligned ({k_a} != {k_b})")
    if a.ndim > 2 and b.ndim == 2:
        # (..., n, k) @ (k, m): one GEMM over all rows instead of one per batch entry
        return linear(a, transpose(b), None, _name="matmul")
    try:
        out = a.data @ b.data
    except ValueError:
        raise shape_error("matmul", a.shape, b.shape, why="have batch axes that cannot be broadcast together") from None

    def backward(g):
        a2 = a.data if a.ndim > 1 else a.data[None, :]              # (..., n, k)
        b2 = b.data if b.ndim > 1 else b.data[:, None]              # (..., k, m)
        if a.ndim == 1:
            g = g[..., None, :] if b.ndim > 1 else g[..., None]
        if b.ndim == 1:
            g = g[..., None]                                        # (..., n, m)
        ga = gb = None
        if needs(a):
            ga = unbroadcast(g @ b2.swapaxes(-1, -2), a2.shape).reshape(a.shape)
        if needs(b):
            gb = unbroadcast(a2.swapaxes(-1, -2) @ g, b2.shape).reshape(b.shape)
        return ga, gb
    return result(out, (a, b), backward, "matmul")


@register
def linear(x, weight, bias=None, _name="linear"):
    """y = x @ weight^T + bias, as one GEMM over all leading axes (torch.nn.functional.linear).

    x: (..., in); weight: (out, in); bias: (out,) or None; y: (..., out).
    With X = x as (N, in) and G = dy as (N, out):
    dX = G @ weight, dweight = G^T @ X, dbias = sum over rows of G.
    """
    ts = tensors(_name, *((x, weight) if bias is None else (x, weight, bias)))
    x, w = ts[0], ts[1]
    b = ts[2] if bias is not None else None
    if x.ndim < 1 or w.ndim != 2 or x.shape[-1] != w.shape[1]:
        raise shape_error(_name, x.shape, w.shape, why=f"do not fit: input (..., in) needs weight (out, in) "
                                                        f"with in = {x.shape[-1] if x.ndim else '?'}")
    if b is not None and b.shape != (w.shape[0],):
        raise shape_error(_name, w.shape, b.shape, why="(weight, bias) do not fit: bias must be (out,)")
    n_in, n_out = w.shape[1], w.shape[0]
    xp = x.xp
    x2 = x.data.reshape(-1, n_in)                                       # (N, in)
    y = x2 @ w.data.T                                                   # (N, out)
    if b is not None:
        y += b.data
    out = y.reshape(x.shape[:-1] + (n_out,))

    def backward(g):
        g2 = g.reshape(-1, n_out)                                       # (N, out)
        grads = [(g2 @ w.data).reshape(x.shape) if needs(x) else None,
                 g2.T @ x2 if needs(w) else None]
        if b is not None:        # column sums as a matrix-vector product: about 2x faster than sum(axis=0)
            grads.append(xp.ones(g2.shape[0], dtype=g2.dtype) @ g2 if needs(b) else None)
        return tuple(grads)
    return result(out, ts, backward, _name)
