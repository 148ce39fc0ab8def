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
BartConfig and the layers are in bart_layers.py; this file holds the models.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from .. import backend, nn
from ..autograd import no_grad
from ..dtypes import resolve
from ..nn import functional as F
from ..nn import init
from ..ops._core import constant
from ..tensor import Tensor
from .hf_base import PreTrainedModel
from .bart_layers import BartConfig, BartDecoder, BartEncoder, BartScaledWordEmbedding, shift_tokens_right
from .seq2seq import DecoderKVCache, Seq2SeqLMOutput, Seq2SeqModelOutput


# ----------------------------------------------------------------------------- models

class BartPreTrainedModel(PreTrainedModel):
    """Base of the BART models: the config, HF's initialisation, dtype and device, input checks.

    A subclass builds its layers inside ``with self.building(dtype):`` (hf_base.PreTrainedModel),
    then calls ``self.post_init(generator, device, init_weights)``.
    """
    config_class = BartConfig

    def __init__(self, config: BartConfig):
        super().__init__(config)
        self._where = type(self).__name__                 # the name errors are reported under

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
