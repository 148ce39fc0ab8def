"""Reductions over axes: sum, mean, max, var (all with ``keepdims``).

Backward of a reduction broadcasts the gradient back over the reduced axes;
``_expand_back`` re-inserts those axes as size 1 so broadcasting lines up.
"""

from __future__ import annotations

from ._core import normalize_axis, register, result, tensors


def _expand_back(g, axes, keepdims):
    """Reshape the gradient of a reduction so it broadcasts against the input."""
    if keepdims or not axes:
        return g
    xp_shape = list(g.shape)
    for ax in sorted(axes):
        xp_shape.insert(ax, 1)
    return g.reshape(xp_shape)


@register
def sum(a, axis=None, keepdims=False):
    """Sum over `axis` (int, tuple or None for all). d/da = 1 broadcast over the reduced axes."""
    (a,) = tensors("sum", a)
    axes = normalize_axis("sum", axis, a.ndim)
    out = a.data.sum(axis=axes, keepdims=keepdims)

    def backward(g):
        return (a.xp.broadcast_to(_expand_back(g, axes, keepdims), a.shape),)
    return result(out, (a,), backward, "sum")


@register
def mean(a, axis=None, keepdims=False):
    """Mean over `axis`. d/da = 1/n broadcast, n the number of reduced elements."""
    (a,) = tensors("mean", a)
    axes = normalize_axis("mean", axis, a.ndim)
    n = 1
    for ax in axes:
        n *= a.shape[ax]
    out = a.data.mean(axis=axes, keepdims=keepdims)

    def backward(g):
        return (a.xp.broadcast_to(_expand_back(g, axes, keepdims) / n, a.shape),)
    return result(out, (a,), backward, "mean")


@register
def max(a, axis=None, keepdims=False):
    """Max over `axis`. The gradient goes to the maximal elements, split evenly on ties (torch.amax)."""
    (a,) = tensors("max", a)
    axes = normalize_axis("max", axis, a.ndim)
    if a.size == 0:
        raise ValueError(f"max: cannot reduce an empty tensor of shape {a.shape}")
    out = a.data.max(axis=axes, keepdims=keepdims)

    def backward(g):
        out_k = _expand_back(out, axes, keepdims)
        hit = (a.data == out_k).astype(g.dtype)
        hit /= hit.sum(axis=axes, keepdims=True)
        return (hit * _expand_back(g, axes, keepdims),)
    return result(out, (a,), backward, "max")


@register
def var(a, axis=None, keepdims=False, correction=1):
    """Variance over `axis`: sum((a - mean)^2) / (n - correction); correction=1 is torch's default.

    d/da = 2 (a - mean) / (n - correction), broadcast.
    """
    (a,) = tensors("var", a)
    axes = normalize_axis("var", axis, a.ndim)
    n = 1
    for ax in axes:
        n *= a.shape[ax]
    dof = n - correction
    if dof <= 0:
        raise ValueError(f"var: {n} element(s) over axis {axis} with correction={correction} "
                         f"leaves {dof} degrees of freedom")
    centered = a.data - a.data.mean(axis=axes, keepdims=True)
    out = (centered * centered).sum(axis=axes, keepdims=keepdims) / dof

    def backward(g):
        return (_expand_back(g, axes, keepdims) * (2.0 / dof) * centered,)
    return result(out, (a,), backward, "var")
