"""T5's configuration and layers (HF's names): the feed-forwards, the attention with its relative position bias,
the pre-norm blocks and the stack. The models built from them, and what T5 computes, are in t5.py.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import NamedTuple, Optional

import numpy as np

from .. import backend, ops
from .. import nn
from ..nn import functional as F
from ..nn.relative import relative_position_bucket
from ..ops._core import constant
from ..tensor import Tensor
from .config import require_bools, require_positive_ints, require_token_ids
from .seq2seq import DecoderKVCache

FEED_FORWARD_PROJ = ("relu", "gated-gelu")


@dataclass(frozen=True)
class T5Config:
    """Hyperparameters of a T5, HF's T5Config fields and defaults (t5-small).

    num_decoder_layers None means num_layers. feed_forward_proj: "relu" (T5) or "gated-gelu" (T5 v1.1,
    mT5, Flan-T5; GELU's tanh form). tie_word_embeddings: lm_head.weight is shared.weight.
    scale_decoder_outputs (None: tie_word_embeddings): multiply the decoder's output by d_model^-0.5
    before lm_head; transformers 5 keeps the two apart (it ties lm_head even without the scaling).
    initializer_factor: scales every initial standard deviation, as HF's. decoder_start_token_id:
    the first decoder token (T5's is the pad token 0); labels shift right behind it.
    """
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: Optional[int] = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    initializer_factor: float = 1.0
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    scale_decoder_outputs: Optional[bool] = None
    pad_token_id: Optional[int] = 0
    eos_token_id: Optional[int] = 1
    decoder_start_token_id: Optional[int] = 0

    def __post_init__(self):
        owner = type(self).__name__
        if self.num_decoder_layers is None:
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        if self.scale_decoder_outputs is None:
            object.__setattr__(self, "scale_decoder_outputs", self.tie_word_embeddings)
        require_positive_ints(self, ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
                                     "num_heads", "relative_attention_num_buckets", "relative_attention_max_distance"))
        nb, md = self.relative_attention_num_buckets, self.relative_attention_max_distance
        if nb < 4 or md <= nb // 2:
            raise ValueError(f"{owner}: relative_attention_num_buckets must be >= 4 and relative_attention_max_"
                             f"distance > relative_attention_num_buckets // 2 (the decoder's exact buckets); got {nb} "
                             f"and {md}")
        v = self.dropout_rate
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0.0 <= v < 1.0:
            raise ValueError(f"{owner}.dropout_rate must be in [0, 1); got {v!r}")
        for name in ("layer_norm_epsilon", "initializer_factor"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"{owner}.{name} must be a finite number > 0; got {v!r}")
        if self.feed_forward_proj not in FEED_FORWARD_PROJ:
            raise ValueError(f"{owner}.feed_forward_proj must be one of {', '.join(map(repr, FEED_FORWARD_PROJ))}; "
                             f"got {self.feed_forward_proj!r}")
        require_bools(self, ("tie_word_embeddings", "scale_decoder_outputs"))
        require_token_ids(self, ("pad_token_id", "eos_token_id", "decoder_start_token_id"))

    def to_dict(self) -> dict:
        return asdict(self)


class T5StackOutput(NamedTuple):
    """A stack's output: last_hidden_state (B, L, D); past_key_values (the decoder's cache) or None."""
    last_hidden_state: Tensor
    past_key_values: Optional[DecoderKVCache]


# ----------------------------------------------------------------------------- layers

class T5DenseActDense(nn.Module):
    """wo(dropout(relu(wi(x)))): (B, L, D) -> (B, L, D) through (B, L, F)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x: Tensor) -> Tensor:
        return self.wo(self.dropout(F.relu(self.wi(x))))


class T5DenseGatedActDense(nn.Module):
    """wo(dropout(gelu_tanh(wi_0(x)) * wi_1(x))): T5 v1.1's gated-gelu, (B, L, D) -> (B, L, D)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x: Tensor) -> Tensor:
        return self.wo(self.dropout(F.gelu(self.wi_0(x), "tanh") * self.wi_1(x)))


class T5LayerFF(nn.Module):
    """x + dropout(DenseReluDense(layer_norm(x)))."""

    def __init__(self, config: T5Config):
        super().__init__()
        gated = config.feed_forward_proj == "gated-gelu"
        self.DenseReluDense = (T5DenseGatedActDense if gated else T5DenseActDense)(config)
        self.layer_norm = nn.RMSNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.dropout(self.DenseReluDense(self.layer_norm(x)))


class T5Attention(nn.Module):
    """Multi-head attention softmax(q k^T + position_bias + mask) v, unscaled, no biases: HF's names
    q, k, v: D -> H d, o: H d -> D; with has_relative_attention_bias (a stack's block 0), the table
    relative_attention_bias (num_buckets, H) that compute_bias reads for every block of the stack."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool = False, is_decoder: bool = False):
        super().__init__()
        D, H, d = config.d_model, config.num_heads, config.d_kv
        self.n_heads, self.key_value_proj_dim, self.is_decoder = H, d, is_decoder
        self.dropout = config.dropout_rate                           # on the attention weights
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.has_relative_attention_bias = has_relative_attention_bias
        self.q = nn.Linear(D, H * d, bias=False)
        self.k = nn.Linear(D, H * d, bias=False)
        self.v = nn.Linear(D, H * d, bias=False)
        self.o = nn.Linear(H * d, D, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(self.num_buckets, H)

    def compute_bias(self, query_length: int, key_length: int, offset: int = 0) -> Tensor:
        """(1, H, L, S): bias[0, h, i, j] = relative_attention_bias[bucket(j - (offset + i)), h], query i
        at position offset + i (after `offset` cached tokens); buckets bidirectional in the encoder
        (npformer.nn.relative_position_bucket, float32 logs as T5's)."""
        table = self.relative_attention_bias.weight
        relative = table.xp.arange(key_length)[None, :] - (offset + table.xp.arange(query_length)[:, None])  # (L, S)
        buckets = relative_position_bucket(relative, not self.is_decoder, self.num_buckets, self.max_distance)
        values = self.relative_attention_bias(buckets)                                    # (L, S, H)
        return ops.reshape(ops.permute(values, (2, 0, 1)), (1, self.n_heads, query_length, key_length))

    def forward(self, x: Tensor, mask=None, position_bias=None, key_value_states=None, past_key_value=None):
        """x (B, T, D) -> (out (B, T, D), (k, v) (B, H, S, d): the keys and values attended, for the cache).

        Self-attention (key_value_states None): keys and values of x, after past_key_value's (B, H, P, d).
        Cross-attention: those of key_value_states (B, S, D), or past_key_value as it is (projected once).
        mask: bool broadcastable to (B, H, T, S), True = attend; position_bias: (1, H, T, S) or None.
        """
        B, T, _ = x.shape
        H, d = self.n_heads, self.key_value_proj_dim
        def heads(t):                                                                      # (B, L, H d) -> (B, H, L, d)
            return ops.transpose(ops.reshape(t, (B, t.shape[1], H, d)), 1, 2)
        q = heads(self.q(x))                                                               # (B, H, T, d)
        if key_value_states is not None and past_key_value is not None:
            k, v = past_key_value                                                          # (B, H, S, d)
        else:
            source = x if key_value_states is None else key_value_states
            k, v = heads(self.k(source)), heads(self.v(source))                            # (B, H, L, d)
            if past_key_value is not None:
                k = ops.concatenate([past_key_value[0], k], axis=2)                       # (B, H, P + T, d)
                v = ops.concatenate([past_key_value[1], v], axis=2)
        p = self.dropout if self.training else 0.0
        y = ops.attention(q, k, v, mask, scale=1.0, dropout_p=p, bias=position_bias)       # (B, H, T, d)
        return self.o(ops.reshape(ops.transpose(y, 1, 2), (B, T, H * d))), (k, v)          # (B, T, D)


class T5LayerSelfAttention(nn.Module):
    """x + dropout(SelfAttention(layer_norm(x)))."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool, is_decoder: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias, is_decoder)
        self.layer_norm = nn.RMSNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x, mask, position_bias, past_key_value=None):
        a, present = self.SelfAttention(self.layer_norm(x), mask, position_bias, None, past_key_value)
        return x + self.dropout(a), present


class T5LayerCrossAttention(nn.Module):
    """x + dropout(EncDecAttention(layer_norm(x), encoder states)), without position bias."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.EncDecAttention = T5Attention(config, False, is_decoder=True)
        self.layer_norm = nn.RMSNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x, key_value_states, mask, past_key_value=None):
        a, present = self.EncDecAttention(self.layer_norm(x), mask, None, key_value_states, past_key_value)
        return x + self.dropout(a), present


class T5Block(nn.Module):
    """`layer`: [T5LayerSelfAttention, (decoder) T5LayerCrossAttention, T5LayerFF], in HF's order."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool, is_decoder: bool):
        super().__init__()
        self.is_decoder = is_decoder
        self.layer = nn.ModuleList([T5LayerSelfAttention(config, has_relative_attention_bias, is_decoder)])
        if is_decoder:
            self.layer.append(T5LayerCrossAttention(config))
        self.layer.append(T5LayerFF(config))

    def forward(self, x, mask, position_bias, encoder_hidden_states=None, encoder_mask=None,
                cache: DecoderKVCache = None, i: int = 0) -> Tensor:
        """x (B, T, D) -> (B, T, D). With a cache (this is decoder block i): the self-attention keys and
        values are the cached P and these T (stored back); the cross-attention ones are projected from
        encoder_hidden_states on the first call and reused after (the same arrays)."""
        c = cache
        past = None if c is None or c.self_k[i] is None else (Tensor(c.self_k[i]), Tensor(c.self_v[i]))
        x, (k, v) = self.layer[0](x, mask, position_bias, past)
        if c is not None:
            c.self_k[i], c.self_v[i] = k.data, v.data                                 # (B, H, P + T, d)
        if self.is_decoder:
            past = None if c is None or c.cross_k[i] is None else (Tensor(c.cross_k[i]), Tensor(c.cross_v[i]))
            x, (k, v) = self.layer[1](x, encoder_hidden_states, encoder_mask, past)
            if c is not None:
                c.cross_k[i], c.cross_v[i] = k.data, v.data                           # (B, H, S, d)
        return self.layer[-1](x)


class T5Stack(nn.Module):
    """The encoder or the decoder: embed_tokens (the model's `shared`), block, final_layer_norm.

    forward(input_ids=None, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
            inputs_embeds=None, past_key_values=None, use_cache=False) -> T5StackOutput
    """

    def __init__(self, config: T5Config, embed_tokens: nn.Embedding, is_decoder: bool):
        super().__init__()
        self.config, self.is_decoder = config, is_decoder
        self.embed_tokens = embed_tokens
        n = config.num_decoder_layers if is_decoder else config.num_layers
        self.block = nn.ModuleList([T5Block(config, i == 0, is_decoder) for i in range(n)])
        self.final_layer_norm = nn.RMSNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.where = "T5 decoder" if is_decoder else "T5 encoder"
        self.names = ("decoder_input_ids", "decoder_attention_mask", "decoder_inputs_embeds") if is_decoder else \
            ("input_ids", "attention_mask", "inputs_embeds")

    def forward(self, input_ids=None, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                inputs_embeds=None, past_key_values: DecoderKVCache = None, use_cache: bool = False) -> T5StackOutput:
        """input_ids: (B, T) ints in [0, vocab_size), or inputs_embeds (B, T, D); exactly one.
        attention_mask: (B, P + T), HF's polarity: 1 (True) = a real token, 0 = padding; with a cache,
        (B, T) is taken as the new tokens' part; None: all real. The decoder also attends causally, and
        to encoder_hidden_states (B, S, D) where encoder_attention_mask (B, S) is 1. past_key_values
        (decoder): a DecoderKVCache of earlier calls, extended in place and returned; use_cache starts
        one. The cache holds plain arrays: no gradient flows into the past (generation only)."""
        x = self._embeddings(input_ids, inputs_embeds)                                   # (B, T, D)
        B, T = x.shape[:2]
        if use_cache not in (True, False) or (not self.is_decoder and (use_cache or past_key_values is not None)):
            raise ValueError(f"{self.where}: use_cache must be True or False, and a cache is for the decoder only; "
                             f"got use_cache={use_cache!r}")
        cache = past_key_values if past_key_values is not None else (
            DecoderKVCache(len(self.block)) if use_cache else None)
        enc_mask = None
        if self.is_decoder:
            h = encoder_hidden_states
            if h is None or h.ndim != 3 or h.shape[0] != B:
                raise ValueError(f"{self.where}: encoder_hidden_states (B, S, d_model) with B = {B} are needed; got "
                                 f"{None if h is None else tuple(h.shape)}")
            enc_mask = self._key_mask("attention_mask", encoder_attention_mask, B, h.shape[1])   # (B, 1, 1, S)
        P = self._check_cache(cache, B, None if encoder_hidden_states is None else encoder_hidden_states.shape[1])
        real = self._real(attention_mask, B, T, cache)                                   # (B, P + T) or None
        mask = None if real is None else real[:, None, None, :]                          # (B, 1, 1, P + T)
        if self.is_decoder:
            causal = x.xp.tri(T, P + T, k=P, dtype=bool)                                 # (T, P + T): key j <= P + i
            mask = causal if mask is None else mask & causal                             # (B, 1, T, P + T)
        bias = self.block[0].layer[0].SelfAttention.compute_bias(T, P + T, P)           # (1, H, T, P + T)
        x = self.dropout(x)
        for i, block in enumerate(self.block):
            x = block(x, mask, bias, encoder_hidden_states, enc_mask, cache, i)
        if cache is not None:
            cache.tgt_pad = ~real
        return T5StackOutput(self.dropout(self.final_layer_norm(x)), cache)              # (B, T, D)

    # ------------------------------------------------------------------ inputs
    def _array(self, name: str, value):
        return constant(self.where, value, self.embed_tokens.weight, f"{name} is", "the model is")

    def _embeddings(self, input_ids, inputs_embeds) -> Tensor:
        ids_name, _, embeds_name = self.names
        w, D, V = self.embed_tokens.weight, self.config.d_model, self.config.vocab_size
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(f"{self.where}: pass exactly one of {ids_name} and {embeds_name}")
        if inputs_embeds is not None:
            x = inputs_embeds if isinstance(inputs_embeds, Tensor) else Tensor(self._array(embeds_name, inputs_embeds))
            if x.ndim != 3 or x.shape[1] < 1 or x.shape[2] != D:
                raise ValueError(f"{self.where}: {embeds_name} must have shape (B, T, d_model) = (B, T, {D}) with "
                                 f"T >= 1; got {tuple(x.shape)}")
            if x.dtype != w.dtype:
                raise TypeError(f"{self.where}: {embeds_name} is {x.dtype} but the model is {w.dtype}; nothing is cast")
            return x
        ids = self._array(ids_name, input_ids)
        if ids.dtype.kind not in "iu" or ids.ndim != 2 or ids.shape[1] < 1:
            raise ValueError(f"{self.where}: {ids_name} must be integers of shape (B, T) with T >= 1; got {ids.dtype} "
                             f"{tuple(ids.shape)}")
        if int(ids.min()) < 0 or int(ids.max()) >= V:
            raise ValueError(f"{self.where}: {ids_name} {tuple(ids.shape)} holds values outside [0, vocab_size) = "
                             f"[0, {V}): min {int(ids.min())}, max {int(ids.max())}")
        return self.embed_tokens(ids)                                                    # (B, T, D)

    def _key_mask(self, name: str, mask, B: int, S: int):
        """(B, 1, 1, S) bool, True = attend: the keys where mask is nonzero; None for None."""
        real = self._real_array(name, mask, B, S)
        return None if real is None else real[:, None, None, :]

    def _real_array(self, name: str, mask, B: int, S: int):
        """mask as (B, S) bool, True = a real token; None for None."""
        if mask is None:
            return None
        m = self._array(name, mask)
        if (m.dtype != np.bool_ and m.dtype.kind not in "iuf") or tuple(m.shape) != (B, S):
            past = " (past + new tokens)" if name == self.names[1] and self.is_decoder else ""
            raise ValueError(f"{self.where}: {name} must be 1/0 (or bool) of shape (B, S) = {(B, S)}{past}; got "
                             f"{m.dtype} {tuple(m.shape)}")
        return m != 0

    def _real(self, mask, B: int, T: int, cache):
        """(B, P + T) bool, True = a real token: the mask, or its new part after the cache's; None when
        there is neither a mask nor a cache."""
        P = 0 if cache is None else cache.length
        if mask is not None and not (P and np.shape(mask) == (B, T)):
            return self._real_array(self.names[1], mask, B, P + T)
        if cache is None:
            return None
        new = self._real_array(self.names[1], mask, B, T) if mask is not None else \
            self.embed_tokens.weight.xp.ones((B, T), dtype=bool)                           # (B, T)
        return new if not P else backend.get_array_module(new).concatenate([~cache.tgt_pad, new], axis=1)

    def _check_cache(self, cache, B: int, S: int) -> int:
        """The cache's length P, after checking that it fits this call."""
        if cache is None:
            return 0
        n = len(self.block)
        if not isinstance(cache, DecoderKVCache) or len(cache.self_k) != n:
            raise ValueError(f"{self.where}: past_key_values must be a DecoderKVCache of {n} layers (the "
                             f"past_key_values of an earlier call); got {type(cache).__name__}")
        if cache.tgt_pad is not None and cache.tgt_pad.shape[0] != B:
            raise ValueError(f"{self.where}: past_key_values holds batch size {cache.tgt_pad.shape[0]}; got {B}")
        if cache.cross_k[0] is not None and cache.cross_k[0].shape[2] != S:
            raise ValueError(f"{self.where}: past_key_values holds a source of length {cache.cross_k[0].shape[2]}; "
                             f"got {S}")
        return cache.length
