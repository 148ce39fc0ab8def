"""BART (Lewis et al., 2019): a post-norm Transformer encoder-decoder with learned positions, with HF's names.

    encoder   x = LayerNorm(embed_tokens(src) * s + embed_positions(0 .. S-1))           (B, S, D)
              every layer:  x = LayerNorm(x + self_attn(x))                              bidirectional
                            x = LayerNorm(x + fc2(act(fc1(x))))
    decoder   y = LayerNorm(embed_tokens(tgt) * s + embed_positions(P .. P+T-1))         (B, T, D)
              every layer:  y = LayerNorm(y + self_attn(y))                              causal
                            y = LayerNorm(y + encoder_attn(y, x))                        keys/values from x
                            y = LayerNorm(y + fc2(act(fc1(y))))
    logits    = y shared^T + final_logits_bias                                          (B, T, V)

s = sqrt(D) with scale_embedding, else 1. Each attention is softmax(q k^T / sqrt(hd) + mask) v over
nh heads of hd = D / nh, written with npformer's `attention` op (HF scales by 1 / sqrt(hd) after
the product, and so does the op). embed_positions is a (max_position_embeddings + 2, D) table read
at position + 2, the offset BART inherited from fairseq. With tie_word_embeddings the encoder's and
the decoder's embed_tokens and lm_head are all `shared`, one parameter; without it they are four
separate ones and `shared` is left unused, as in HF transformers 5.

Shapes: B batch, S source length, T new target tokens, P cached target tokens, D = d_model, V = vocab_size.
Every module and parameter is named as in HF's modeling_bart.py (``model.encoder.layers.0.self_attn.q_proj.weight``),
so state dicts map one to one. Dropout sits where HF has it: after each layernorm_embedding, on the
attention weights (attention_dropout), after the activation (activation_dropout) and on each
sublayer's output before its residual add (dropout).

Masks use HF's polarity: 1 (or True) = a real token, 0 = padding; padded keys are left out of every
query's softmax (HF adds finfo.min to their scores: the same weights). Only a query with no real
key differs: it gets a zero attention output here, an even spread over all keys in HF.
The KV cache is seq2seq.DecoderKVCache: self-attention keys/values grow by T per call, the
cross-attention ones are projected from the encoder output on the first call and reused.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from .. import backend, nn, ops
from ..autograd import no_grad
from ..dtypes import resolve
from ..nn import functional as F
from ..nn import init
from ..ops._core import constant
from ..tensor import Tensor
from .bert import ACT2FN as _BERT_ACT2FN
from .bert import BertPreTrainedModel
from .config import require_divisible, require_dropout, require_positive_ints
from .seq2seq import DecoderKVCache, Seq2SeqLMOutput, Seq2SeqModelOutput

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
        for name in TOKEN_FIELDS:
            t = getattr(self, name)
            if t is not None and (isinstance(t, bool) or not isinstance(t, (int, np.integer))
                                  or not 0 <= t < self.vocab_size):
                raise ValueError(f"BartConfig.{name} must be None or an int in [0, vocab_size) = "
                                 f"[0, {self.vocab_size}); got {t!r}")
        for name in ("scale_embedding", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"BartConfig.{name} must be True or False; got {getattr(self, name)!r}")

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


# ----------------------------------------------------------------------------- models

class BartPreTrainedModel(nn.Module):
    """Base of the BART models: the config, HF's initialisation, dtype and device, input checks.

    A subclass builds its layers inside ``with self.building(dtype):`` (as BertPreTrainedModel),
    then calls ``self.post_init(generator, device, init_weights)``.
    """
    building = staticmethod(BertPreTrainedModel.building)
    post_init = BertPreTrainedModel.post_init

    def __init__(self, config: BartConfig):
        super().__init__()
        if not isinstance(config, BartConfig):
            raise TypeError(f"{type(self).__name__}: config must be a BartConfig; got {type(config).__name__}")
        self.config = config
        self._where = type(self).__name__                 # the name errors are reported under

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        """npformer.interop.bart.bart_from_pretrained(path, architecture=this class, **kwargs)."""
        from ..interop.bart import bart_from_pretrained
        return bart_from_pretrained(path, architecture=None if cls is BartPreTrainedModel else cls.__name__,
                                    **kwargs)

    def save_pretrained(self, path) -> None:
        """npformer.interop.bart.bart_save_pretrained(self, path): config.json, model.safetensors, as HF writes them."""
        from ..interop.bart import bart_save_pretrained
        bart_save_pretrained(self, path)

    def _init_weights(self, generator):
        """HF's: Linear and Embedding weights (positions too) N(0, init_std^2), the padding rows then
        zero, biases and final_logits_bias zero, LayerNorm weights one. generator: a
        numpy.random.Generator (seed 0 when None), drawn in named_parameters order (shared once)."""
        rng = generator if generator is not None else np.random.default_rng(0)
        for name, p in self.named_parameters():
            if p.ndim == 2:
                init.normal_(p, std=self.config.init_std, generator=rng)
            elif name.endswith("bias"):
                init.zeros_(p)
            else:                                                   # LayerNorm weights
                init.ones_(p)
        for m in self.modules():
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                m.weight.data[m.padding_idx] = 0

    # ------------------------------------------------------------------ inputs
    def _array(self, name: str, value):
        """value (Tensor, array or nested list) as an array on the model's device."""
        return constant(self._where, value, getattr(self, "model", self).shared.weight, f"{name} is", "the model is")

    def _ids(self, name: str, value, ignore: int = None):
        """(B, L) ints, L >= 1, in [0, vocab_size) (or == ignore)."""
        a = self._array(name, value)
        if a.dtype.kind not in "iu" or a.ndim != 2 or a.shape[1] < 1:
            raise ValueError(f"{self._where}: {name} must be integers of shape (B, L) with L >= 1; got {a.dtype} "
                             f"{tuple(a.shape)}")
        V = self.config.vocab_size
        bad = (a < 0) | (a >= V)
        if ignore is not None:
            bad &= a != ignore
        if bool(bad.any()):
            also = "" if ignore is None else f" or {ignore} (ignored)"
            raise ValueError(f"{self._where}: {name} {tuple(a.shape)} must hold ids in [0, vocab_size) = [0, {V})"
                             f"{also}; got {int(a[bad].ravel()[0])}")
        return a

    def _real(self, name: str, value, shape):
        """None, or a 1/0 (or bool) mask of `shape` as bool, True = a real token."""
        if value is None:
            return None
        m = self._array(name, value)
        if (m.dtype != np.bool_ and m.dtype.kind not in "iuf") or tuple(m.shape) != tuple(shape):
            raise ValueError(f"{self._where}: {name} must be 1/0 (or bool) of shape {tuple(shape)}; got {m.dtype} "
                             f"{tuple(m.shape)}")
        return m != 0

    def _positions(self, name: str, T: int, past: int = 0) -> None:
        if past + T > self.config.max_position_embeddings:
            got = f"{T} positions" if not past else f"positions {past} .. {past + T - 1} (cached {past} + new {T})"
            raise ValueError(f"{self._where}: {name} needs {got}, more than max_position_embeddings = "
                             f"{self.config.max_position_embeddings}")


class BartModel(BartPreTrainedModel):
    """`shared` (the token embeddings), `encoder` and `decoder`; no head.

    forward(input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
            encoder_outputs=None, past_key_values=None, use_cache=False)
        -> Seq2SeqModelOutput(last_hidden_state (B, T, D), past_key_values, encoder_last_hidden_state (B, S, D)).
    """

    def __init__(self, config: BartConfig, generator=None, dtype=None, device: str = None,
                 init_weights: bool = True):
        """generator: a numpy.random.Generator for the initial weights (seed 0 when None); dtype: the
        weights' dtype (npformer's default when None); device: where they live (NPFORMER_DEVICE when
        None); init_weights=False keeps the layers' own initialisation (for weights loaded next)."""
        super().__init__(config)
        scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        with self.building(dtype):
            self.shared = BartScaledWordEmbedding(config.vocab_size, config.d_model, config.pad_token_id, scale)
            self.encoder = BartEncoder(config, scale)
            self.decoder = BartDecoder(config, scale)
        if config.tie_word_embeddings:
            self.encoder.embed_tokens.weight = self.shared.weight             # (V, D), one parameter
            self.decoder.embed_tokens.weight = self.shared.weight
        self.post_init(generator, device, init_weights)

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                encoder_outputs=None, past_key_values=None, use_cache: bool = False) -> Seq2SeqModelOutput:
        """input_ids: (B, S) ints in [0, vocab_size), S <= max_position_embeddings; may be None when
            encoder_outputs is given (and decoder_input_ids too).
        attention_mask: (B, S), 1 (or True) = a real source token, 0 = padding; None: all real.
        decoder_input_ids: (B, T) ints; None: shift_tokens_right(input_ids), as HF's BartModel.
        decoder_attention_mask: (B, P + T), 1 = a real target token (causal on top); with a cache
            (B, T) is taken as the new tokens' part; None: all real.
        encoder_outputs: the encoder's (B, S, D) output (a Tensor, an array, anything with
            .last_hidden_state, or an HF-style tuple); the encoder is then not run.
        past_key_values: a DecoderKVCache of earlier calls (P = its length): decoder_input_ids are
            the next T tokens, at positions P .. P + T - 1; it is extended in place and returned.
        use_cache: start a DecoderKVCache when none is given. The cache holds plain arrays:
            gradients do not flow into the past (generation only).
        """
        c, where = self.config, self._where
        ids = None if input_ids is None else self._ids("input_ids", input_ids)
        if decoder_input_ids is None:
            if ids is None or past_key_values is not None:
                raise ValueError(f"{where}: pass decoder_input_ids (the new tokens with past_key_values; without "
                                 f"them, input_ids are shifted right to make them)")
            start = c.decoder_start_token_id if c.decoder_start_token_id is not None else c.bos_token_id
            dec = shift_tokens_right(ids, c.pad_token_id, start)
        else:
            dec = self._ids("decoder_input_ids", decoder_input_ids)
        if encoder_outputs is None:
            if ids is None:
                raise ValueError(f"{where}: pass input_ids or encoder_outputs")
            self._positions("input_ids", ids.shape[1])
            real = self._real("attention_mask", attention_mask, ids.shape)
            memory = self.encoder(ids, real)                                     # (B, S, D)
        else:
            memory = self._memory(encoder_outputs)
            real = self._real("attention_mask", attention_mask, memory.shape[:2])
        B, T = dec.shape
        if memory.shape[0] != B:
            raise ValueError(f"{where}: decoder_input_ids has batch size {B} but the source has {memory.shape[0]}")
        if not isinstance(use_cache, (bool, np.bool_)):
            raise ValueError(f"{where}: use_cache must be True or False; got {use_cache!r}")
        cache = past_key_values if past_key_values is not None else (
            DecoderKVCache(c.decoder_layers) if use_cache else None)
        P = self._check_cache(cache, B, memory.shape[1])
        self._positions("decoder_input_ids", T, P)
        dec_real = self._decoder_real(decoder_attention_mask, B, T, cache)
        h = self.decoder(dec, memory, dec_real, real, cache)                    # (B, T, D)
        return Seq2SeqModelOutput(h, cache, memory)

    def _memory(self, encoder_outputs) -> Tensor:
        """The (B, S, D) Tensor in encoder_outputs (a Tensor keeps its graph), checked."""
        h = encoder_outputs
        h = h.last_hidden_state if hasattr(h, "last_hidden_state") else h[0] if isinstance(h, (tuple, list)) else h
        h = h if isinstance(h, Tensor) else Tensor(self._array("encoder_outputs", h))
        D, w = self.config.d_model, self.shared.weight
        if h.ndim != 3 or h.shape[1] < 1 or h.shape[2] != D or h.dtype != w.dtype:
            raise ValueError(f"{self._where}: encoder_outputs must be {w.dtype} of shape (B, S, d_model) = (B, S, {D}); "
                             f"got {h.dtype} {tuple(h.shape)}")
        return h

    def _check_cache(self, cache, B: int, S: int) -> int:
        """The cache's length P, after checking that it fits this call."""
        if cache is None:
            return 0
        L = self.config.decoder_layers
        if not isinstance(cache, DecoderKVCache) or len(cache.self_k) != L:
            raise ValueError(f"{self._where}: past_key_values must be a DecoderKVCache of {L} layers (the "
                             f"past_key_values of an earlier call); got {type(cache).__name__}")
        if cache.tgt_pad is not None and cache.tgt_pad.shape[0] != B:
            raise ValueError(f"{self._where}: past_key_values holds batch size {cache.tgt_pad.shape[0]}; got {B}")
        if cache.cross_k[0] is not None and cache.cross_k[0].shape[2] != S:
            raise ValueError(f"{self._where}: past_key_values holds a source of length {cache.cross_k[0].shape[2]}; "
                             f"got {S}")
        return cache.length

    def _decoder_real(self, mask, B: int, T: int, cache):
        """(B, P + T) bool, True = a real target token; None when there is no mask and no cache."""
        P = 0 if cache is None else cache.length
        if mask is None:
            if cache is None:
                return None
            new = self.shared.weight.xp.ones((B, T), dtype=bool)                  # (B, T)
        else:
            m = self._array("decoder_attention_mask", mask)
            if not (P and tuple(m.shape) == (B, T)):                             # HF's: (B, P + T)
                return self._real("decoder_attention_mask", m, (B, P + T))
            new = self._real("decoder_attention_mask", m, (B, T))
        return new if not P else backend.get_array_module(new).concatenate([~cache.tgt_pad, new], axis=1)


class BartForConditionalGeneration(BartPreTrainedModel):
    """`model` (BartModel), `lm_head` Linear(D, V) without bias (tied to model.shared with
    tie_word_embeddings) and the `final_logits_bias` buffer (1, V), zero unless a checkpoint has one.

    forward(input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
            labels=None, encoder_outputs=None, past_key_values=None, use_cache=False)
        -> Seq2SeqLMOutput(loss, logits (B, T, V), past_key_values, encoder_last_hidden_state).
    """

    def __init__(self, config: BartConfig, generator=None, dtype=None, device: str = None,
                 init_weights: bool = True):
        """generator, dtype, device, init_weights: as BartModel's."""
        super().__init__(config)
        with self.building(dtype):
            self.register_buffer("final_logits_bias", np.zeros((1, config.vocab_size), dtype=resolve(dtype)))
            self.model = BartModel(config, init_weights=False)
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.model._where = self._where                        # errors name the outer class
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.shared.weight                     # (V, D), shared
        self.post_init(generator, device, init_weights)

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                labels=None, encoder_outputs=None, past_key_values=None, use_cache: bool = False) -> Seq2SeqLMOutput:
        """Inputs as BartModel.forward. labels: (B, T) ints in [0, vocab_size), or -100 where no token
        is to be predicted; without decoder_input_ids these are shift_tokens_right(labels) (the -100s
        become pad_token_id), as HF's. The loss is the mean cross-entropy over the labels that are not
        -100 (nan when there are none, as torch's)."""
        y = None
        if labels is not None:
            y = self._ids("labels", labels, ignore=-100)
            if decoder_input_ids is None and past_key_values is None:
                c = self.config
                start = c.decoder_start_token_id if c.decoder_start_token_id is not None else c.bos_token_id
                decoder_input_ids = shift_tokens_right(y, c.pad_token_id, start)
        out = self.model(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, encoder_outputs,
                         past_key_values, use_cache)
        logits = self.lm_head(out.last_hidden_state) + Tensor(self.final_logits_bias)    # (B, T, V)
        loss = None
        if y is not None:
            B, T, V = logits.shape
            if tuple(y.shape) != (B, T):
                raise ValueError(f"{self._where}: labels must have the shape of decoder_input_ids (B, T) = {(B, T)}; "
                                 f"got {tuple(y.shape)}")
            loss = F.cross_entropy(logits.reshape(B * T, V), y.reshape(B * T), ignore_index=-100)
        return Seq2SeqLMOutput(loss, logits, out.past_key_values, out.encoder_last_hidden_state)

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 20, use_cache: bool = True) -> np.ndarray:
        """Greedy decoding, HF's generate(do_sample=False, num_beams=1) with this config's token ids.

        Returns a (B, 1 + n) int64 host array, n <= max_new_tokens: decoder_start_token_id (or
        bos_token_id), then the argmax token of each step. At the last step forced_eos_token_id (when
        set) is forced, as HF's ForcedEOSTokenLogitsProcessor; a row that has emitted eos_token_id
        continues with pad_token_id (eos_token_id when None), and decoding stops once every row has.
        attention_mask: (B, S), 1 = a real source token; None: all real (HF's generate would infer it
        from pad tokens in input_ids: pass it). The encoder runs once; with use_cache each step feeds
        the last token only (self-attention keys/values grow in a DecoderKVCache, cross-attention ones
        are projected once); use_cache=False recomputes every position (the same tokens).
        Eval mode, no gradients; the training mode is restored afterwards.
        """
        c = self.config
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
            raise ValueError(f"{self._where}.generate: max_new_tokens must be an int >= 0; got {max_new_tokens!r}")
        start = c.decoder_start_token_id if c.decoder_start_token_id is not None else c.bos_token_id
        if start is None:
            raise ValueError(f"{self._where}.generate: config.decoder_start_token_id and bos_token_id are both None")
        self._positions("generate: 1 + max_new_tokens", 1 + max_new_tokens)
        fill = c.pad_token_id if c.pad_token_id is not None else c.eos_token_id
        was_training = self.training
        self.eval()
        try:
            with no_grad():
                ids = self._ids("input_ids", input_ids)
                self._positions("input_ids", ids.shape[1])
                real = self._real("attention_mask", attention_mask, ids.shape)
                memory = self.model.encoder(ids, real)                            # (B, S, D)
                xp = memory.xp
                B = ids.shape[0]
                ys = xp.full((B, 1), start, dtype=np.int64)
                done = xp.zeros(B, dtype=bool)
                cache = DecoderKVCache(c.decoder_layers) if use_cache else None
                for step in range(max_new_tokens):
                    out = self(attention_mask=real, decoder_input_ids=ys[:, -1:] if use_cache else ys,
                               encoder_outputs=memory, past_key_values=cache)
                    if c.forced_eos_token_id is not None and step == max_new_tokens - 1:
                        nxt = xp.full(B, c.forced_eos_token_id, dtype=np.int64)
                    else:
                        nxt = xp.argmax(out.logits.data[:, -1], axis=-1).astype(np.int64)   # (B,)
                    if c.eos_token_id is not None:
                        nxt = xp.where(done, fill, nxt)
                        done = done | (nxt == c.eos_token_id)
                    ys = xp.concatenate([ys, nxt[:, None]], axis=1)
                    if c.eos_token_id is not None and bool(done.all()):
                        break
        finally:
            self.train(was_training)
        return backend.to_numpy(ys)
