"""npformer: a reverse-mode autograd engine and a Transformer, on NumPy (CPU) or CuPy (GPU).

    import npformer as nf
    x = nf.tensor([[1.0, 2.0]], requires_grad=True)
    y = (x * x).sum()
    y.backward()            # x.grad == [[2., 4.]]

The subpackages nf.nn, nf.optim, nf.models, nf.data, nf.training and nf.interop are imported on
first use (PEP 562), so ``import npformer`` stays fast and imports neither them nor torch.
"""

import importlib as _importlib

from . import backend, cpu, ops, random
from .autograd import is_grad_enabled, no_grad, set_grad_enabled
from .dtypes import default_dtype, get_default_dtype, set_default_dtype
from .creation import arange, full, ones, ones_like, rand, randn, zeros, zeros_like
from .gradcheck import GradcheckError, gradcheck
from .ops import (abs, add, astype, attention, concatenate, cross_entropy, div, dropout, embedding, exp, expand, gelu, linear,
                  getitem, layer_norm, log, log_softmax, masked_fill, matmul, max, maximum, mean,
                  minimum, mul, neg, permute, pow, relu, reshape, rms_norm, self_attention, sigmoid, silu, softmax, split,
                  sqrt, stack, sub, sum, tanh, transpose, var, where)
from .random import manual_seed
from .tensor import Tensor, tensor

__version__ = "0.1.0"

_LAZY_SUBMODULES = ("data", "interop", "models", "nn", "optim", "training")


def __getattr__(name):
    """Import a lazy subpackage on first access; import_module also sets it as an attribute, so this runs once."""
    if name in _LAZY_SUBMODULES:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
