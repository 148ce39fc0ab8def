"""What every op shares: building a result node, ``unbroadcast``, operand checks.

An op is a plain function that (1) checks and unwraps its inputs, (2) computes
the output array, and (3) returns ``result(out, parents, backward, name)``
where ``backward(g)`` maps the output's gradient to one gradient per parent.
"""

from __future__ import annotations

from .. import autograd, backend
from ..tensor import Tensor, as_tensor_like

OPS: dict = {}  # public op name -> function; the gradient tests cover every entry


def register(fn):
    """Record a public op in OPS (its name is the function's name)."""
    OPS[fn.__name__.rstrip("_")] = fn
    return fn


def result(data, parents, backward, name: str) -> Tensor:
    """Wrap an op's output array; record the graph edge when any parent needs grad."""
    if not backend.is_array(data):  # NumPy reductions to 0-d return scalars
        data = backend.get_array_module(*(p.data for p in parents)).asarray(data)
    node = autograd.record(data, parents, backward, name)
    return Tensor(data) if node is None else Tensor(data, True, _node=node)


def unbroadcast(grad, shape):
    """Sum `grad` down to `shape`, undoing NumPy broadcasting.

    Sums away the leading axes broadcasting added, then the axes where `shape`
    has size 1 but `grad` does not. Used by every broadcasting op.
    """
    shape = tuple(shape)
    if tuple(grad.shape) == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad.reshape(shape)


def needs(t: Tensor) -> bool:
    """Whether the gradient for tensor `t` is wanted (skip computing it otherwise)."""
    return t.requires_grad


def tensors(name: str, *values):
    """Coerce op inputs to Tensors on one device, wrapping Python numbers like the first tensor.

    Raises DeviceMismatchError naming the op and the devices when they differ.
    """
    like = next((v for v in values if isinstance(v, Tensor)), None)
    if like is None:
        like = Tensor(backend.get_array_module().asarray(values[0]))
    out = tuple(as_tensor_like(v, like) for v in values)
    dev = out[0].device
    for t in out[1:]:
        if t.device != dev:
            devs = ", ".join(f"{tuple(t.shape)} on {t.device}" for t in out)
            raise backend.DeviceMismatchError(f"{name}: inputs are on different devices ({devs}); "
                                              f"move them with .to(device) first")
    return out


def shape_error(name: str, *shapes, why: str = "cannot be broadcast together") -> ValueError:
    listed = " and ".join(str(tuple(s)) for s in shapes)
    return ValueError(f"{name}: shapes {listed} {why}")


def normalize_axis(name: str, axis, ndim: int):
    """Axis (int, tuple or None) as a tuple of non-negative ints; None means all axes."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    out = []
    for a in axes:
        if not -max(ndim, 1) <= a < max(ndim, 1):
            raise ValueError(f"{name}: axis {a} is out of range for a tensor with {ndim} dimensions")
        if ndim:  # a 0-d tensor accepts axis 0 / -1 (as torch does) and reduces over nothing
            out.append(a % ndim)
    return tuple(out)
