"""Ops that move elements without arithmetic: reshape, transpose, permute, expand,
getitem, concatenate, stack, split, where, masked_fill.
"""

from __future__ import annotations

import builtins

from .. import backend
from ..tensor import Tensor
from ._core import constant, needs, register, result, shape_error, tensors, unbroadcast


@register
def reshape(a, shape):
    """The same elements in a new shape (one entry may be -1). Backward reshapes back."""
    (a,) = tensors("reshape", a)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    try:
        out = a.data.reshape(shape)
    except ValueError:
        raise ValueError(f"reshape: cannot reshape a tensor of shape {a.shape} ({a.size} elements) "
                         f"into shape {shape}") from None
    # Backward closures keep shapes and flags rather than the input tensors, whose data may
    # then be freed once nothing else needs it (see npformer/autograd.py).
    shape_in = a.shape
    return result(out, (a,), lambda g: (g.reshape(shape_in),), "reshape")


@register
def permute(a, axes):
    """Reorder axes: out.shape[i] = a.shape[axes[i]]. Backward applies the inverse permutation."""
    (a,) = tensors("permute", a)
    axes = tuple(ax % a.ndim for ax in axes) if a.ndim else tuple(axes)
    if sorted(axes) != list(range(a.ndim)):
        raise ValueError(f"permute: axes {axes} are not a permutation of the {a.ndim} axes of shape {a.shape}")
    inverse = [0] * len(axes)
    for i, ax in enumerate(axes):
        inverse[ax] = i
    return result(a.data.transpose(axes), (a,), lambda g: (g.transpose(inverse),), "permute")


@register
def transpose(a, axis0=-2, axis1=-1):
    """Swap two axes (torch.transpose). Its own inverse."""
    (a,) = tensors("transpose", a)
    if a.ndim < 2 and (axis0, axis1) == (-2, -1):
        return reshape(a, a.shape)
    for ax in (axis0, axis1):
        if not -a.ndim <= ax < a.ndim:
            raise ValueError(f"transpose: axis {ax} is out of range for shape {a.shape}")
    out = a.data.swapaxes(axis0, axis1)
    return result(out, (a,), lambda g: (g.swapaxes(axis0, axis1),), "transpose")


@register
def expand(a, shape):
    """Broadcast to `shape` without copying (-1 keeps a size). Backward sums with unbroadcast."""
    (a,) = tensors("expand", a)
    shape = tuple(shape)
    lead = len(shape) - a.ndim
    shape = tuple(a.shape[i - lead] if (n == -1 and i >= lead) else n for i, n in enumerate(shape))
    try:
        out = a.xp.broadcast_to(a.data, shape)
    except ValueError:
        raise shape_error("expand", a.shape, shape, why="cannot be expanded (from the first to the second)") from None
    shape_in = a.shape
    return result(out, (a,), lambda g: (unbroadcast(g, shape_in),), "expand")


def _selects_once(idx) -> bool:
    """True when no element can be selected twice: no integer-array entries in the index.

    Then the backward may assign instead of scatter-adding.
    """
    items = idx if isinstance(idx, tuple) else (idx,)
    for i in items:
        if backend.is_array(i) and i.dtype != bool:
            return False
    return True


def _index_item(a, i):
    """One entry of an index, with Tensors and lists turned into arrays on a's device."""
    if isinstance(i, (Tensor, list)) or backend.is_array(i):
        return constant("getitem", i, a, "index is")
    return i


@register
def getitem(a, idx):
    """a[idx] with NumPy indexing: slices, ints, integer arrays, boolean masks.

    Backward scatters the gradient into zeros shaped like `a`, adding where an
    integer index repeats an element.
    """
    (a,) = tensors("getitem", a)
    idx = tuple(_index_item(a, i) for i in idx) if isinstance(idx, tuple) else _index_item(a, idx)
    try:
        out = a.data[idx]
    except IndexError as exc:
        raise IndexError(f"getitem: index invalid for shape {a.shape}: {exc}") from None
    once = _selects_once(idx)
    xp, shape_in = a.xp, a.shape

    def backward(g):
        full = xp.zeros(shape_in, dtype=g.dtype)
        if once:
            full[idx] = g
        else:
            backend.scatter_add(full, idx, g)
        return (full,)
    return result(out, (a,), backward, "getitem")


@register
def concatenate(tensors_, axis=0):
    """Join tensors along an existing axis. Backward slices the gradient back into pieces."""
    ts = tensors("concatenate", *tensors_)
    xp = ts[0].xp
    try:
        out = xp.concatenate([t.data for t in ts], axis=axis)
    except ValueError:
        raise shape_error("concatenate", *(t.shape for t in ts), why=f"cannot be joined along axis {axis}") from None
    bounds = []
    start = 0
    for t in ts:
        stop = start + t.shape[axis]
        bounds.append((start, stop))
        start = stop

    wanted = [needs(t) for t in ts]

    def backward(g):
        ax = axis % g.ndim
        pre = (slice(None),) * ax
        return tuple(g[pre + (slice(s, e),)] if w else None for w, (s, e) in zip(wanted, bounds))
    return result(out, ts, backward, "concatenate")


@register
def stack(tensors_, axis=0):
    """Join same-shaped tensors along a new axis. Backward takes each slice of the gradient."""
    ts = tensors("stack", *tensors_)
    xp = ts[0].xp
    try:
        out = xp.stack([t.data for t in ts], axis=axis)
    except ValueError:
        raise shape_error("stack", *(t.shape for t in ts), why="must all be equal") from None

    wanted = [needs(t) for t in ts]

    def backward(g):
        parts = xp.moveaxis(g, axis, 0)
        return tuple(parts[i] if w else None for i, w in enumerate(wanted))
    return result(out, ts, backward, "stack")


@register
def split(a, sections, axis=0):
    """Split along `axis`: `sections` is a piece size (torch.split) or a list of piece sizes.

    Returns a tuple of tensors, each a slice of `a` (its backward is getitem's).
    """
    (a,) = tensors("split", a)
    n = a.shape[axis]
    if isinstance(sections, int):
        if sections <= 0:
            raise ValueError(f"split: piece size must be positive; got {sections}")
        sizes = [sections] * (n // sections) + ([n % sections] if n % sections else [])
    else:
        sizes = list(sections)
        if builtins.sum(sizes) != n:
            raise ValueError(f"split: sizes {sizes} do not add up to {n}, the length of axis {axis} "
                             f"of shape {a.shape}")
    pre = (slice(None),) * (axis % a.ndim)
    pieces, start = [], 0
    for size in sizes:
        pieces.append(getitem(a, pre + (slice(start, start + size),)))
        start += size
    return tuple(pieces)


def _mask_array(name, mask, like):
    m = constant(name, mask, like)
    if m.dtype != bool:
        raise TypeError(f"{name}: mask must be boolean; got dtype {m.dtype}")
    return m


@register
def where(cond, a, b):
    """Elementwise `a` where `cond` is True, else `b`; broadcasting all three.

    d/da = cond, d/db = not cond (each unbroadcast to its input's shape).
    """
    a, b = tensors("where", a, b)
    c = _mask_array("where", cond, a)
    try:
        out = a.xp.where(c, a.data, b.data)
    except ValueError:
        raise shape_error("where", c.shape, a.shape, b.shape) from None

    xp, sa, sb, na, nb = a.xp, a.shape, b.shape, needs(a), needs(b)

    def backward(g):
        zero = xp.zeros((), dtype=g.dtype)
        return (unbroadcast(xp.where(c, g, zero), sa) if na else None,
                unbroadcast(xp.where(c, zero, g), sb) if nb else None)
    return result(out, (a, b), backward, "where")


@register
def masked_fill(a, mask, value):
    """`a` with `value` wherever the boolean `mask` (broadcast to a.shape) is True.

    d/da = 0 where masked, 1 elsewhere.
    """
    (a,) = tensors("masked_fill", a)
    m = _mask_array("masked_fill", mask, a)
    try:
        out = a.xp.where(m, a.xp.asarray(value, dtype=a.dtype), a.data)
    except ValueError:
        raise shape_error("masked_fill", a.shape, m.shape, why="(tensor and mask) cannot be broadcast together") from None
    if out.shape != a.data.shape:
        raise shape_error("masked_fill", a.shape, m.shape, why="(tensor and mask): the mask may not enlarge the tensor")

    xp = a.xp

    def backward(g):
        return (xp.where(m, xp.zeros((), dtype=g.dtype), g),)
    return result(out, (a,), backward, "masked_fill")
