"""The encoder-decoder Transformer of "Attention Is All You Need" for sequence-to-sequence tasks.

    memory = Encoder(E_src[src] * sqrt(d_model) + PE)                       (B, S, D)
    logits = W_out Decoder(E_tgt[tgt_in] * sqrt(d_model) + PE, memory)      (B, T, V_tgt)

Shapes: B batch, S source length, T target length, D = d_model, H = nhead, d = D // H.
The stacks are npformer.nn.Transformer (torch.nn.Transformer's names and numerics, batch first).
Masks follow nn.Transformer: boolean True = masked OUT; key padding masks come from pad_id.
Teacher forcing: tgt_in = [BOS, y_1, ..., y_{n-1}] predicts tgt_out = [y_1, ..., y_n, EOS];
train with F.cross_entropy(logits.reshape(B * T, V), tgt_out.reshape(B * T), ignore_index=pad_id).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple, Optional

import numpy as np

from .. import backend, ops
from .. import nn
from ..nn import functional as F
from ..nn import init
from ..tensor import Tensor
from .config import require_divisible, require_dropout, require_positive_ints


@dataclass(frozen=True)
class Seq2SeqConfig:
    """Hyperparameters of a Seq2SeqTransformer (the paper's base model is d_model=512, nhead=8,
    6 + 6 layers, dim_feedforward=2048, dropout=0.1). Frozen: build a new one with dataclasses.replace.

    share_embeddings: one embedding table for source and target (needs equal vocabularies).
    tie_output: the output projection's weight is the target embedding's (section 3.4).
    pad_id: the padding token in both vocabularies; never attended to, and not a valid BOS.
    """
    src_vocab_size: int
    tgt_vocab_size: int
    d_model: int = 128
    nhead: int = 4
    num_encoder_layers: int = 3
    num_decoder_layers: int = 3
    dim_feedforward: int = 512
    dropout: float = 0.1
    max_len: int = 256
    pad_id: int = 0
    norm_first: bool = False
    share_embeddings: bool = False
    tie_output: bool = False
    activation: str = "relu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        require_positive_ints(self, ("src_vocab_size", "tgt_vocab_size", "d_model", "nhead", "num_encoder_layers",
                                     "num_decoder_layers", "dim_feedforward", "max_len"))
        require_divisible(self, "d_model", "nhead")
        require_dropout(self)
        smallest = min(self.src_vocab_size, self.tgt_vocab_size)
        if isinstance(self.pad_id, bool) or not isinstance(self.pad_id, (int, np.integer)) \
                or not 0 <= self.pad_id < smallest:
            raise ValueError(f"Seq2SeqConfig.pad_id must be a token id in [0, {smallest}) (both vocabularies); "
                             f"got {self.pad_id!r}")
        for name in ("norm_first", "share_embeddings", "tie_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Seq2SeqConfig.{name} must be True or False; got {getattr(self, name)!r}")
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError(f"Seq2SeqConfig.share_embeddings needs src_vocab_size == tgt_vocab_size; got "
                             f"{self.src_vocab_size} and {self.tgt_vocab_size}")
        if self.activation not in ("relu", "gelu"):
            raise ValueError(f"Seq2SeqConfig.activation must be 'relu' or 'gelu'; got {self.activation!r}")
        if not isinstance(self.layer_norm_eps, (int, float)) or not self.layer_norm_eps > 0:
            raise ValueError(f"Seq2SeqConfig.layer_norm_eps must be > 0; got {self.layer_norm_eps!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class DecoderKVCache:
    """The decoder's keys and values for the target tokens seen so far, for incremental decoding.

    self_k[i], self_v[i]: (B, H, T_past, d) self-attention keys/values of decoder layer i;
    cross_k[i], cross_v[i]: (B, H, S, d) its cross-attention keys/values, projected from memory once;
    tgt_pad: (B, T_past) bool, True where a past target token is padding. ``length`` = T_past.
    Inference only: the cache holds plain arrays, so no gradient flows into past positions.
    """

    def __init__(self, num_layers: int):
        self.self_k = [None] * num_layers
        self.self_v = [None] * num_layers
        self.cross_k = [None] * num_layers
        self.cross_v = [None] * num_layers
        self.tgt_pad = None

    @property
    def length(self) -> int:
        return 0 if self.tgt_pad is None else self.tgt_pad.shape[1]

    def select(self, rows) -> None:
        """Keep batch rows `rows` ((B',) int array on the cache's device; repeats allowed), in that
        order: every cached array a becomes a[rows]. Beam search uses it to follow each hypothesis's
        parent; the memory given to later decode calls must be reindexed the same way."""
        take = lambda arrays: [None if a is None else a[rows] for a in arrays]     # noqa: E731
        self.self_k, self.self_v = take(self.self_k), take(self.self_v)
        self.cross_k, self.cross_v = take(self.cross_k), take(self.cross_v)
        self.tgt_pad = None if self.tgt_pad is None else self.tgt_pad[rows]


# ----------------------------------------------------------------------------- cached decoder path
# TransformerDecoderLayer.forward, for new target positions only, reading the layer's own weights
# (in_proj_weight is [W^Q; W^K; W^V], as MultiHeadAttention stores it). Tested equal to the full path.

class Seq2SeqModelOutput(NamedTuple):
    """An HF-style encoder-decoder's output (BartModel, T5Model), in HF's field order: the decoder's
    last_hidden_state (B, T, D), past_key_values (a DecoderKVCache, or None), encoder_last_hidden_state
    (B, S, D)."""
    last_hidden_state: Tensor
    past_key_values: Optional["DecoderKVCache"]
    encoder_last_hidden_state: Tensor


class Seq2SeqLMOutput(NamedTuple):
    """An HF-style encoder-decoder LM's output (BartForConditionalGeneration, T5ForConditionalGeneration),
    in HF's field order: loss (labels given) or None, logits (B, T, V), past_key_values (a DecoderKVCache,
    or None), encoder_last_hidden_state (B, S, D)."""
    loss: Optional[Tensor]
    logits: Tensor
    past_key_values: Optional["DecoderKVCache"]
    encoder_last_hidden_state: Tensor


def _project(attn: nn.MultiHeadAttention, x: Tensor, which: int) -> Tensor:
    """Query (0), key (1) or value (2) projection of x (B, L, D), split into heads: (B, H, L, d)."""
    B, L, D = x.shape
    H = attn.num_heads
    w = ops.split(attn.in_proj_weight, D, axis=0)[which]                     # (D, D)
    b = None if attn.in_proj_bias is None else ops.split(attn.in_proj_bias, D, axis=0)[which]
    return ops.transpose(ops.reshape(F.linear(x, w, b), (B, L, H, D // H)), 1, 2)   # (B, H, L, d)


def _attend(attn: nn.MultiHeadAttention, q: Tensor, k: Tensor, v: Tensor, mask) -> Tensor:
    """W^O Concat_h(softmax(q k^T / sqrt(d) + mask) v): q (B, H, L, d), k, v (B, H, S, d) -> (B, L, D).

    mask: bool, broadcastable to (B, H, L, S), True = attend (SDPA's polarity).
    """
    B, H, L, d = q.shape
    p = attn.dropout if attn.training else 0.0
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, L, d)
    return attn.out_proj(ops.reshape(ops.transpose(y, 1, 2), (B, L, H * d)))  # (B, L, D)


def _extend(past, new: Tensor) -> Tensor:
    """Cached (B, H, T_past, d) array + this step's (B, H, t, d) -> (B, H, T_past + t, d)."""
    return new if past is None else ops.concatenate([Tensor(past), new], axis=2)


def _decoder_layer_step(layer, x: Tensor, memory: Tensor, cache: DecoderKVCache, i: int,
                        self_mask, cross_mask) -> Tensor:
    """Decoder layer i on the new positions x (B, t, D); appends their keys/values to the cache."""
    def sa(h):
        q = _project(layer.self_attn, h, 0)
        k = _extend(cache.self_k[i], _project(layer.self_attn, h, 1))       # (B, H, T_past + t, d)
        v = _extend(cache.self_v[i], _project(layer.self_attn, h, 2))
        cache.self_k[i], cache.self_v[i] = k.data, v.data
        return layer.dropout1(_attend(layer.self_attn, q, k, v, self_mask))

    def ca(h):
        if cache.cross_k[i] is None:                                        # memory is projected once
            cache.cross_k[i] = _project(layer.multihead_attn, memory, 1).data    # (B, H, S, d)
            cache.cross_v[i] = _project(layer.multihead_attn, memory, 2).data
        q = _project(layer.multihead_attn, h, 0)
        k, v = Tensor(cache.cross_k[i]), Tensor(cache.cross_v[i])
        return layer.dropout2(_attend(layer.multihead_attn, q, k, v, cross_mask))

    if layer.norm_first:
        x = x + sa(layer.norm1(x))
        x = x + ca(layer.norm2(x))
        return x + layer._ff_block(layer.norm3(x))
    x = layer.norm1(x + sa(x))
    x = layer.norm2(x + ca(x))
    return layer.norm3(x + layer._ff_block(x))


# ----------------------------------------------------------------------------- the model

class Seq2SeqTransformer(nn.Module):
    """Token embeddings * sqrt(d_model) + sinusoidal positions -> nn.Transformer -> output projection.

    forward(src (B, S) int, tgt_in (B, T) int) -> logits (B, T, tgt_vocab_size).
    Submodules: src_embed, tgt_embed (nn.Embedding), pos_encoding (shared by both sides; applies
    dropout), transformer (nn.Transformer, batch_first), output_proj (nn.Linear(d_model, V_tgt)).
    """

    def __init__(self, config: Seq2SeqConfig, generator=None, dtype=None, device: str = None):
        """generator: draws the initial weights (the device's global generator when None, as in
        npformer.nn). Embeddings start N(0, 1/d_model), so E[x] * sqrt(d_model) has unit scale;
        the Transformer's matrices are Xavier-uniform, as torch.nn.Transformer's."""
        super().__init__()
        c = self.config = config
        kw = dict(dtype=dtype, device=device)
        self.src_embed = nn.Embedding(c.src_vocab_size, c.d_model, generator=generator, **kw)
        self.tgt_embed = nn.Embedding(c.tgt_vocab_size, c.d_model, generator=generator, **kw)
        for emb in (self.src_embed, self.tgt_embed):
            init.normal_(emb.weight, std=c.d_model ** -0.5, generator=generator)
        if c.share_embeddings:
            self.tgt_embed.weight = self.src_embed.weight
        self.pos_encoding = nn.SinusoidalPositionalEncoding(c.d_model, c.max_len, dropout=c.dropout, **kw)
        self.transformer = nn.Transformer(c.d_model, c.nhead, c.num_encoder_layers, c.num_decoder_layers,
                                          c.dim_feedforward, c.dropout, activation=c.activation,
                                          layer_norm_eps=c.layer_norm_eps, batch_first=True,
                                          norm_first=c.norm_first, generator=generator, **kw)
        self.output_proj = nn.Linear(c.d_model, c.tgt_vocab_size, generator=generator, **kw)
        if c.tie_output:
            self.output_proj.weight = self.tgt_embed.weight

    # ------------------------------------------------------------------ inputs
    def _tokens(self, name: str, idx, vocab_size: int):
        """idx (Tensor or array) as a (B, L) integer array on the model's device, checked."""
        a = idx.data if isinstance(idx, Tensor) else idx
        a = a if backend.is_array(a) else np.asarray(a)
        if a.ndim != 2 or a.dtype.kind not in "iu":
            raise ValueError(f"Seq2SeqTransformer: {name} must be (B, L) integer token ids; got shape "
                             f"{tuple(a.shape)} and dtype {a.dtype}")
        model_device = self.src_embed.weight.device
        if backend.device_of(a) != model_device:
            raise backend.DeviceMismatchError(f"Seq2SeqTransformer: {name} is on {backend.device_of(a)} but the "
                                              f"model is on {model_device}")
        if a.size and (int(a.min()) < 0 or int(a.max()) >= vocab_size):
            raise ValueError(f"Seq2SeqTransformer: {name} holds token ids outside [0, {vocab_size}): "
                             f"min {int(a.min())}, max {int(a.max())}")
        return a

    def _check_length(self, name: str, length: int) -> None:
        if length > self.config.max_len:
            raise ValueError(f"Seq2SeqTransformer: {name} length {length} exceeds max_len {self.config.max_len}")

    def pad_mask(self, tokens):
        """(B, L) bool array, True where tokens == pad_id (nn.Transformer's key_padding_mask polarity)."""
        a = tokens.data if isinstance(tokens, Tensor) else tokens
        return a == self.config.pad_id

    def _embed(self, embed: nn.Embedding, idx, start: int = 0) -> Tensor:
        """E[idx] * sqrt(d_model) + PE[start:start + L], then dropout: (B, L) -> (B, L, D)."""
        return self.pos_encoding(embed(idx) * math.sqrt(self.config.d_model), start=start)

    # ------------------------------------------------------------------ encoder / decoder
    def encode(self, src, src_pad_mask=None) -> Tensor:
        """memory (B, S, D) from src (B, S) int; src_pad_mask (B, S) bool, True = padding
        (default: src == pad_id). Rows of memory at padded positions are never attended to."""
        src = self._tokens("src", src, self.config.src_vocab_size)
        self._check_length("src", src.shape[1])
        mask = self.pad_mask(src) if src_pad_mask is None else F.mask_array(src_pad_mask, self.src_embed.weight)
        if tuple(mask.shape) != tuple(src.shape) or mask.dtype != np.bool_:
            raise ValueError(f"Seq2SeqTransformer: src_pad_mask must be bool of shape {tuple(src.shape)} (as src); "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        x = self._embed(self.src_embed, src)                                 # (B, S, D)
        return self.transformer.encoder(x, src_key_padding_mask=mask)      # (B, S, D)

    def decode(self, tgt_in, memory: Tensor, src_pad_mask=None, cache: DecoderKVCache = None) -> Tensor:
        """logits (B, T, V_tgt) for tgt_in (B, T) int, attending causally to itself and to memory.

        memory: (B, S, D) from encode; src_pad_mask: (B, S) bool, True = padding (None: no padding).
        Target key padding comes from tgt_in == pad_id. With a cache, tgt_in are the next tokens
        (positions cache.length ...), only their logits are returned, and the cache grows by T;
        memory is projected on the first cached call and must not change afterwards.
        """
        tgt_in = self._tokens("tgt_in", tgt_in, self.config.tgt_vocab_size)
        B, T = tgt_in.shape
        past = 0 if cache is None else cache.length
        self._check_length("tgt_in" if cache is None else f"tgt_in (cached {past} + new {T})", past + T)
        if memory.ndim != 3 or memory.shape[0] != B or memory.shape[2] != self.config.d_model:
            raise ValueError(f"Seq2SeqTransformer: memory {tuple(memory.shape)} must be (B, S, d_model) with B = "
                             f"{B} from tgt_in {tuple(tgt_in.shape)} and d_model {self.config.d_model}")
        S = memory.shape[1]
        src_pad = None if src_pad_mask is None else F.mask_array(src_pad_mask, memory)
        if src_pad is not None and (tuple(src_pad.shape) != (B, S) or src_pad.dtype != np.bool_):
            raise ValueError(f"Seq2SeqTransformer: src_pad_mask must be bool (B, S) = {(B, S)}; got "
                             f"{src_pad.dtype} {tuple(src_pad.shape)}")
        tgt_pad = self.pad_mask(tgt_in)                                      # (B, T)
        x = self._embed(self.tgt_embed, tgt_in, start=past)                  # (B, T, D)
        decoder = self.transformer.decoder
        if cache is None:
            h = decoder(x, memory, tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=src_pad,
                        tgt_is_causal=True)                                  # (B, T, D)
            return self.output_proj(h)                                       # (B, T, V)

        if cache.cross_k[0] is not None and cache.cross_k[0].shape[2] != S:
            raise ValueError(f"Seq2SeqTransformer: memory has length {S} but the cache holds "
                             f"{cache.cross_k[0].shape[2]}")
        xp = x.xp
        pad_all = tgt_pad if cache.tgt_pad is None else xp.concatenate([cache.tgt_pad, tgt_pad], axis=1)
        # SDPA polarity (True = attend): query past + i sees non-pad keys 0 .. past + i.
        causal = xp.arange(past + T)[None, :] <= (past + xp.arange(T))[:, None]       # (T, past + T)
        self_mask = causal[None, None] & ~pad_all[:, None, None, :]                   # (B, 1, T, past + T)
        cross_mask = None if src_pad is None else ~src_pad[:, None, None, :]          # (B, 1, 1, S)
        for i, layer in enumerate(decoder.layers):
            x = _decoder_layer_step(layer, x, memory, cache, i, self_mask, cross_mask)
        cache.tgt_pad = pad_all
        h = x if decoder.norm is None else decoder.norm(x)                  # (B, T, D)
        return self.output_proj(h)                                           # (B, T, V)

    def forward(self, src, tgt_in) -> Tensor:
        """Teacher-forced logits (B, T, V_tgt): src (B, S) int, tgt_in (B, T) int (pad_id = padding)."""
        src_pad = self.pad_mask(self._tokens("src", src, self.config.src_vocab_size))
        return self.decode(tgt_in, self.encode(src, src_pad), src_pad)

    def new_cache(self) -> DecoderKVCache:
        return DecoderKVCache(self.config.num_decoder_layers)

    def greedy_decode(self, src, bos_id: int, max_new_tokens: int, eos_id: int = None,
                      use_cache: bool = True) -> np.ndarray:
        """Greedy translation: (B, 1 + n) int64 host array starting with bos_id, n <= max_new_tokens.

        Picks argmax logits each step in eval mode without gradients; after eos_id a row emits
        pad_id, and decoding stops early once every row has emitted eos_id (decoding.greedy_decode).
        """
        from .decoding import greedy_decode
        return greedy_decode(self, src, bos_id, max_new_tokens, eos_id, use_cache)
