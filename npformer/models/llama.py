"""LLaMA (Touvron et al., 2023): a pre-norm decoder-only Transformer with RMSNorm, rotary positions,
grouped-query attention and a gated (SwiGLU) feed-forward, with HF's names.

    x = embed_tokens(input_ids)                                         (B, T, C)
    every layer:  x = x + self_attn(input_layernorm(x))                 causal, RoPE on q and k, GQA
                  x = x + mlp(post_attention_layernorm(x))              down_proj(silu(gate_proj(x)) * up_proj(x))
    logits = lm_head(norm(x))                                           (B, T, V)

Shapes: B batch, T new tokens, P cached tokens, S = P + T, C = hidden_size, H = num_attention_heads,
Hkv = num_key_value_heads, D = head_dim, I = intermediate_size, V = vocab_size. Every module and
parameter is named as in HF transformers' modeling_llama.py (``model.layers.0.self_attn.q_proj.weight``),
so state dicts map one to one. The layers are npformer.nn's: GroupedQueryAttention (with its RoPE and
KV cache), GatedFeedForward and RMSNorm. One RotaryEmbedding is shared by every layer (HF keeps one
per model); its tables are not in the state dict, as HF's are not.

Positions past max_position_embeddings are not an error: RoPE is a formula, and the rows past the
cached tables are computed from it, as HF computes every position (the model never saw such
positions in training; what it predicts there is its own business). What is refused, where HF
would index out of range or silently compute nonsense: token ids and labels outside the vocabulary,
negative position ids, masks and caches of the wrong shape.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import NamedTuple, Optional

import numpy as np

from .. import backend
from .. import nn
from ..nn import functional as F
from ..nn import init
from ..ops._core import constant
from ..tensor import Tensor
from .config import require_bools, require_positive_ints, require_token_ids
from .hf_base import PreTrainedModel

# hidden_act (HF's ACT2FN names) -> GatedFeedForward's activation
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh"}


@dataclass(frozen=True)
class LlamaConfig:
    """Hyperparameters of a LLaMA, HF's LlamaConfig fields and defaults (Llama-2-7b's).

    num_key_value_heads None means num_attention_heads (multi-head attention) and head_dim None
    means hidden_size // num_attention_heads; both are resolved here, as HF resolves them.
    rope_theta: RoPE's base (HF 5 keeps it in rope_parameters["rope_theta"]; only the default
    rope type exists here). tie_word_embeddings: lm_head.weight is embed_tokens.weight.
    attention_bias: biases on q/k/v/o_proj; mlp_bias: on gate/up/down_proj. pad_token_id: the
    row of embed_tokens that starts at zero and gets no gradient (HF's padding_idx).
    """
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2          # or a tuple of ints (HF allows a list)

    def __post_init__(self):
        owner = type(self).__name__
        require_positive_ints(self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                     "num_attention_heads", "max_position_embeddings"))
        H = self.num_attention_heads
        if self.hidden_size % H:                                     # HF refuses it too, head_dim or not
            raise ValueError(f"{owner}: hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({H})")
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", H)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // H)
        require_positive_ints(self, ("num_key_value_heads", "head_dim"))
        if H % self.num_key_value_heads:
            raise ValueError(f"{owner}: num_key_value_heads ({self.num_key_value_heads}) must divide "
                             f"num_attention_heads ({H}): each key/value head serves a group of query heads")
        if self.head_dim % 2:
            raise ValueError(f"{owner}: head_dim ({self.head_dim}) must be even: RoPE rotates features in pairs")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"{owner}.hidden_act must be one of {', '.join(map(repr, ACTIVATIONS))}; "
                             f"got {self.hidden_act!r}")
        for name, low in (("rms_norm_eps", "> 0"), ("rope_theta", "> 0"), ("initializer_range", ">= 0")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or not (
                    v > 0 if low == "> 0" else v >= 0):
                raise ValueError(f"{owner}.{name} must be a finite number {low}; got {v!r}")
        v = self.attention_dropout
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0.0 <= v < 1.0:
            raise ValueError(f"{owner}.attention_dropout must be in [0, 1); got {v!r}")
        require_bools(self, ("tie_word_embeddings", "attention_bias", "mlp_bias"))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        require_token_ids(self, ("pad_token_id", "bos_token_id", "eos_token_id"), lists=("eos_token_id",))

    def to_dict(self) -> dict:
        return asdict(self)


class BaseModelOutputWithPast(NamedTuple):
    """LlamaModel's output: last_hidden_state (B, T, C); past_key_values (use_cache) or None."""
    last_hidden_state: Tensor
    past_key_values: Optional[tuple]


class CausalLMOutputWithPast(NamedTuple):
    """LlamaForCausalLM's output, in HF's field order: loss (labels given) or None, logits (B, T, V),
    past_key_values (use_cache) or None."""
    loss: Optional[Tensor]
    logits: Tensor
    past_key_values: Optional[tuple]


# ----------------------------------------------------------------------------- layers

class LlamaDecoderLayer(nn.Module):
    """One pre-norm layer: x + self_attn(input_layernorm(x)), then that + mlp(post_attention_layernorm(.))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        C = config.hidden_size
        self.self_attn = nn.GroupedQueryAttention(
            C, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
            attention_bias=config.attention_bias, attention_dropout=config.attention_dropout,
            rope_theta=config.rope_theta, max_position_embeddings=config.max_position_embeddings)
        self.mlp = nn.GatedFeedForward(C, config.intermediate_size, activation=ACTIVATIONS[config.hidden_act],
                                       bias=config.mlp_bias)
        self.input_layernorm = nn.RMSNorm(C, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(C, eps=config.rms_norm_eps)

    def forward(self, x: Tensor, mask=None, position_ids=None, past_key_value=None, use_cache: bool = False):
        """x: (B, T, C) -> (x (B, T, C), this layer's (k, v) (B, Hkv, S, D) when use_cache, else None).
        mask: None or (B, 1, 1, S) bool, True = attend (combined with the causal mask)."""
        a = self.self_attn(self.input_layernorm(x), mask, position_ids, past_key_value, use_cache)
        a, present = a if use_cache else (a, None)
        x = x + a                                                          # (B, T, C)
        return x + self.mlp(self.post_attention_layernorm(x)), present


# ----------------------------------------------------------------------------- models

class LlamaPreTrainedModel(PreTrainedModel):
    """Base of the LLaMA models: the config, HF's initialisation, the dtype and the device (as every
    hf_base.PreTrainedModel: build the layers inside ``with self.building(dtype):``, then post_init)."""

    config_class = LlamaConfig

    def _init_weights(self, generator):
        """HF's: Linear and Embedding weights N(0, initializer_range^2) (the padding row then zero),
        biases zero, RMSNorm weights one. generator: a numpy.random.Generator (seed 0 when None),
        drawn in named_parameters order (a tied lm_head is the embedding: drawn once)."""
        rng = generator if generator is not None else np.random.default_rng(0)
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.ndim == 2:
                init.normal_(p, std=std, generator=rng)
            elif name.endswith("bias"):
                init.zeros_(p)
            else:                                              # RMSNorm weights
                init.ones_(p)
        for m in self.modules():
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                m.weight.data[m.padding_idx] = 0


class LlamaModel(LlamaPreTrainedModel):
    """The decoder: embed_tokens, layers (LlamaDecoderLayer), norm; no head.

    forward(input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
            inputs_embeds=None, use_cache=False) -> BaseModelOutputWithPast(last_hidden_state, past_key_values)
    """

    def __init__(self, config: LlamaConfig, generator=None, dtype=None, device: str = None,
                 init_weights: bool = True):
        """generator: a numpy.random.Generator for the initial weights (seed 0 when None); dtype: the
        weights' dtype (npformer's default when None); device: where they live (NPFORMER_DEVICE when
        None); init_weights=False keeps the layers' own initialisation (for weights loaded next)."""
        super().__init__(config)
        with self.building(dtype):
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
            self.layers = nn.ModuleList([LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers)])
            self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = self.layers[0].self_attn.rotary_emb          # one table for all layers, as HF
        for layer in self.layers:
            layer.self_attn.rotary_emb = self.rotary_emb
        self.post_init(generator, device, init_weights)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache: bool = False) -> BaseModelOutputWithPast:
        """input_ids: (B, T) ints in [0, vocab_size); or inputs_embeds: (B, T, C) in the model's dtype
            (a Tensor keeps its graph: its gradient is computed), exactly one of the two.
        attention_mask: (B, P + T), HF's polarity: 1 (or True) = a real token, 0 = padding; padded
            keys are left out of every query, on top of the causal mask. A query left with no key
            (a pad at the start of a left-padded row) gets a zero attention output, as HF's sdpa
            path and torch's SDPA give it. None: every token is real.
        position_ids: (B, T) or (1, T) ints >= 0, the RoPE positions; None: P .. P + T - 1 (as HF's
            forward; left-padded batches pass cumsum(attention_mask) - 1 themselves, as HF's generate).
        past_key_values: None, or the past_key_values of an earlier call with use_cache=True: one
            (k, v) per layer, each (B, Hkv, P, D), RoPE already applied to k (HF's legacy tuple form).
        use_cache: return this call's past_key_values (the cache extended by these T tokens); run
            under npformer.no_grad() when generating, or the cache keeps the graph.
        """
        where = type(self).__name__
        x = self._embeddings(input_ids, inputs_embeds)                          # (B, T, C)
        B, T = x.shape[:2]
        past = self._past(past_key_values)
        P = 0 if past[0] is None else past[0][0].shape[2]
        mask = None if attention_mask is None else self._mask(attention_mask, B, P + T)
        pos = None if position_ids is None else self._positions(position_ids, B, T)
        if use_cache not in (True, False):
            raise ValueError(f"{where}: use_cache must be True or False; got {use_cache!r}")
        presents = []
        for layer, layer_past in zip(self.layers, past):
            x, present = layer(x, mask, pos, layer_past, use_cache)
            presents.append(present)
        return BaseModelOutputWithPast(self.norm(x), tuple(presents) if use_cache else None)

    # ------------------------------------------------------------------ inputs
    def _array(self, name: str, value):
        """value (Tensor, array or nested list) as an array on the model's device."""
        return constant(type(self).__name__, value, self.embed_tokens.weight, f"{name} is", "the model is")

    def _embeddings(self, input_ids, inputs_embeds) -> Tensor:
        """embed_tokens(input_ids), or inputs_embeds checked: (B, T, C), T >= 1."""
        where, w = type(self).__name__, self.embed_tokens.weight
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(f"{where}: pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is not None:
            x = inputs_embeds if isinstance(inputs_embeds, Tensor) else Tensor(self._array("inputs_embeds",
                                                                                            inputs_embeds))
            if x.ndim != 3 or x.shape[1] < 1 or x.shape[2] != self.config.hidden_size:
                raise ValueError(f"{where}: inputs_embeds must have shape (B, T, hidden_size) = (B, T, "
                                 f"{self.config.hidden_size}) with T >= 1; got {tuple(x.shape)}")
            if x.dtype != w.dtype:
                raise TypeError(f"{where}: inputs_embeds is {x.dtype} but the model is {w.dtype}; nothing is cast")
            return x
        ids = self._array("input_ids", input_ids)
        V = self.config.vocab_size
        if ids.dtype.kind not in "iu" or ids.ndim != 2 or ids.shape[1] < 1:
            raise ValueError(f"{where}: input_ids must be integers of shape (B, T) with T >= 1; got {ids.dtype} "
                             f"{tuple(ids.shape)}")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= V):
            raise ValueError(f"{where}: input_ids {tuple(ids.shape)} holds values outside [0, vocab_size) = "
                             f"[0, {V}): min {int(ids.min())}, max {int(ids.max())}")
        return self.embed_tokens(ids)                                            # (B, T, C)

    def _past(self, past_key_values) -> tuple:
        """One (k, v) or None per layer; GroupedQueryAttention checks each pair's shapes."""
        L = self.config.num_hidden_layers
        if past_key_values is None:
            return (None,) * L
        if not isinstance(past_key_values, (tuple, list)) or len(past_key_values) != L:
            got = type(past_key_values).__name__
            got += f" of length {len(past_key_values)}" if isinstance(past_key_values, (tuple, list)) else ""
            raise ValueError(f"{type(self).__name__}: past_key_values must be one (k, v) pair per layer "
                             f"({L}), as returned with use_cache=True; got {got}")
        lengths = set()
        for kv in past_key_values:
            if not (isinstance(kv, (tuple, list)) and len(kv) == 2 and len(np.shape(kv[0])) == 4):
                lengths.add(None)
                break
            lengths.add(np.shape(kv[0])[2])
        if len(lengths) != 1 or None in lengths:
            raise ValueError(f"{type(self).__name__}: past_key_values must hold one (k, v) pair of shape (B, "
                             f"num_key_value_heads, P, head_dim) per layer, the same P in every layer")
        return tuple(past_key_values)

    def _mask(self, attention_mask, B: int, S: int):
        """(B, 1, 1, S) bool, True = attend: the keys where attention_mask is nonzero."""
        am = self._array("attention_mask", attention_mask)
        if (am.dtype != np.bool_ and am.dtype.kind not in "iuf") or tuple(am.shape) != (B, S):
            raise ValueError(f"{type(self).__name__}: attention_mask must be 1/0 (or bool) of shape (B, past + T) = "
                             f"{(B, S)}; got {am.dtype} {tuple(am.shape)}")
        return (am != 0)[:, None, None, :]

    def _positions(self, position_ids, B: int, T: int):
        """position_ids as an int array (B | 1, T) on the model's device, >= 0."""
        pos = self._array("position_ids", position_ids)
        if pos.dtype.kind not in "iu" or pos.ndim != 2 or pos.shape[1] != T or pos.shape[0] not in (1, B):
            raise ValueError(f"{type(self).__name__}: position_ids must be integers of shape (B, T) = {(B, T)} or "
                             f"(1, T); got {pos.dtype} {tuple(pos.shape)}")
        if pos.size and int(pos.min()) < 0:
            raise ValueError(f"{type(self).__name__}: position_ids must be >= 0; got {int(pos.min())}")
        return pos


class LlamaForCausalLM(LlamaPreTrainedModel):
    """LLaMA's language model: `model` (LlamaModel) and `lm_head` Linear(C, V) without bias, which is
    model.embed_tokens.weight when config.tie_word_embeddings.

    forward(input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
            inputs_embeds=None, labels=None, use_cache=False)
        -> CausalLMOutputWithPast(loss, logits (B, T, V), past_key_values)
    npformer.models.sampling.generate samples from it with its KV cache.
    """

    def __init__(self, config: LlamaConfig, generator=None, dtype=None, device: str = None,
                 init_weights: bool = True):
        """generator, dtype, device, init_weights: as LlamaModel's."""
        super().__init__(config)
        with self.building(dtype):
            self.model = LlamaModel(config, init_weights=False)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight             # (V, C), shared
        self.post_init(generator, device, init_weights)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache: bool = False) -> CausalLMOutputWithPast:
        """Inputs as LlamaModel.forward. labels: (B, T) ints in [0, vocab_size), or -100 (ignored),
        aligned with the input: shifted here, as HF's, so position t's logits predict labels[t + 1]
        (labels = input_ids for plain language modelling). The loss is the mean cross-entropy over
        the predicted labels that are not -100 (nan when there are none, as HF's)."""
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache)
        logits = self.lm_head(out.last_hidden_state)                             # (B, T, V)
        loss = None if labels is None else self._loss(logits, labels)
        return CausalLMOutputWithPast(loss, logits, out.past_key_values)

    def _loss(self, logits: Tensor, labels) -> Tensor:
        """Mean CE of logits[:, t] against labels[:, t + 1]; the last position predicts nothing."""
        B, T, V = logits.shape
        where = type(self).__name__
        y = self.model._array("labels", labels)
        if y.dtype.kind not in "iu" or tuple(y.shape) != (B, T):
            raise ValueError(f"{where}: labels must be integers of shape (B, T) = {(B, T)}, the shape of the "
                             f"input; got {y.dtype} {tuple(y.shape)}")
        bad = ((y < 0) | (y >= V)) & (y != -100)
        if bool(bad.any()):
            raise ValueError(f"{where}: labels must be in [0, vocab_size) = [0, {V}) or -100 (ignored); "
                             f"got {int(y[bad].ravel()[0])}")
        xp = backend.get_array_module(y)
        shifted = xp.concatenate([y[:, 1:], xp.full((B, 1), -100, dtype=y.dtype)], axis=1)   # (B, T)
        return F.cross_entropy(logits.reshape(B * T, V), shifted.reshape(B * T), ignore_index=-100)
