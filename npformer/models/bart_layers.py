"""BART's configuration and layers (HF's names): the embeddings with BART's position offset, the attention, the
post-norm encoder and decoder layers and stacks. The models built from them, and what BART computes, are in bart.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from .. import backend, nn, ops
from ..nn import functional as F
from ..tensor import Tensor
from .bert import ACT2FN as _BERT_ACT2FN
from .config import require_bools, require_divisible, require_dropout, require_positive_ints, require_token_ids
from .seq2seq import DecoderKVCache

# activation_function (HF's ACT2FN names) -> the function
ACT2FN = {**_BERT_ACT2FN, "silu": F.silu, "swish": F.silu, "tanh": F.tanh}
TOKEN_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "forced_eos_token_id")


@dataclass(frozen=True)
class BartConfig:
    """Hyperparameters of a BART, HF's BartConfig fields and defaults (facebook/bart-large).

    The token ids are None or ints in [0, vocab_size): pad_token_id (the padding row of the
    embeddings; -100 labels become it when shifted), decoder_start_token_id (the first decoder
    input; bos_token_id when None), eos_token_id (ends a generated row), forced_eos_token_id (the
    token generate forces at its last step, None: none). LayerNorm eps is fixed at 1e-5, as in HF.
    """
    vocab_size: int = 50265
    d_model: int = 1024
    encoder_layers: int = 12
    decoder_layers: int = 12
    encoder_attention_heads: int = 16
    decoder_attention_heads: int = 16
    encoder_ffn_dim: int = 4096
    decoder_ffn_dim: int = 4096
    activation_function: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    max_position_embeddings: int = 1024
    init_std: float = 0.02
    scale_embedding: bool = False
    pad_token_id: Optional[int] = 1
    bos_token_id: Optional[int] = 0
    eos_token_id: Optional[int] = 2
    decoder_start_token_id: Optional[int] = 2
    forced_eos_token_id: Optional[int] = 2
    tie_word_embeddings: bool = True

    def __post_init__(self):
        require_positive_ints(self, ("vocab_size", "d_model", "encoder_layers", "decoder_layers",
                                     "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim",
                                     "decoder_ffn_dim", "max_position_embeddings"))
        require_divisible(self, "d_model", "encoder_attention_heads")
        require_divisible(self, "d_model", "decoder_attention_heads")
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            require_dropout(self, name)
        if self.activation_function not in ACT2FN:
            raise ValueError(f"BartConfig.activation_function must be one of {', '.join(map(repr, ACT2FN))}; "
                             f"got {self.activation_function!r}")
        v = self.init_std
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not v >= 0:
            raise ValueError(f"BartConfig.init_std must be a number >= 0; got {v!r}")
        require_token_ids(self, TOKEN_FIELDS)
        require_bools(self, ("scale_embedding", "tie_word_embeddings"))

    def to_dict(self) -> dict:
        return asdict(self)


def shift_tokens_right(input_ids, pad_token_id: int, decoder_start_token_id: int):
    """[start, y_1, ..., y_{T-1}] from labels [y_1, ..., y_T] (B, T), -100 (ignored labels) -> pad_token_id."""
    if pad_token_id is None or decoder_start_token_id is None:
        raise ValueError("shift_tokens_right: config.pad_token_id and config.decoder_start_token_id (or "
                         "bos_token_id) must be set to make decoder_input_ids from labels or input_ids")
    xp = backend.get_array_module(input_ids)
    shifted = xp.empty_like(input_ids)
    shifted[:, 1:] = input_ids[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return xp.where(shifted == -100, pad_token_id, shifted)


# ----------------------------------------------------------------------------- layers

class BartLearnedPositionalEmbedding(nn.Embedding):
    """Learned positions: rows offset + P .. offset + P + T - 1 of a (max_position_embeddings + 2, D) table."""
    offset = 2

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__(num_embeddings + self.offset, embedding_dim)

    def forward(self, T: int, past: int = 0) -> Tensor:
        """(1, T, D): the embeddings of positions past .. past + T - 1, the same for every batch row."""
        start = past + self.offset
        return super().forward(self.weight.xp.arange(start, start + T)[None, :])


class BartScaledWordEmbedding(nn.Embedding):
    """Token embeddings times embed_scale (sqrt(d_model) with scale_embedding, else 1)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int = None, embed_scale: float = 1.0):
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx)
        self.embed_scale = embed_scale

    def forward(self, input_ids) -> Tensor:
        x = super().forward(input_ids)                                   # (B, L, D)
        return x if self.embed_scale == 1.0 else x * self.embed_scale


class BartAttention(nn.Module):
    """Multi-head attention softmax(q k^T / sqrt(hd) + mask) v with separate q/k/v/out projections.

    forward(hidden_states (B, T, D), key_value_states=None (B, S, D): cross-attention, mask, causal)
    -> (B, T, D). The cached decoder path calls project_kv and attend itself.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.scaling = self.head_dim ** -0.5
        self.dropout = dropout                                          # on the attention weights
        self.k_proj = nn.Linear(embed_dim, embed_dim)                   # HF's order: k, v, q, out
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def _heads(self, x: Tensor) -> Tensor:
        B, L, _ = x.shape
        return x.reshape(B, L, self.num_heads, self.head_dim).transpose(1, 2)    # (B, nh, L, hd)

    def project_kv(self, states: Tensor) -> tuple:
        """(k, v), each (B, nh, S, hd), from states (B, S, D)."""
        return self._heads(self.k_proj(states)), self._heads(self.v_proj(states))

    def attend(self, hidden_states: Tensor, k: Tensor, v: Tensor, mask=None, causal: bool = False) -> Tensor:
        """The queries of hidden_states (B, T, D) over k, v (B, nh, S, hd) -> (B, T, D).
        mask: None or bool broadcastable to (B, nh, T, S), True = attend; causal: key j <= query i."""
        B, T, D = hidden_states.shape
        q = self._heads(self.q_proj(hidden_states))                             # (B, nh, T, hd)
        p = self.dropout if self.training else 0.0
        y = ops.attention(q, k, v, mask=mask, scale=self.scaling, dropout_p=p, causal=causal)   # (B, nh, T, hd)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))                # (B, T, D)

    def forward(self, hidden_states: Tensor, key_value_states: Tensor = None, mask=None, causal: bool = False):
        k, v = self.project_kv(hidden_states if key_value_states is None else key_value_states)
        return self.attend(hidden_states, k, v, mask, causal)


def _feed_forward(layer, x: Tensor) -> Tensor:
    """final_layer_norm(x + dropout(fc2(dropout(act(fc1(x)))))): the feed-forward sublayer of either layer."""
    h = ACT2FN[layer.activation_function](layer.fc1(x))                         # (B, L, ffn_dim)
    h = layer.fc2(F.dropout(h, layer.activation_dropout, layer.training))      # (B, L, D)
    return layer.final_layer_norm(x + F.dropout(h, layer.dropout, layer.training))


class BartEncoderLayer(nn.Module):
    """self_attn, then the feed-forward (fc1, fc2), each followed by its residual add and LayerNorm."""

    def __init__(self, config: BartConfig):
        super().__init__()
        D = config.d_model
        self.self_attn = BartAttention(D, config.encoder_attention_heads, config.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(D)
        self.dropout, self.activation_dropout = config.dropout, config.activation_dropout
        self.activation_function = config.activation_function
        self.fc1 = nn.Linear(D, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, D)
        self.final_layer_norm = nn.LayerNorm(D)

    def forward(self, x: Tensor, mask=None) -> Tensor:
        """(B, S, D) -> (B, S, D); mask: None or (B, 1, 1, S) bool, True = a real key."""
        x = self.self_attn_layer_norm(x + F.dropout(self.self_attn(x, mask=mask), self.dropout, self.training))
        return _feed_forward(self, x)


class BartDecoderLayer(nn.Module):
    """Causal self_attn, encoder_attn (cross-attention to the encoder output), then the feed-forward."""

    def __init__(self, config: BartConfig):
        super().__init__()
        D, nh = config.d_model, config.decoder_attention_heads
        self.self_attn = BartAttention(D, nh, config.attention_dropout)
        self.dropout, self.activation_dropout = config.dropout, config.activation_dropout
        self.activation_function = config.activation_function
        self.self_attn_layer_norm = nn.LayerNorm(D)
        self.encoder_attn = BartAttention(D, nh, config.attention_dropout)
        self.encoder_attn_layer_norm = nn.LayerNorm(D)
        self.fc1 = nn.Linear(D, config.decoder_ffn_dim)
        self.fc2 = nn.Linear(config.decoder_ffn_dim, D)
        self.final_layer_norm = nn.LayerNorm(D)

    def forward(self, y: Tensor, memory: Tensor, self_mask=None, cross_mask=None, cache: DecoderKVCache = None,
                i: int = 0) -> Tensor:
        """y (B, T, D) new positions, memory (B, S, D) the encoder output -> (B, T, D).

        self_mask: None (plain causal) or (B | 1, 1, T, P + T) bool; cross_mask: None or (B, 1, 1, S)
        bool; True = attend. With a cache (this is decoder layer i): the self-attention keys/values
        are the cached P and these T (stored back), the cross-attention ones are memory's, projected
        on the first call and reused (memory is then not read)."""
        drop = lambda t: F.dropout(t, self.dropout, self.training)               # noqa: E731
        k, v = self.self_attn.project_kv(y)                                     # (B, nh, T, hd)
        if cache is not None:
            if cache.self_k[i] is not None:
                k = ops.concatenate([Tensor(cache.self_k[i]), k], axis=2)        # (B, nh, P + T, hd)
                v = ops.concatenate([Tensor(cache.self_v[i]), v], axis=2)
            cache.self_k[i], cache.self_v[i] = k.data, v.data
        a = self.self_attn.attend(y, k, v, self_mask, causal=self_mask is None)
        y = self.self_attn_layer_norm(y + drop(a))
        if cache is not None and cache.cross_k[i] is not None:
            k, v = Tensor(cache.cross_k[i]), Tensor(cache.cross_v[i])            # (B, nh, S, hd)
        else:
            k, v = self.encoder_attn.project_kv(memory)
            if cache is not None:
                cache.cross_k[i], cache.cross_v[i] = k.data, v.data
        y = self.encoder_attn_layer_norm(y + drop(self.encoder_attn.attend(y, k, v, cross_mask)))
        return _feed_forward(self, y)


class BartEncoder(nn.Module):
    """embed_tokens, embed_positions, layernorm_embedding, then encoder_layers BartEncoderLayers."""

    def __init__(self, config: BartConfig, embed_scale: float):
        super().__init__()
        D = config.d_model
        self.dropout = config.dropout
        self.embed_tokens = BartScaledWordEmbedding(config.vocab_size, D, config.pad_token_id, embed_scale)
        self.embed_positions = BartLearnedPositionalEmbedding(config.max_position_embeddings, D)
        self.layers = nn.ModuleList([BartEncoderLayer(config) for _ in range(config.encoder_layers)])
        self.layernorm_embedding = nn.LayerNorm(D)

    def forward(self, input_ids, real=None) -> Tensor:
        """input_ids (B, S) checked ints; real: None or (B, S) bool, True = a real token -> (B, S, D)."""
        S = input_ids.shape[1]
        x = self.embed_tokens(input_ids) + self.embed_positions(S)             # (B, S, D)
        x = F.dropout(self.layernorm_embedding(x), self.dropout, self.training)
        mask = None if real is None else real[:, None, None, :]                 # (B, 1, 1, S)
        for layer in self.layers:
            x = layer(x, mask)
        return x


class BartDecoder(nn.Module):
    """embed_tokens, embed_positions, layers (decoder_layers BartDecoderLayers), layernorm_embedding."""

    def __init__(self, config: BartConfig, embed_scale: float):
        super().__init__()
        D = config.d_model
        self.dropout = config.dropout
        self.embed_tokens = BartScaledWordEmbedding(config.vocab_size, D, config.pad_token_id, embed_scale)
        self.embed_positions = BartLearnedPositionalEmbedding(config.max_position_embeddings, D)
        self.layers = nn.ModuleList([BartDecoderLayer(config) for _ in range(config.decoder_layers)])
        self.layernorm_embedding = nn.LayerNorm(D)

    def forward(self, input_ids, memory: Tensor, real=None, memory_real=None, cache: DecoderKVCache = None):
        """input_ids (B, T) checked ints at positions P .. P + T - 1 (P = cache.length);
        real: None (no cache only) or (B, P + T) bool, True = a real target token; memory (B, S, D),
        memory_real None or (B, S) bool. Returns (B, T, D); a cache grows by T."""
        T = input_ids.shape[1]
        P = 0 if cache is None else cache.length
        y = self.embed_tokens(input_ids) + self.embed_positions(T, P)          # (B, T, D)
        y = F.dropout(self.layernorm_embedding(y), self.dropout, self.training)
        self_mask = None                                                        # plain causal
        if real is not None or P:
            xp = y.xp
            self_mask = (xp.arange(P + T)[None, :] <= (P + xp.arange(T))[:, None])[None, None]   # (1, 1, T, P + T)
            if real is not None:
                self_mask = self_mask & real[:, None, None, :]                 # (B, 1, T, P + T)
        cross_mask = None if memory_real is None else memory_real[:, None, None, :]   # (B, 1, 1, S)
        for i, layer in enumerate(self.layers):
            y = layer(y, memory, self_mask, cross_mask, cache, i)
        if cache is not None:
            cache.tgt_pad = ~real                                               # BartModel always gives real here
        return y
