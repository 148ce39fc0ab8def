"""The primitive and fused ops. Each is a function taking Tensors (or numbers) and returning a Tensor.

The functions here are the reference ops; npformer/fast registers faster versions of some
under the same names, and ``use("reference" | "fast")`` (or NPFORMER_OPS at import; "fast"
by default) chooses which runs (see _core.py). ``OPS`` maps every public op name to its
function; tests/test_ops_registry.py fails if one of them has no gradient check.
"""

from ._core import FAST, IMPLEMENTATION, OPS, REFERENCE, current, path_from_environment, unbroadcast, use
from .attention import attention, self_attention
from .activations import gelu, relu, sigmoid, silu, tanh
from .elementwise import abs, add, div, exp, log, maximum, minimum, mul, neg, pow, sqrt, sub
from .dtype import astype
from .fused import cross_entropy, dropout, embedding, layer_norm, log_softmax, rms_norm, softmax
from .linalg import linear, matmul
from .reduction import max, mean, sum, var
from .shape import (concatenate, expand, getitem, masked_fill, permute, reshape, split, stack,
                    transpose, where)
from .. import fast  # noqa: E402,F401  (registers the fast versions)

use(path_from_environment())

__all__ = sorted(OPS) + ["OPS", "REFERENCE", "FAST", "IMPLEMENTATION", "unbroadcast", "use", "current"]
