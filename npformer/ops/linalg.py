"""Matrix product with NumPy's ``matmul`` rules: batched, broadcasting batch axes, 1-D operands."""

from __future__ import annotations

from ._core import needs, register, result, shape_error, tensors, unbroadcast


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
