"""Fast matmul and linear: the reference ops of npformer/ops/linalg.py with fewer, larger GEMMs.

matmul of (..., n, k) by a 2-D (k, m) runs as one GEMM over all the rows (and its backward
as two), instead of one per batch entry plus a sum over the batch for dB. linear's dbias is a
product with a vector of ones (BLAS; about 2x faster than sum(axis=0)). Tested equal to the
reference in tests/test_fast.py.
"""

from __future__ import annotations

from .. import backend
from ..ops._core import needs, register_fast, result
from ..ops.linalg import check_matmul, linear_with, matmul_checked


@register_fast
def matmul(a, b):
    """npformer.ops.matmul; (..., n, k) @ (k, m) as one (N, k) @ (k, m) GEMM."""
    a, b = check_matmul(a, b)
    if not (a.ndim > 2 and b.ndim == 2):
        return matmul_checked(a, b)
    k, m = b.shape
    A = a.data.reshape(-1, k)                                           # (N, k)
    out = (A @ b.data).reshape(a.shape[:-1] + (m,))                     # (..., n, m)

    def backward(g):
        G = g.reshape(-1, m)                                            # (N, m)
        dA = (G @ b.data.T).reshape(a.shape) if needs(a) else None
        dB = A.T @ G if needs(b) else None
        return dA, dB
    return result(out, (a, b), backward, "matmul")


@register_fast
def linear(x, weight, bias=None):
    """npformer.ops.linear with the bias gradient as a matrix-vector product."""
    return linear_with(x, weight, bias, _column_sum)


def _column_sum(G):
    """(N, out) -> (out,): a vector of ones times G, one BLAS call (about 2x sum(axis=0))."""
    return backend.get_array_module(G).ones(G.shape[0], dtype=G.dtype) @ G
