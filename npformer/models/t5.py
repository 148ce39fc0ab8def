"""T5 (Raffel et al., 2020): a pre-norm encoder-decoder Transformer with RMS layer norms, learned
relative position buckets and no biases, with HF's names.

    encoder  x = shared(input_ids)                                            (B, S, D)
             every block:  x = x + SelfAttention(layer_norm(x))               all keys, bias from block 0
                           x = x + DenseReluDense(layer_norm(x))
             h = final_layer_norm(x)
    decoder  y = shared(decoder_input_ids)                                    (B, T, D)
             every block:  y = y + SelfAttention(layer_norm(y))               causal, bias from block 0
                           y = y + EncDecAttention(layer_norm(y), h)          no position bias
                           y = y + DenseReluDense(layer_norm(y))
             logits = lm_head(final_layer_norm(y) * D^-0.5)                   (B, T, V); the scaling only
                                                                              with scale_decoder_outputs
Attention is softmax(q k^T + bias + mask) v, unscaled (T5 folds 1/sqrt(d_kv) into q's initialisation).
The layer norm is an RMS norm with a weight: x / sqrt(mean(x^2) + eps) * weight. The feed-forward is
wo(relu(wi(x))), or T5 v1.1's gated wo(gelu_tanh(wi_0(x)) * wi_1(x)).

Shapes: B batch, S source length, T new target tokens, P cached target tokens, D = d_model,
H = num_heads, d = d_kv, F = d_ff, V = vocab_size. Module and parameter names are those of HF
transformers' modeling_t5.py (``decoder.block.0.layer.1.EncDecAttention.q.weight``): the one embedding
`shared` is also each stack's `embed_tokens`, so state dicts list it under all three names, as HF's do.
Dropout sits where HF has it: on the embeddings, on the attention weights, after the feed-forward's
activation, on each sublayer's output before its residual add, and after each final_layer_norm.
past_key_values is npformer's DecoderKVCache (models/seq2seq.py), as for the other encoder-decoders here:
the decoder's keys and values grow in it, the cross-attention ones are projected once; generate() decodes
greedily with it.

Numerics. HF's T5LayerNorm computes mean(x^2) in float32 even in a float64 model; this computes it in
the model's dtype, so a float64 T5 here is float64 throughout. Against HF as shipped (transformers 5.25,
tiny random float64 models) the logits differ by 2e-7 to 5e-6 of their largest magnitude; against HF with
that norm computed in float64, by about 1e-14 (gradients 1e-13; tests/test_interop_t5.py). A query with
no key left to attend (a left-padded decoder's first positions) gets a zero attention output here; HF's
eager path spreads it evenly over the masked keys. Neither changes a real position of a right-padded batch.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import asdict, dataclass
from typing import NamedTuple, Optional

import numpy as np

from .. import backend, ops, random
from .. import nn
from ..autograd import no_grad
from ..dtypes import default_dtype, resolve
from ..nn import functional as F
from ..nn import init
from ..nn.relative import relative_position_bucket
from ..ops._core import constant
from ..tensor import Tensor
from .config import require_positive_ints
from .seq2seq import DecoderKVCache, Seq2SeqLMOutput, Seq2SeqModelOutput

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
        for name in ("tie_word_embeddings", "scale_decoder_outputs"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{owner}.{name} must be True or False; got {getattr(self, name)!r}")
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            i = getattr(self, name)
            if i is not None and (isinstance(i, bool) or not isinstance(i, numbers.Integral)
                                  or not 0 <= i < self.vocab_size):
                raise ValueError(f"{owner}.{name} must be None or an int in [0, vocab_size) = [0, {self.vocab_size}); "
                                 f"got {i!r}")

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


# ----------------------------------------------------------------------------- models

class T5PreTrainedModel(nn.Module):
    """Base of T5Model and T5ForConditionalGeneration: the config, the trunk (shared, encoder, decoder),
    HF's initialisation, the dtype and the device (as BertPreTrainedModel: the layers are built inside
    ``with self.building(dtype):``, then post_init)."""

    def __init__(self, config: T5Config):
        super().__init__()
        if not isinstance(config, T5Config):
            raise TypeError(f"{type(self).__name__}: config must be a T5Config; got {type(config).__name__}")
        self.config = config

    @staticmethod
    @contextlib.contextmanager
    def building(dtype):
        """Inside: `dtype` is the default dtype, and the layers' own initialisation (overwritten by
        post_init) comes from a throwaway generator, leaving the process's global one untouched."""
        with random.thread_default_generator(np.random.default_rng(0), "cpu"), default_dtype(resolve(dtype)):
            yield

    def _build_trunk(self, config: T5Config) -> None:
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, self.shared, is_decoder=False)
        self.decoder = T5Stack(config, self.shared, is_decoder=True)

    def post_init(self, generator=None, device: str = None, init_weights: bool = True):
        """HF's initialisation (when init_weights), then move every weight to `device`."""
        if init_weights:
            self._init_weights(generator)
        return self.to(device=device or backend.default_device())

    def _init_weights(self, generator):
        """HF's T5 initialisation, every standard deviation times initializer_factor: shared and an untied
        lm_head N(0, 1); wi, wi_0, wi_1, k, v and relative_attention_bias N(0, D^-1); q N(0, (D d)^-1);
        wo N(0, F^-1); o N(0, (H d)^-1); layer norm weights one. generator: a numpy.random.Generator
        (seed 0 when None), drawn in named_parameters order."""
        rng = generator if generator is not None else np.random.default_rng(0)
        c = self.config
        f, D, H, d = c.initializer_factor, c.d_model, c.num_heads, c.d_kv
        std = {"shared": 1.0, "lm_head": 1.0, "wi": D ** -0.5, "wi_0": D ** -0.5, "wi_1": D ** -0.5,
               "wo": c.d_ff ** -0.5, "q": (D * d) ** -0.5, "k": D ** -0.5, "v": D ** -0.5, "o": (H * d) ** -0.5,
               "relative_attention_bias": D ** -0.5}
        for name, p in self.named_parameters():
            owner = name.split(".")[-2]
            if owner in std:
                init.normal_(p, std=f * std[owner], generator=rng)
            else:                                                   # the layer norms
                p.data[...] = f

    def _trunk(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, encoder_outputs,
               past_key_values, inputs_embeds, decoder_inputs_embeds, use_cache):
        """(decoder output, encoder last hidden state): the encoder runs unless encoder_outputs are given."""
        if encoder_outputs is None:
            h = self.encoder(input_ids, attention_mask, inputs_embeds=inputs_embeds).last_hidden_state   # (B, S, D)
        else:
            h = encoder_outputs if isinstance(encoder_outputs, Tensor) or backend.is_array(encoder_outputs) \
                else encoder_outputs[0]
            h = h if isinstance(h, Tensor) else Tensor(self.encoder._array("encoder_outputs", h))
            w = self.shared.weight
            if h.ndim != 3 or h.shape[2] != self.config.d_model or h.dtype != w.dtype:
                raise ValueError(f"{type(self).__name__}: encoder_outputs must be (B, S, d_model) = (B, S, "
                                 f"{self.config.d_model}) in {w.dtype}, or a tuple starting with it; got "
                                 f"{h.dtype} {tuple(h.shape)}")
        out = self.decoder(decoder_input_ids, decoder_attention_mask, h, attention_mask, decoder_inputs_embeds,
                           past_key_values, use_cache)
        return out, h

    @classmethod
    def from_pretrained(cls, path, dtype=None, device: str = None):
        """npformer.interop.t5.t5_from_pretrained(path, dtype, device): an HF checkpoint directory."""
        from ..interop.t5 import t5_from_pretrained
        return t5_from_pretrained(path, dtype, device=device,
                                  architecture=None if cls is T5PreTrainedModel else cls.__name__)

    def save_pretrained(self, path) -> None:
        """npformer.interop.t5.t5_save_pretrained(self, path): config.json and model.safetensors, as HF writes them."""
        from ..interop.t5 import t5_save_pretrained
        t5_save_pretrained(self, path)


class T5Model(T5PreTrainedModel):
    """T5's encoder and decoder without the LM head: shared, encoder, decoder.

    forward(input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None, *,
            encoder_outputs=None, past_key_values=None, inputs_embeds=None, decoder_inputs_embeds=None,
            use_cache=False) -> Seq2SeqModelOutput(last_hidden_state, past_key_values, encoder_last_hidden_state)
    """

    def __init__(self, config: T5Config, generator=None, dtype=None, device: str = None, init_weights: bool = True):
        """generator: a numpy.random.Generator for the initial weights (seed 0 when None); dtype: the
        weights' dtype (npformer's default when None); device: where they live (NPFORMER_DEVICE when
        None); init_weights=False keeps the layers' own initialisation (for weights loaded next)."""
        super().__init__(config)
        with self.building(dtype):
            self._build_trunk(config)
        self.post_init(generator, device, init_weights)

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None, *,
                encoder_outputs=None, past_key_values=None, inputs_embeds=None, decoder_inputs_embeds=None,
                use_cache: bool = False) -> Seq2SeqModelOutput:
        """The encoder (unless encoder_outputs are given), then the decoder.

        input_ids: (B, S) ints in [0, vocab_size), or inputs_embeds (B, S, D), or neither when
            encoder_outputs (B, S, D) (or a tuple starting with it, as the encoder returns) are given.
        attention_mask: (B, S), 1 (True) = a real source token, 0 = padding; None: all real.
        decoder_input_ids: (B, T) ints, or decoder_inputs_embeds (B, T, D).
        decoder_attention_mask: (B, P + T), 1 = a real target token (with a cache, (B, T) is taken as the
            new tokens' part); None: all real. The decoder is causal on top.
        past_key_values: a DecoderKVCache of earlier calls (P = its length), extended in place and
            returned: the new tokens sit at positions P, P + 1, ... (the relative bias uses that offset),
            the cross-attention keys and values are projected once and reused.
        use_cache: start a DecoderKVCache when none is given. It holds plain arrays: no gradient flows
            into the past (generation only)."""
        out, h = self._trunk(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, encoder_outputs,
                             past_key_values, inputs_embeds, decoder_inputs_embeds, use_cache)
        return Seq2SeqModelOutput(out.last_hidden_state, out.past_key_values, h)


class T5ForConditionalGeneration(T5PreTrainedModel):
    """T5 with its LM head: shared, encoder, decoder, lm_head Linear(D, V) without bias (shared.weight
    itself when tie_word_embeddings).

    forward(input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None, *,
            encoder_outputs=None, past_key_values=None, inputs_embeds=None, decoder_inputs_embeds=None,
            labels=None, use_cache=False) -> Seq2SeqLMOutput(loss, logits, past_key_values, encoder_last_hidden_state)
    generate(input_ids, attention_mask=None, max_new_tokens=20): greedy decoding with the KV cache.
    """

    def __init__(self, config: T5Config, generator=None, dtype=None, device: str = None, init_weights: bool = True):
        """generator, dtype, device, init_weights: as T5Model's."""
        super().__init__(config)
        with self.building(dtype):
            self._build_trunk(config)
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight                                  # (V, D), shared
        self.post_init(generator, device, init_weights)

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None, *,
                encoder_outputs=None, past_key_values=None, inputs_embeds=None, decoder_inputs_embeds=None,
                labels=None, use_cache: bool = False) -> Seq2SeqLMOutput:
        """Inputs as T5Model.forward. labels: (B, T) ints in [0, vocab_size), or -100 (ignored); the loss
        is the mean cross-entropy over the others (nan when none). Without decoder_input_ids (and
        decoder_inputs_embeds) the decoder reads the labels shifted right behind decoder_start_token_id,
        -100 read as pad_token_id (HF's _shift_right)."""
        y = None if labels is None else self.encoder._array("labels", labels)
        if y is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = self._shift_right(y)
        out, h = self._trunk(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, encoder_outputs,
                             past_key_values, inputs_embeds, decoder_inputs_embeds, use_cache)
        x = out.last_hidden_state                                                      # (B, T, D)
        if self.config.scale_decoder_outputs:
            x = x * self.config.d_model ** -0.5
        logits = self.lm_head(x)                                                       # (B, T, V)
        loss = None if y is None else self._loss(logits, y)
        return Seq2SeqLMOutput(loss, logits, out.past_key_values, h)

    def _shift_right(self, y):
        """[decoder_start_token_id, y_0, .., y_{T-2}] per row, -100 replaced by pad_token_id."""
        c = self.config
        for name in ("decoder_start_token_id", "pad_token_id"):
            if getattr(c, name) is None:
                raise ValueError(f"{type(self).__name__}: labels without decoder_input_ids need config.{name}")
        if y.ndim != 2 or y.dtype.kind not in "iu":
            raise ValueError(f"{type(self).__name__}: labels must be integers of shape (B, T); got {y.dtype} "
                             f"{tuple(y.shape)}")
        xp = backend.get_array_module(y)
        shifted = xp.concatenate([xp.full((y.shape[0], 1), c.decoder_start_token_id, dtype=y.dtype), y[:, :-1]], 1)
        return xp.where(shifted == -100, c.pad_token_id, shifted)                     # (B, T)

    def _loss(self, logits: Tensor, y) -> Tensor:
        B, T, V = logits.shape
        where = type(self).__name__
        if y.dtype.kind not in "iu" or tuple(y.shape) != (B, T):
            raise ValueError(f"{where}: labels must be integers of shape (B, T) = {(B, T)}, the decoder's input; got "
                             f"{y.dtype} {tuple(y.shape)}")
        bad = ((y < 0) | (y >= V)) & (y != -100)
        if bool(bad.any()):
            raise ValueError(f"{where}: labels must be in [0, vocab_size) = [0, {V}) or -100 (ignored); "
                             f"got {int(y[bad].ravel()[0])}")
        return F.cross_entropy(logits.reshape(B * T, V), y.reshape(B * T), ignore_index=-100)

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 20, use_cache: bool = True) -> np.ndarray:
        """Greedy decoding, as HF's generate(do_sample=False, num_beams=1): (B, 1 + n) int64 host array,
        decoder_start_token_id then n <= max_new_tokens tokens, each row's argmax in turn; after a row's
        eos_token_id it gets pad_token_id, and decoding stops once every row has ended. The encoder runs
        once; with use_cache each step feeds only the newest token, the keys and values growing in a
        DecoderKVCache (use_cache=False: the whole prefix each step, the same tokens). Eval mode, no gradients."""
        c, where = self.config, type(self).__name__
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
            raise ValueError(f"{where}.generate: max_new_tokens must be an int >= 0; got {max_new_tokens!r}")
        if c.decoder_start_token_id is None or (c.eos_token_id is not None and c.pad_token_id is None):
            raise ValueError(f"{where}.generate needs config.decoder_start_token_id, and pad_token_id with "
                             f"eos_token_id")
        was_training = self.training
        self.eval()
        try:
            with no_grad():
                h = self.encoder(input_ids, attention_mask).last_hidden_state                  # (B, S, D)
                xp, B = h.xp, h.shape[0]
                ys = xp.full((B, 1), c.decoder_start_token_id, dtype=np.int64)
                done = xp.zeros(B, dtype=bool)
                cache = DecoderKVCache(c.num_decoder_layers) if use_cache else None
                for _ in range(max_new_tokens):
                    out = self(attention_mask=attention_mask, decoder_input_ids=ys[:, -1:] if use_cache else ys,
                               encoder_outputs=h, past_key_values=cache)
                    nxt = xp.argmax(out.logits.data[:, -1], axis=-1)                         # (B,)
                    if c.eos_token_id is not None:
                        nxt = xp.where(done, c.pad_token_id, nxt)
                        done = done | (nxt == c.eos_token_id)
                    ys = xp.concatenate([ys, nxt[:, None].astype(np.int64)], axis=1)
                    if bool(done.all()):
                        break
        finally:
            self.train(was_training)
        return backend.to_numpy(ys)
