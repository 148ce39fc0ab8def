"""``Tensor``: an n-dimensional array (NumPy or CuPy) that records the ops applied to it.

The maths lives in ``npformer.ops``; this file only holds the data, the grad,
and the Python operator and method spellings that forward to the ops.

The ops import ``Tensor`` and the methods here call the ops: the cycle is closed once, by the
``from . import ops`` at the end of this file (after ``Tensor`` exists, so either module may be
imported first). The methods look ``ops.<name>`` up when called.
"""

from __future__ import annotations

import numbers
import weakref

import numpy as np

from . import autograd, backend


def _is_float_dtype(dtype) -> bool:
    return np.dtype(dtype).kind == "f"


class Tensor:
    """An array plus what autograd needs.

    data: the NumPy or CuPy array. grad: an array shaped like data on the same
    device, or None. requires_grad: whether gradients flow to this tensor.
    """

    __slots__ = ("data", "grad", "_requires_grad", "_node", "__weakref__")

    __array_priority__ = 1000  # make `ndarray + Tensor` defer to Tensor.__radd__

    def __init__(self, data, requires_grad: bool = False, *, _node=None):
        if not backend.is_array(data):
            if hasattr(data, "__cuda_array_interface__"):
                backend.gpu_available()      # a CuPy array made before npformer imported CuPy
            if not backend.is_array(data):
                data = np.asarray(data)
        if requires_grad and not _is_float_dtype(data.dtype):
            raise TypeError(f"only floating-point tensors can require gradients; got dtype {data.dtype}")
        self.data = data
        self.grad = None
        self._requires_grad = bool(requires_grad)
        self._node = _node      # the autograd.Node of the op that made this tensor; None for a leaf

    # ------------------------------------------------------------------ basic properties
    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return int(self.data.size)

    @property
    def device(self) -> str:
        return backend.device_of(self.data)

    @property
    def xp(self):
        """The array module of this tensor's data (numpy or cupy)."""
        return backend.get_array_module(self.data)

    @property
    def is_leaf(self) -> bool:
        """True for tensors made by the user (not by an op that recorded a graph)."""
        return self._node is None

    @property
    def grad_fn(self):
        """Name of the op that produced this tensor, or None for a leaf."""
        return self._node.op if self._node is not None else None

    def __len__(self) -> int:
        if self.data.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return self.data.shape[0]

    def __repr__(self) -> str:
        extra = f", device='{self.device}'" if self.device != "cpu" else ""
        if self.requires_grad:
            extra += f", grad_fn={self._node.op}" if self._node is not None else ", requires_grad=True"
        body = np.array2string(backend.to_numpy(self.data), separator=", ", prefix="tensor(")
        return f"tensor({body}, dtype={self.dtype}{extra})"

    # ------------------------------------------------------------------ autograd
    def backward(self, grad=None, retain_graph: bool = False) -> None:
        """Compute gradients of this tensor with respect to every leaf that requires grad.

        grad: d(loss)/d(self), an array or Tensor shaped like self; optional for
        one-element tensors. Gradients accumulate into ``leaf.grad``.
        """
        autograd.backward(self, grad, retain_graph=retain_graph)

    def _accumulate(self, g) -> None:
        if self.grad is None:
            self.grad = g.copy() if g.dtype == self.dtype else g.astype(self.dtype)
        else:
            self.grad += g

    @property
    def requires_grad(self) -> bool:
        """Whether gradients flow to this tensor. Settable on leaves only (as in PyTorch): a
        non-leaf's flag is its graph's; ``detach()`` gives a tensor cut from it."""
        return self._requires_grad

    @requires_grad.setter
    def requires_grad(self, value) -> None:
        value = bool(value)
        if self._node is not None and not value:
            raise RuntimeError(f"requires_grad: only a leaf tensor's flag can be changed; this one was made "
                               f"by {self._node.op!r} (use .detach() to cut it from the graph)")
        if value and not _is_float_dtype(self.dtype):
            raise TypeError(f"only floating-point tensors can require gradients; got dtype {self.dtype}")
        self._requires_grad = value

    def retain_grad(self) -> "Tensor":
        """Also store .grad on this non-leaf tensor during backward (a leaf always gets one)."""
        if not self._requires_grad:
            raise RuntimeError("retain_grad: the tensor does not require grad, so it will get no gradient")
        if self._node is not None:
            self._node.retained = weakref.ref(self)
        return self

    def detach(self) -> "Tensor":
        """The same data, cut from the graph (requires_grad False). Shares memory."""
        return Tensor(self.data)

    def requires_grad_(self, requires_grad: bool = True) -> "Tensor":
        self.requires_grad = requires_grad
        return self

    def zero_grad(self) -> None:
        self.grad = None

    # ------------------------------------------------------------------ conversion
    def item(self):
        if self.data.size != 1:
            raise ValueError(f"item(): only one-element tensors can be converted; got shape {self.shape}")
        return self.data.reshape(()).item()

    def numpy(self) -> np.ndarray:
        """The data as a NumPy array (a copy from the GPU; the array itself on the CPU)."""
        return backend.to_numpy(self.data)

    def tolist(self):
        return self.numpy().tolist()

    def to(self, device: str) -> "Tensor":
        """This tensor on `device`; the result is a leaf (like torch's .to on a leaf)."""
        if device == self.device:
            return self
        return Tensor(backend.to_device(self.data, device), requires_grad=self.requires_grad)

    def astype(self, dtype) -> "Tensor":
        return ops.astype(self, dtype)

    def float(self) -> "Tensor":
        return self.astype(np.float32)

    def double(self) -> "Tensor":
        return self.astype(np.float64)

    # ------------------------------------------------------------------ operators
    def __add__(self, o): return ops.add(self, o)
    def __radd__(self, o): return ops.add(o, self)
    def __sub__(self, o): return ops.sub(self, o)
    def __rsub__(self, o): return ops.sub(o, self)
    def __mul__(self, o): return ops.mul(self, o)
    def __rmul__(self, o): return ops.mul(o, self)
    def __truediv__(self, o): return ops.div(self, o)
    def __rtruediv__(self, o): return ops.div(o, self)
    def __pow__(self, o): return ops.pow(self, o)
    def __rpow__(self, o): return ops.pow(o, self)
    def __matmul__(self, o): return ops.matmul(self, o)
    def __rmatmul__(self, o): return ops.matmul(o, self)
    def __neg__(self): return ops.neg(self)
    def __getitem__(self, idx): return ops.getitem(self, idx)

    # comparisons give boolean tensors that never require grad
    def _cmp(self, o, fn):
        od = o.data if isinstance(o, Tensor) else o
        return Tensor(fn(self.data, od))

    def __lt__(self, o): return self._cmp(o, lambda a, b: a < b)
    def __le__(self, o): return self._cmp(o, lambda a, b: a <= b)
    def __gt__(self, o): return self._cmp(o, lambda a, b: a > b)
    def __ge__(self, o): return self._cmp(o, lambda a, b: a >= b)
    def __invert__(self): return Tensor(~self.data)
    __hash__ = object.__hash__

    # ------------------------------------------------------------------ methods forwarding to ops
    def sum(self, axis=None, keepdims=False): return ops.sum(self, axis, keepdims)
    def mean(self, axis=None, keepdims=False): return ops.mean(self, axis, keepdims)
    def max(self, axis=None, keepdims=False): return ops.max(self, axis, keepdims)
    def var(self, axis=None, keepdims=False, correction=1):
        return ops.var(self, axis, keepdims, correction)
    def exp(self): return ops.exp(self)
    def log(self): return ops.log(self)
    def sqrt(self): return ops.sqrt(self)
    def abs(self): return ops.abs(self)
    def tanh(self): return ops.tanh(self)
    def sigmoid(self): return ops.sigmoid(self)
    def relu(self): return ops.relu(self)
    def softmax(self, axis=-1): return ops.softmax(self, axis)
    def log_softmax(self, axis=-1): return ops.log_softmax(self, axis)

    def reshape(self, *shape):
        return ops.reshape(self, shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)

    view = reshape

    def transpose(self, axis0: int = -2, axis1: int = -1):
        """Swap two axes (torch.transpose semantics)."""
        return ops.transpose(self, axis0, axis1)

    def permute(self, *axes):
        return ops.permute(self, axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes)

    @property
    def T(self):
        return ops.permute(self, tuple(range(self.ndim - 1, -1, -1)))

    def expand(self, *shape):
        return ops.expand(self, shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)

    def masked_fill(self, mask, value): return ops.masked_fill(self, mask, value)
    def split(self, sections, axis=0): return ops.split(self, sections, axis)


def tensor(data, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    """Make a leaf tensor from a list, scalar, NumPy or CuPy array.

    Python floats become float32 (as in torch) unless `dtype` says otherwise;
    NumPy/CuPy arrays keep their dtype. `device` defaults to the array's own
    device, or to NPFORMER_DEVICE for Python data.
    """
    if isinstance(data, Tensor):
        data = data.data
    if backend.is_array(data):
        arr = data if dtype is None else data.astype(dtype, copy=False)
        if device is not None:
            arr = backend.to_device(arr, device)
    else:
        device = device or backend.default_device()
        xp = backend.xp_for(device)
        arr = np.asarray(data)
        if dtype is None and arr.dtype == np.float64 and not isinstance(data, np.generic):
            dtype = np.float32
        if dtype is not None:
            arr = arr.astype(dtype)
        arr = xp.asarray(arr)
    return Tensor(arr, requires_grad=requires_grad)


def as_tensor_like(value, like: Tensor) -> Tensor:
    """Wrap a Python number as a constant tensor on `like`'s device, with a dtype that does not upcast `like`."""
    if isinstance(value, Tensor):
        return value
    xp = backend.get_array_module(like.data)
    if isinstance(value, numbers.Number) or isinstance(value, np.generic):
        if _is_float_dtype(like.dtype) or isinstance(value, (numbers.Integral, np.integer, bool, np.bool_)):
            dtype = like.dtype
        else:
            dtype = np.float32
        return Tensor(xp.asarray(value, dtype=dtype))
    if backend.is_array(value):
        return Tensor(value)
    raise TypeError(f"expected a Tensor, array or number; got {type(value).__name__}")


# Last, so that ``Tensor`` and ``as_tensor_like`` exist when the ops import them (see the docstring).
from . import ops  # noqa: E402
