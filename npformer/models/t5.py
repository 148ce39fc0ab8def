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
T5Config and the layers are in t5_layers.py; this file holds the models.
"""

from __future__ import annotations

import numbers

import numpy as np

from .. import backend
from .. import nn
from ..autograd import no_grad
from ..nn import functional as F
from ..nn import init
from ..tensor import Tensor
from .hf_base import PreTrainedModel
from .seq2seq import DecoderKVCache, Seq2SeqLMOutput, Seq2SeqModelOutput
from .t5_layers import T5Config, T5Stack


# ----------------------------------------------------------------------------- models

class T5PreTrainedModel(PreTrainedModel):
    """Base of T5Model and T5ForConditionalGeneration: the config, the trunk (shared, encoder, decoder),
    HF's initialisation, the dtype and the device (as every hf_base.PreTrainedModel: the layers are built inside
    ``with self.building(dtype):``, then post_init)."""

    config_class = T5Config

    def _build_trunk(self, config: T5Config) -> None:
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, self.shared, is_decoder=False)
        self.decoder = T5Stack(config, self.shared, is_decoder=True)

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
