"""Dtype conversion: ``astype``.

The forward casts; the backward casts the gradient back to the input's dtype, so a float32
parameter used in a float64 computation still gets a float32 ``.grad``.
"""

from __future__ import annotations

from ..tensor import Tensor
from ._core import register, result, tensors


@register
def astype(a, dtype):
    """a cast to `dtype` (a NumPy dtype, type or name). d/da = 1, cast back to a's dtype.

    The same dtype returns `a` itself (no copy, no graph node). A cast to a non-float dtype
    gives a constant: no gradient flows through integers or booleans (as in torch).
    Backward saves a's dtype only.
    """
    (a,) = tensors("astype", a)
    if a.dtype == dtype:
        return a
    out = a.data.astype(dtype)
    if out.dtype.kind != "f":
        return Tensor(out)
    dtype_in = a.dtype
    return result(out, (a,), lambda g: (g.astype(dtype_in),), "astype")
