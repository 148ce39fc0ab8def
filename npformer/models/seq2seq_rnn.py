"""A recurrent encoder-decoder with attention (Bahdanau et al., 2015; Luong et al., 2015): the model
the Transformer replaced, behind Seq2SeqTransformer's interface (``npformer seq2seq --arch rnn``).

    encoder   e = dropout(src_embed(src))                                   (B, S, D)
              m = BiLSTM(e, lengths)   D/2 per direction, num_layers        (B, S, D) "memory"
    start     h_0 = tanh(init_proj(m[:, 0, D/2:])) for every decoder layer, c_0 = 0
              (the right-to-left pass at position 0 has read the whole source: Bahdanau's choice)
    decoder   y = dropout(tgt_embed(tgt_in))                                 (B, T, D)
              o = LSTM(y, (h_0, c_0))   num_layers                          (B, T, D)
              a = softmax(o W_a m^T, padded source positions left out)       (B, T, S)  Luong's "general" score
              ctx = a m                                                      (B, T, D)
              logits = output_proj(dropout(tanh(combine([o; ctx]))))        (B, T, V_tgt)

Each target position's attention reads the decoder's state after that token; there is no input
feeding (Luong's option of feeding the last attentional vector into the next step), so teacher
forcing runs the decoder LSTM over the whole target at once and only its recurrence is sequential.
The cache for incremental decoding (RNNDecoderCache) is the LSTM's (h, c) after the tokens so far:
one step reads the newest token, as the Transformer's KV cache does, and the same greedy decoding
and beam search (models/decoding.py) run on either model.

Shapes: B batch, S source length, T target tokens, D = d_model, V_tgt the target vocabulary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .. import backend, nn, ops
from ..nn import functional as F
from ..tensor import Tensor
from .config import require_dropout, require_positive_ints
from .seq2seq_arch import TaskModel


@dataclass(frozen=True)
class RNNSeq2SeqConfig:
    """Hyperparameters of an RNNSeq2Seq. d_model must be even (the encoder's two directions share it)."""
    src_vocab_size: int
    tgt_vocab_size: int
    d_model: int = 64
    num_layers: int = 2                 # encoder layers and decoder layers, each
    dropout: float = 0.1
    max_len: int = 256
    pad_id: int = 0

    def __post_init__(self):
        require_positive_ints(self, ("src_vocab_size", "tgt_vocab_size", "d_model", "num_layers", "max_len"))
        require_dropout(self)
        if self.d_model % 2:
            raise ValueError(f"RNNSeq2SeqConfig.d_model must be even (D/2 per encoder direction); got {self.d_model}")
        smallest = min(self.src_vocab_size, self.tgt_vocab_size)
        if isinstance(self.pad_id, bool) or not isinstance(self.pad_id, (int, np.integer)) \
                or not 0 <= self.pad_id < smallest:
            raise ValueError(f"RNNSeq2SeqConfig.pad_id must be a token id in [0, {smallest}); got {self.pad_id!r}")

    @property
    def num_decoder_layers(self) -> int:
        return self.num_layers

    def to_dict(self) -> dict:
        return asdict(self)


class RNNDecoderCache:
    """The decoder LSTM's state after the target tokens so far: h, c (num_layers, B, D) arrays, and
    ``length`` tokens. Inference only (plain arrays: no gradient flows into the past)."""

    def __init__(self):
        self.h = self.c = None
        self.length = 0

    def select(self, rows) -> None:
        """Keep batch rows `rows` (repeats allowed), in that order, as DecoderKVCache.select."""
        if self.h is not None:
            self.h, self.c = self.h[:, rows], self.c[:, rows]


class RNNSeq2Seq(TaskModel, nn.Module):
    """The recurrent encoder-decoder with attention (module docstring), Seq2SeqTransformer's interface:
    forward(src, tgt_in), encode, decode(tgt_in, memory, src_pad_mask, cache), new_cache, greedy_decode,
    pad_mask, config (forward, greedy_decode, pad_mask and the input checks from seq2seq_arch.TaskModel). Submodules: src_embed, tgt_embed, encoder (nn.LSTM, bidirectional), init_proj,
    decoder (nn.LSTM), attn_proj (W_a), combine, output_proj; weights drawn from `generator`."""

    def __init__(self, config: RNNSeq2SeqConfig, generator=None, dtype=None, device: str = None):
        super().__init__()
        c = self.config = config
        D, kw = c.d_model, dict(generator=generator, dtype=dtype, device=device)
        self.src_embed = nn.Embedding(c.src_vocab_size, D, **kw)
        self.tgt_embed = nn.Embedding(c.tgt_vocab_size, D, **kw)
        self.encoder = nn.LSTM(D, D // 2, c.num_layers, batch_first=True, dropout=c.dropout, bidirectional=True, **kw)
        self.init_proj = nn.Linear(D // 2, D, **kw)
        self.decoder = nn.LSTM(D, D, c.num_layers, batch_first=True, dropout=c.dropout, **kw)
        self.attn_proj = nn.Linear(D, D, bias=False, **kw)
        self.combine = nn.Linear(2 * D, D, bias=False, **kw)
        self.output_proj = nn.Linear(D, c.tgt_vocab_size, **kw)
        self.dropout = nn.Dropout(c.dropout)

    _where = "RNNSeq2Seq"

    @property
    def device(self) -> str:
        return self.output_proj.weight.device

    def encode(self, src, src_pad_mask=None) -> Tensor:
        """memory (B, S, D) from src (B, S); src_pad_mask (B, S) True = padding (None: src == pad_id), which
        must be a suffix of each row (the sequence's length is its count of real tokens, at least 1)."""
        src = self._tokens("src", src, self.config.src_vocab_size)
        pad = self.pad_mask(src) if src_pad_mask is None else src_pad_mask
        lengths = backend.to_numpy((~pad).sum(axis=1))
        if (lengths < 1).any():
            raise ValueError("RNNSeq2Seq: every source needs at least one real (non-pad) token")
        memory, _ = self.encoder(self.dropout(self.src_embed(src)), lengths=lengths)     # (B, S, D)
        return memory

    def decode(self, tgt_in, memory: Tensor, src_pad_mask=None, cache: RNNDecoderCache = None) -> Tensor:
        """logits (B, T, V_tgt) for tgt_in (B, T) attending to memory (B, S, D); with a cache, tgt_in are
        the next tokens and the cache's state moves past them."""
        tgt_in = self._tokens("tgt_in", tgt_in, self.config.tgt_vocab_size)
        B, T = tgt_in.shape
        D, L = self.config.d_model, self.config.num_layers
        if memory.ndim != 3 or memory.shape[0] != B or memory.shape[2] != D:
            raise ValueError(f"RNNSeq2Seq: memory {tuple(memory.shape)} must be (B, S, d_model) with B = {B} from "
                             f"tgt_in and d_model {D}")
        past = 0 if cache is None else cache.length
        if past + T > self.config.max_len:
            raise ValueError(f"RNNSeq2Seq: tgt_in (cached {past} + new {T}) exceeds max_len {self.config.max_len}")
        if cache is None or cache.h is None:
            h0 = ops.tanh(self.init_proj(memory[:, 0, D // 2:]))                  # (B, D)
            state = (ops.stack([h0] * L, axis=0), Tensor(memory.xp.zeros((L, B, D), dtype=memory.dtype)))
        else:
            state = (Tensor(cache.h), Tensor(cache.c))
        out, (h, c) = self.decoder(self.dropout(self.tgt_embed(tgt_in)), state)  # (B, T, D)
        if cache is not None:
            cache.h, cache.c, cache.length = h.data, c.data, past + T
        mask = None if src_pad_mask is None else ~F.mask_array(src_pad_mask, memory)[:, None, :]   # (B, 1, S)
        ctx = ops.attention(out, self.attn_proj(memory), memory, mask=mask)      # (B, T, D)
        hidden = ops.tanh(self.combine(ops.concatenate([out, ctx], axis=-1)))    # (B, T, D)
        return self.output_proj(self.dropout(hidden))                            # (B, T, V_tgt)

    def new_cache(self) -> RNNDecoderCache:
        return RNNDecoderCache()
