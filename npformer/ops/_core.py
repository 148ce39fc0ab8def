"""What every op shares: the reference/fast switch, building a result node, ``unbroadcast``, operand checks.

An op is a plain function that (1) checks and unwraps its inputs, (2) computes
the output array, and (3) returns ``result(out, parents, backward, name)``
where ``backward(g)`` maps the output's gradient to one gradient per parent.

Two implementations, one switch. The functions in npformer/ops are the REFERENCE ops: each
forward and backward written as the plain math of docs/derivations.md. npformer/fast holds
faster versions of some of them (other layouts, blocks, pieces) under the same names. The
public function of an op (``OPS[name]``, ``npformer.<name>``) looks the implementation up in
``IMPLEMENTATION`` on every call; ``use("reference" | "fast")`` fills that table, falling back
to the reference where an op has no fast version. ``fast`` is the default; the environment
variable NPFORMER_OPS chooses at import.
"""

from __future__ import annotations

import functools
import os

from .. import autograd, backend
from ..tensor import Tensor, as_tensor_like

PATHS = ("reference", "fast")
OPS: dict = {}             # public op name -> the function npformer exports; tests cover every entry
REFERENCE: dict = {}       # op name -> its reference implementation (npformer/ops)
FAST: dict = {}            # op name -> its fast implementation (npformer/fast), where there is one
IMPLEMENTATION: dict = {}  # op name -> the implementation the public function calls now
_path = ["fast"]           # the path in use (a list, so `use` can change it in place)


def register(reference):
    """Record a reference op (named after its function); return its public function, which calls
    IMPLEMENTATION[name]: the reference, or its fast version under use("fast")."""
    name = reference.__name__.rstrip("_")
    REFERENCE[name] = IMPLEMENTATION[name] = reference
    table = IMPLEMENTATION

    @functools.wraps(reference)
    def op(*args, **kwargs):
        return table[name](*args, **kwargs)
    OPS[name] = op
    return op


def register_fast(fn):
    """Record `fn` as the fast version of the reference op of the same name."""
    name = fn.__name__.rstrip("_")
    if name not in REFERENCE:
        raise KeyError(f"register_fast: {name!r} is not an op; a fast version needs a reference op of that name")
    FAST[name] = fn
    _choose(_path[0])
    return fn


def _choose(path: str) -> None:
    if path not in PATHS:
        raise ValueError(f"npformer.ops.use: path must be one of {PATHS}; got {path!r}")
    _path[0] = path
    for name, reference in REFERENCE.items():
        IMPLEMENTATION[name] = FAST.get(name, reference) if path == "fast" else reference


class use:
    """Choose the ops' implementation: "reference" (npformer/ops) or "fast" (npformer/fast).

    A plain call sets it, ``npformer.ops.use("reference")``; as a context manager it sets it
    inside the block and restores the previous choice on exit::

        with npformer.ops.use("reference"):
            loss.backward()

    The choice is process-wide, like torch.backends flags: switch between steps, not while other
    threads run ops (they would see the new choice, and two threads' blocks ending out of order
    would restore each other's).
    """

    def __init__(self, path: str):
        self.previous = _path[0]
        _choose(path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _choose(self.previous)


def current() -> str:
    """The path in use: "reference" or "fast"."""
    return _path[0]


def path_from_environment() -> str:
    """NPFORMER_OPS ("reference" or "fast"); "fast" when unset."""
    path = os.environ.get("NPFORMER_OPS", "fast").strip().lower() or "fast"
    if path not in PATHS:
        raise ValueError(f"NPFORMER_OPS must be one of {PATHS}; got {path!r}")
    return path


# ----------------------------------------------------------------------------- building ops

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
    """Coerce op inputs to Tensors on one device, wrapping Python numbers like the first tensor
    (or, when no input is a Tensor, like the first array, so that ``add(2, x32)`` stays on x32's
    device and float32).

    Raises DeviceMismatchError naming the op and the devices when they differ.
    """
    like = next((v for v in values if isinstance(v, Tensor)), None)
    if like is None:
        like = Tensor(next((v for v in values if backend.is_array(v)), values[0]))
    out = tuple(as_tensor_like(v, like) for v in values)
    dev = out[0].device
    for t in out[1:]:
        if t.device != dev:
            devs = ", ".join(f"{tuple(t.shape)} on {t.device}" for t in out)
            raise backend.DeviceMismatchError(f"{name}: inputs are on different devices ({devs}); "
                                              f"move them with .to(device) first")
    return out


def constant(name: str, value, like: Tensor, what: str = "mask is", like_what: str = "the tensor is"):
    """A mask, index or target that gets no gradient (a Tensor, array or nested list) as an array
    on `like`'s device. Raises DeviceMismatchError ("embedding: indices are on gpu but weight
    is on cpu", from what="indices are", like_what="weight is") when it lives elsewhere."""
    a = value.data if isinstance(value, Tensor) else value
    if not backend.is_array(a):
        a = like.xp.asarray(a)
    if backend.device_of(a) != like.device:
        raise backend.DeviceMismatchError(f"{name}: {what} on {backend.device_of(a)} but {like_what} on {like.device}")
    return a


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
