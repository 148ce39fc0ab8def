"""Neural-network layers and the Transformer, with torch.nn's names, arguments and semantics.

Parameter names match torch's one-to-one (``encoder.layers.0.self_attn.in_proj_weight``), so
state dicts move between the two unchanged. One deliberate difference: ``batch_first=True``
is the default everywhere (inputs (B, T, D)); torch's default is time first.
"""

from . import functional, init
from .attention import MultiHeadAttention, MultiheadAttention
from .feedforward import GatedFeedForward
from .gqa import GroupedQueryAttention
from .layers import (GELU, Dropout, Embedding, Identity, LayerNorm, Linear, ModuleList, ReLU, RMSNorm, Sequential,
                     SiLU, Tanh)
from .module import Module, Parameter
from .positional import LearnedPositionalEmbedding, SinusoidalPositionalEncoding
from .relative import RelativePositionBias, alibi_bias, alibi_slopes, relative_position_bucket
from .rnn import GRU, LSTM, RNN
from .rotary import RotaryEmbedding, apply_rotary_pos_emb, rotate_half
from .transformer import (Transformer, TransformerDecoder, TransformerDecoderLayer, TransformerEncoder,
                          TransformerEncoderLayer)

__all__ = ["Module", "Parameter", "functional", "init", "Linear", "Embedding", "LayerNorm", "RMSNorm", "Dropout",
           "ModuleList", "Sequential", "ReLU", "GELU", "SiLU", "Tanh", "Identity", "GatedFeedForward",
           "MultiHeadAttention", "MultiheadAttention", "GroupedQueryAttention", "SinusoidalPositionalEncoding",
           "LearnedPositionalEmbedding", "RotaryEmbedding", "apply_rotary_pos_emb", "rotate_half",
           "RelativePositionBias", "alibi_bias", "alibi_slopes", "relative_position_bucket",
           "TransformerEncoderLayer", "TransformerDecoderLayer", "TransformerEncoder", "TransformerDecoder",
           "Transformer", "RNN", "LSTM", "GRU"]
