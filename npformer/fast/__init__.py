"""The fast versions of some ops, registered under the reference ops' names.

Each module mirrors its npformer/ops counterpart and decorates a function of the op's name
(and signature, plus tuning parameters with defaults) with ``register_fast``; the switch
``npformer.ops.use("reference" | "fast")`` (or NPFORMER_OPS) then chooses which runs. An op
with no fast version runs its reference on both paths. tests/test_fast.py checks every fast
op equal to its reference in float64.

    attention, self_attention   transposed scores, causal query blocks, packed heads
    gelu                        cache-sized pieces, in place
    layer_norm, embedding       BLAS row sums; a 1-D scatter-add
    matmul, linear              one GEMM over all rows; a BLAS bias gradient
"""

from .activations import GELU_CHUNK, gelu
from .attention import CAUSAL_BLOCK, attention, self_attention
from .fused import embedding, layer_norm
from .linalg import linear, matmul

__all__ = ["CAUSAL_BLOCK", "GELU_CHUNK", "attention", "embedding", "gelu", "layer_norm", "linear", "matmul",
           "self_attention"]
