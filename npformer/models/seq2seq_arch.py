"""BART and T5 on the toy seq2seq tasks: the interface of Seq2SeqTransformer over either model.

``npformer seq2seq --arch bart|t5`` trains the same loop, decoding and beam search as the default
``--arch transformer``; this file makes a BartForConditionalGeneration or a T5ForConditionalGeneration
look like a Seq2SeqTransformer to them:

    forward(src (B, S), tgt_in (B, T))            -> logits (B, T, V_tgt)      teacher forcing
    encode(src (B, S), src_pad_mask=None)         -> memory (B, S, D)
    decode(tgt_in (B, T), memory, src_pad_mask=None, cache=None) -> logits (B, T, V_tgt)
    new_cache(), greedy_decode(src, bos_id, max_new_tokens, eos_id), pad_mask(tokens), config

**One vocabulary.** A task has a source and a target vocabulary (TaskTokenizer: PAD, BOS, EOS, then
the characters of each side). BART and T5 share one embedding between the encoder, the decoder and the
output layer, so the model's vocabulary is the union: the three special tokens, then every character of
either side once (``joint_vocabulary``). Source ids and target ids are mapped into it on the way in;
the output layer scores the whole union, and the logits of the target's own tokens are taken out
(``logits[..., tgt_ids]``), so the loss, greedy decoding and beam search all read target ids, as with
the default architecture. A character on both sides (the letters of copy and reverse) is one row,
read by the encoder and written by the decoder.

**The two models as configured here** (the flags of ``npformer seq2seq``):
    bart   post-norm, learned positions (table of max_len, BART's offset of 2), embeddings scaled by
           sqrt(d_model) and layer-normed, GELU feed-forward, tied output layer; dropout on the sublayers
    t5     pre-norm with RMS norms, bucketed relative position bias (32 buckets up to distance 128), no
           biases, unscaled attention, ReLU feed-forward, tied output layer (decoder output * d_model^-0.5)
Both start their decoder with the task's BOS and stop at its EOS; neither is pretrained: the weights
are drawn with each model's own initialisation from --seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import backend, nn
from ..tensor import Tensor
from .bart_layers import BartConfig
from .seq2seq import DecoderKVCache

ARCHS = ("transformer", "bart", "t5", "rnn")   # rnn: models/seq2seq_rnn.py
N_SPECIAL = 3                                   # PAD, BOS, EOS: ids 0, 1, 2 on every side


def joint_vocabulary(src_chars: str, tgt_chars: str) -> tuple:
    """(src_ids (V_src,), tgt_ids (V_tgt,)) int64: where each side's ids sit in the joint vocabulary.

    The joint vocabulary is PAD, BOS, EOS, then sorted(set(src_chars) | set(tgt_chars)); its size is
    N_SPECIAL + the number of distinct characters. src_ids[i] is the joint id of source id i."""
    chars = sorted(set(src_chars) | set(tgt_chars))
    joint = {c: N_SPECIAL + i for i, c in enumerate(chars)}
    special = list(range(N_SPECIAL))
    return (np.array(special + [joint[c] for c in src_chars], dtype=np.int64),
            np.array(special + [joint[c] for c in tgt_chars], dtype=np.int64))


@dataclass(frozen=True)
class ArchView:
    """What the training loop and the decoders read of a model's config (Seq2SeqConfig's names)."""
    src_vocab_size: int
    tgt_vocab_size: int
    max_len: int
    pad_id: int
    num_decoder_layers: int


def hf_config(arch: str, vocab_size: int, d_model: int, nhead: int, num_layers: int, dim_feedforward: int,
              dropout: float, max_len: int, pad_id: int, bos_id: int, eos_id: int) -> dict:
    """The BartConfig / T5Config fields of a model for a task (a dict, as checkpoints store it)."""
    if arch == "bart":
        return dict(vocab_size=vocab_size, d_model=d_model, encoder_layers=num_layers, decoder_layers=num_layers,
                    encoder_attention_heads=nhead, decoder_attention_heads=nhead, encoder_ffn_dim=dim_feedforward,
                    decoder_ffn_dim=dim_feedforward, dropout=dropout, max_position_embeddings=max_len,
                    scale_embedding=True, pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id,
                    decoder_start_token_id=bos_id, forced_eos_token_id=None, tie_word_embeddings=True)
    if arch == "t5":
        return dict(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // nhead, d_ff=dim_feedforward,
                    num_layers=num_layers, num_decoder_layers=num_layers, num_heads=nhead, dropout_rate=dropout,
                    feed_forward_proj="relu", tie_word_embeddings=True, pad_token_id=pad_id, eos_token_id=eos_id,
                    decoder_start_token_id=bos_id)
    raise ValueError(f"--arch must be one of {', '.join(ARCHS)}; got {arch!r}")


class TaskModel:
    """What the task models share (TaskEncoderDecoder here, RNNSeq2Seq in seq2seq_rnn.py): the input
    checks, the padding mask, teacher forcing through encode/decode, and greedy decoding. A subclass
    has ``config`` (src_vocab_size, max_len, pad_id), ``device``, ``_where`` (the name in messages),
    and defines encode, decode and new_cache."""

    def _tokens(self, name: str, idx, vocab_size: int):
        """idx (Tensor or array) as a checked (B, L) integer array on the model's device, L <= max_len."""
        a = idx.data if isinstance(idx, Tensor) else idx
        a = a if backend.is_array(a) else np.asarray(a)
        where = self._where
        if a.ndim != 2 or a.dtype.kind not in "iu":
            raise ValueError(f"{where}: {name} must be (B, L) integer token ids; got shape {tuple(a.shape)} and "
                             f"dtype {a.dtype}")
        if backend.device_of(a) != self.device:
            raise backend.DeviceMismatchError(f"{where}: {name} is on {backend.device_of(a)} but the model is on "
                                              f"{self.device}")
        if a.size and (int(a.min()) < 0 or int(a.max()) >= vocab_size):
            raise ValueError(f"{where}: {name} holds token ids outside [0, {vocab_size}): min {int(a.min())}, "
                             f"max {int(a.max())}")
        if a.shape[1] > self.config.max_len:
            raise ValueError(f"{where}: {name} length {a.shape[1]} exceeds max_len {self.config.max_len}")
        return a

    def pad_mask(self, tokens):
        """(B, L) bool, True where tokens == pad_id (Seq2SeqTransformer's polarity)."""
        a = tokens.data if isinstance(tokens, Tensor) else tokens
        return a == self.config.pad_id

    def forward(self, src, tgt_in) -> Tensor:
        """Teacher-forced logits (B, T, V_tgt) for src (B, S) and tgt_in (B, T) (pad_id = padding)."""
        src_pad = self.pad_mask(self._tokens("src", src, self.config.src_vocab_size))
        return self.decode(tgt_in, self.encode(src, src_pad), src_pad)

    def greedy_decode(self, src, bos_id: int, max_new_tokens: int, eos_id: int = None,
                      use_cache: bool = True) -> np.ndarray:
        """(B, 1 + n) int64 host array, as Seq2SeqTransformer.greedy_decode (decoding.greedy_decode)."""
        from .decoding import greedy_decode
        return greedy_decode(self, src, bos_id, max_new_tokens, eos_id, use_cache)


class TaskEncoderDecoder(TaskModel, nn.Module):
    """A BART or T5 (``model``) on a task's vocabularies, with Seq2SeqTransformer's interface (see above).

    arch: "bart" or "t5"; hf: the config dict (hf_config); src_chars, tgt_chars: the task's characters
    (TaskTokenizer.src.chars / .tgt.chars); max_len: the longest source or BOS + target + EOS.
    The state dict is the inner model's under ``model.``; the id maps are derived from the characters.
    """

    def __init__(self, arch: str, hf: dict, src_chars: str, tgt_chars: str, max_len: int, generator=None,
                 dtype=None, device: str = None):
        super().__init__()
        from .bart import BartForConditionalGeneration
        from .t5 import T5Config, T5ForConditionalGeneration
        src_ids, tgt_ids = joint_vocabulary(src_chars, tgt_chars)
        if arch == "bart":
            config, cls = BartConfig(**hf), BartForConditionalGeneration
        elif arch == "t5":
            config, cls = T5Config(**hf), T5ForConditionalGeneration
        else:
            raise ValueError(f"TaskEncoderDecoder: arch must be 'bart' or 't5'; got {arch!r}")
        need = N_SPECIAL + len(set(src_chars) | set(tgt_chars))
        if config.vocab_size != need:
            raise ValueError(f"TaskEncoderDecoder: vocab_size {config.vocab_size} does not fit the task's joint "
                             f"vocabulary of {need} tokens")
        self.arch, self.hf_config = arch, config
        self.model = cls(config, generator=generator, dtype=dtype, device=device)
        self.config = ArchView(len(src_ids), len(tgt_ids), max_len, 0,
                               config.decoder_layers if arch == "bart" else config.num_decoder_layers)
        weight = self.model.lm_head.weight
        self._src_ids = backend.to_device(src_ids, weight.device)            # (V_src,)
        self._tgt_ids = backend.to_device(tgt_ids, weight.device)            # (V_tgt,)

    @property
    def device(self) -> str:
        return self.model.lm_head.weight.device

    @property
    def _where(self) -> str:
        return f"{type(self).__name__} ({self.arch})"

    def encode(self, src, src_pad_mask=None) -> Tensor:
        """memory (B, S, D) from src (B, S) source ids; src_pad_mask (B, S) True = padding (None: src == PAD)."""
        src = self._tokens("src", src, self.config.src_vocab_size)
        real = ~(self.pad_mask(src) if src_pad_mask is None else src_pad_mask)
        ids = self._src_ids[src]                                                    # (B, S) joint ids
        if self.arch == "bart":
            return self.model.model.encoder(ids, real)
        return self.model.encoder(ids, real).last_hidden_state

    def decode(self, tgt_in, memory: Tensor, src_pad_mask=None, cache: DecoderKVCache = None) -> Tensor:
        """logits (B, T, V_tgt) over the target vocabulary for tgt_in (B, T) target ids, as
        Seq2SeqTransformer.decode (with a cache, tgt_in are the next tokens and the cache grows)."""
        tgt_in = self._tokens("tgt_in", tgt_in, self.config.tgt_vocab_size)
        past = 0 if cache is None else cache.length
        if past + tgt_in.shape[1] > self.config.max_len:
            raise ValueError(f"{type(self).__name__} ({self.arch}): tgt_in (cached {past} + new {tgt_in.shape[1]}) "
                             f"exceeds max_len {self.config.max_len}")
        real = None if src_pad_mask is None else ~src_pad_mask
        out = self.model(attention_mask=real, decoder_input_ids=self._tgt_ids[tgt_in], encoder_outputs=memory,
                         past_key_values=cache)
        return out.logits[..., self._tgt_ids]                                       # (B, T, V_tgt)

    def new_cache(self) -> DecoderKVCache:
        return DecoderKVCache(self.config.num_decoder_layers)
