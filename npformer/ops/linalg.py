"""Matrix products: ``matmul`` with NumPy's rules (batched, broadcasting batch axes, 1-D operands),
and ``linear`` (x @ weight^T + bias). Their fast versions are in npformer/fast/linalg.py."""

from __future__ import annotations

from ._core import needs, register, result, shape_error, tensors, unbroadcast


@register
def matmul(a, b):
    """a @ b.  a: (..., n, k) or (k,); b: (..., k, m) or (k,); out: (..., n, m) minus 1-D axes.

    With A, B the operands promoted to 2-D (a 1-D `a` as a row, a 1-D `b` as a
    column) and G the output gradient promoted the same way:
    dA = G @ B^T and dB = A^T @ G, each summed over broadcast batch axes.
    """
    return matmul_checked(*check_matmul(a, b))


def matmul_checked(a, b):
    """matmul of Tensors that check_matmul has passed (the fast matmul's general case)."""
    try:
        out = a.data @ b.data
    except ValueError:
        raise shape_error("matmul", a.shape, b.shape, why="have batch axes that cannot be broadcast together") from None

    def backward(g):
        A = a.data if a.ndim > 1 else a.data[None, :]               # (..., n, k)
        B = b.data if b.ndim > 1 else b.data[:, None]               # (..., k, m)
        if a.ndim == 1:
            g = g[..., None, :] if b.ndim > 1 else g[..., None]
        if b.ndim == 1:
            g = g[..., None]                                        # G: (..., n, m)
        dA = unbroadcast(g @ B.swapaxes(-1, -2), A.shape).reshape(a.shape) if needs(a) else None
        dB = unbroadcast(A.swapaxes(-1, -2) @ g, B.shape).reshape(b.shape) if needs(b) else None
        return dA, dB
    return result(out, (a, b), backward, "matmul")


@register
def linear(x, weight, bias=None):
    """y = x @ weight^T + bias, as one GEMM over all leading axes (torch.nn.functional.linear).

    x: (..., in); weight: (out, in); bias: (out,) or None; y: (..., out).
    With X = x as (N, in) and G = dy as (N, out):
    dX = G @ weight, dweight = G^T @ X, dbias = sum over rows of G.
    """
    return linear_with(x, weight, bias, lambda G: G.sum(axis=0))


def linear_with(x, weight, bias, column_sum):
    """linear, its bias gradient taken as column_sum(G) (G: (N, out) -> (out,)); the fast linear's too."""
    x, w, b = check_linear(x, weight, bias)
    X = x.data.reshape(-1, w.shape[1])                                  # (N, in)
    y = X @ w.data.T                                                    # (N, out)
    if b is not None:
        y = y + b.data

    def backward(g):
        G = g.reshape(-1, w.shape[0])                                   # (N, out)
        dX = (G @ w.data).reshape(x.shape) if needs(x) else None
        dweight = G.T @ X if needs(w) else None
        dbias = column_sum(G) if b is not None and needs(b) else None
        return (dX, dweight) if b is None else (dX, dweight, dbias)
    parents = (x, w) if b is None else (x, w, b)
    return result(y.reshape(x.shape[:-1] + (w.shape[0],)), parents, backward, "linear")


# ----------------------------------------------------------------------------- shared with npformer/fast

def check_matmul(a, b):
    """(a, b) as Tensors; raise unless their last axes fit (the batch axes are NumPy's to check)."""
    a, b = tensors("matmul", a, b)
    if a.ndim == 0 or b.ndim == 0:
        raise shape_error("matmul", a.shape, b.shape,
                          why="are invalid: matmul needs operands with at least 1 dimension")
    k_a = a.shape[-1]
    k_b = b.shape[0] if b.ndim == 1 else b.shape[-2]
    if k_a != k_b:
        raise shape_error("matmul", a.shape, b.shape, why=f"are not aligned ({k_a} != {k_b})")
    return a, b


def check_linear(x, weight, bias):
    """(x, weight, bias or None) as Tensors on one device; raise unless x (..., in), weight (out, in), bias (out,)."""
    ts = tensors("linear", *((x, weight) if bias is None else (x, weight, bias)))
    x, w = ts[0], ts[1]
    b = ts[2] if bias is not None else None
    if x.ndim < 1 or w.ndim != 2 or x.shape[-1] != w.shape[1]:
        n_in = w.shape[-1] if w.ndim else "?"
        raise ValueError(f"linear: input of shape {x.shape} does not match weight of shape {w.shape} "
                         f"(expected input (..., in) and weight (out, in), here input (..., {n_in}))")
    if b is not None and b.shape != (w.shape[0],):
        raise shape_error("linear", w.shape, b.shape, why="(weight, bias) do not fit: bias must be (out,)")
    return x, w, b
