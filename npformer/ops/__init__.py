"""The primitive and fused ops. Each is a function taking Tensors (or numbers) and returning a Tensor.

``OPS`` maps every public op name to its function; tests/test_ops_registry.py
fails if one of them has no gradient check.
"""

from ._core import OPS, unbroadcast
from .attention import attention, self_attention
from .activations import gelu, relu, sigmoid, tanh
from .elementwise import abs, add, astype, div, exp, log, maximum, minimum, mul, neg, pow, sqrt, sub
from .fused import cross_entropy, dropout, embedding, layer_norm, log_softmax, softmax
from .linalg import linear, matmul
from .reduction import max, mean, sum, var
from .shape import (concatenate, expand, getitem, masked_fill, permute, reshape, split, stack,
                    transpose, where)

__all__ = sorted(OPS) + ["OPS", "unbroadcast", "astype"]
