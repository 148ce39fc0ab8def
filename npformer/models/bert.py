"""BERT (Devlin et al., 2018): a bidirectional, post-norm Transformer encoder, with HF's names.

    x = LayerNorm(word_embeddings(ids) + token_type_embeddings(types) + position_embeddings(pos))
    every layer:  a = LayerNorm(x + dense(attention(x)))          attention.self, attention.output
                  x = LayerNorm(a + dense(act(dense(a))))          intermediate, output
    pooler_output = tanh(dense(x[:, 0]))                           the [CLS] position

Shapes: B batch, T sequence length, H = hidden_size, nh = num_attention_heads, hs = H // nh,
I = intermediate_size, V = vocab_size. Every module and parameter is named as in HF transformers'
modeling_bert.py (``encoder.layer.0.attention.self.query.weight``), so HF checkpoints load by
name, one to one; the classes keep HF's names too. Dropout sits where HF has it: after the
embeddings' LayerNorm, on the attention weights, and on each sublayer's output before its residual
add. The task heads (BertForMaskedLM, ...) are in bert_heads.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple, Optional

import numpy as np

from .. import backend
from .. import nn
from ..nn import functional as F
from ..nn import init
from ..ops._core import constant
from ..tensor import Tensor
from .config import require_divisible, require_dropout, require_positive_ints, require_token_ids
from .hf_base import PreTrainedModel

# hidden_act -> the function (HF's ACT2FN names): "gelu" is the exact erf form, the other two
# GELUs the tanh approximation 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
ACT2FN = {"gelu": lambda x: F.gelu(x, "none"), "gelu_new": lambda x: F.gelu(x, "tanh"),
          "gelu_pytorch_tanh": lambda x: F.gelu(x, "tanh"), "relu": F.relu}
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


@dataclass(frozen=True)
class BertConfig:
    """Hyperparameters of a BERT, HF's BertConfig fields and defaults (bert-base-uncased).

    num_labels, classifier_dropout (None: hidden_dropout_prob) and problem_type (None: chosen from
    num_labels and the labels, as HF) are for the sequence-classification head; the
    question-answering head needs num_labels = 2. tie_word_embeddings: the masked-LM decoder shares
    the word embeddings (and its bias is cls.predictions.bias). initializer_range 0 means 0.02, as HF.
    """
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: Optional[int] = 0
    num_labels: int = 2
    classifier_dropout: Optional[float] = None
    problem_type: Optional[str] = None
    tie_word_embeddings: bool = True

    def __post_init__(self):
        require_positive_ints(self, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                     "intermediate_size", "max_position_embeddings", "type_vocab_size",
                                     "num_labels"))
        require_divisible(self, "hidden_size", "num_attention_heads")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob") + (
                ("classifier_dropout",) if self.classifier_dropout is not None else ()):
            require_dropout(self, name)
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"BertConfig.hidden_act must be one of {', '.join(map(repr, ACT2FN))}; "
                             f"got {self.hidden_act!r}")
        for name, low in (("layer_norm_eps", "> 0"), ("initializer_range", ">= 0")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not (
                    v > 0 if low == "> 0" else v >= 0):
                raise ValueError(f"BertConfig.{name} must be a number {low}; got {v!r}")
        require_token_ids(self, ("pad_token_id",))
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"BertConfig.problem_type must be None or one of {', '.join(map(repr, PROBLEM_TYPES))}; "
                             f"got {self.problem_type!r}")
        if not isinstance(self.tie_word_embeddings, (bool, np.bool_)):
            raise ValueError(f"BertConfig.tie_word_embeddings must be True or False; got {self.tie_word_embeddings!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class BaseModelOutputWithPooling(NamedTuple):
    """BertModel's output, in HF's order: last_hidden_state (B, T, H), pooler_output (B, H) or None."""
    last_hidden_state: Tensor
    pooler_output: Optional[Tensor]


# ----------------------------------------------------------------------------- layers

class BertEmbeddings(nn.Module):
    """Sum of word, token-type and position embeddings, then LayerNorm and dropout: -> (B, T, H).

    word_embeddings has padding_idx = pad_token_id (that row starts at zero and gets no gradient
    from the lookups, as torch's nn.Embedding)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        H = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, H, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, H)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, H)
        self.LayerNorm = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids, position_ids) -> Tensor:
        """input_ids (B, T), token_type_ids and position_ids (B | 1, T): checked int arrays."""
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)   # (B, T, H)
        x = x + self.position_embeddings(position_ids)                                      # (B, T, H)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    """Multi-head attention softmax(q k^T / sqrt(hs) + mask) v, with separate query/key/value Linears."""

    def __init__(self, config: BertConfig):
        super().__init__()
        H = config.hidden_size
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = H // config.num_attention_heads
        self.query = nn.Linear(H, H)
        self.key = nn.Linear(H, H)
        self.value = nn.Linear(H, H)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)   # on the attention weights

    def forward(self, hidden_states: Tensor, mask=None) -> Tensor:
        """(B, T, H) -> (B, T, H), the heads merged. mask: None, or (B, 1, 1, T) bool, True = attend."""
        B, T, H = hidden_states.shape
        nh, hs = self.num_attention_heads, self.attention_head_size
        q = self.query(hidden_states).reshape(B, T, nh, hs).transpose(1, 2)     # (B, nh, T, hs)
        k = self.key(hidden_states).reshape(B, T, nh, hs).transpose(1, 2)       # (B, nh, T, hs)
        v = self.value(hidden_states).reshape(B, T, nh, hs).transpose(1, 2)     # (B, nh, T, hs)
        p = self.dropout.p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                           generator=self.dropout.generator)    # (B, nh, T, hs)
        return y.transpose(1, 2).reshape(B, T, H)                               # (B, T, H)


class BertSelfOutput(nn.Module):
    """LayerNorm(input_tensor + dropout(dense(hidden_states))): the attention sublayer's post-norm residual,
    (B, T, in_features) -> (B, T, H); in_features is H here, I in BertOutput."""

    def __init__(self, config: BertConfig, in_features: int = None):
        super().__init__()
        self.dense = nn.Linear(in_features or config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertAttention(nn.Module):
    """The attention sublayer: `self` (BertSelfAttention), then `output` (BertSelfOutput)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states: Tensor, mask=None) -> Tensor:
        return self.output(self.self(hidden_states, mask), hidden_states)


class BertIntermediate(nn.Module):
    """act(dense(x)): (B, T, H) -> (B, T, I), act = ACT2FN[hidden_act]."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.hidden_act = config.hidden_act

    def forward(self, hidden_states: Tensor) -> Tensor:
        return ACT2FN[self.hidden_act](self.dense(hidden_states))


class BertOutput(BertSelfOutput):
    """The feed-forward sublayer's post-norm residual: the same computation, (B, T, I) -> (B, T, H)."""

    def __init__(self, config: BertConfig):
        super().__init__(config, config.intermediate_size)


class BertLayer(nn.Module):
    """One post-norm encoder layer: attention, then the feed-forward (intermediate, output)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states: Tensor, mask=None) -> Tensor:
        a = self.attention(hidden_states, mask)                  # (B, T, H)
        return self.output(self.intermediate(a), a)             # (B, T, H)


class BertEncoder(nn.Module):
    """num_hidden_layers BertLayers, in `layer`."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states: Tensor, mask=None) -> Tensor:
        for layer in self.layer:
            hidden_states = layer(hidden_states, mask)
        return hidden_states


class BertPooler(nn.Module):
    """tanh(dense(h[:, 0])): the hidden state of the first ([CLS]) token, (B, T, H) -> (B, H)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


# ----------------------------------------------------------------------------- models

class BertPreTrainedModel(PreTrainedModel):
    """Base of the BERT models: the config, HF's initialisation, the dtype and the device.

    A subclass builds its layers inside ``with self.building(dtype):`` (default dtype `dtype`, the
    layers' own initialisation drawn from a throwaway generator, so the process's global one is
    untouched), then calls ``self.post_init(generator, device, init_weights)``.
    """

    config_class = BertConfig

    def _init_weights(self, generator):
        """HF's BERT initialisation: Linear and Embedding weights N(0, initializer_range^2) (the
        padding row then zero), biases (cls.predictions.bias too) zero, LayerNorm weights one.
        generator: a numpy.random.Generator (seed 0 when None), drawn in named_parameters order."""
        rng = generator if generator is not None else np.random.default_rng(0)
        std = self.config.initializer_range or 0.02
        for name, p in self.named_parameters():
            if p.ndim == 2:                                   # Linear and Embedding weights
                init.normal_(p, std=std, generator=rng)
            elif name.endswith("bias"):
                init.zeros_(p)
            else:                                             # LayerNorm weights
                init.ones_(p)
        for m in self.modules():
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                m.weight.data[m.padding_idx] = 0


class BertModel(BertPreTrainedModel):
    """The BERT encoder: embeddings, encoder (post-norm layers) and, with add_pooling_layer, pooler.

    forward(input_ids (B, T), attention_mask=None, token_type_ids=None, position_ids=None)
        -> BaseModelOutputWithPooling(last_hidden_state (B, T, H), pooler_output (B, H) or None).
    """

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True, generator=None, dtype=None,
                 device: str = None, init_weights: bool = True):
        """generator: a numpy.random.Generator for the initial weights (seed 0 when None); dtype: the
        weights' dtype (npformer's default when None); device: where they live (NPFORMER_DEVICE when
        None); init_weights=False keeps the layers' own initialisation (for weights loaded next)."""
        super().__init__(config)
        with self.building(dtype):
            self.embeddings = BertEmbeddings(config)
            self.encoder = BertEncoder(config)
            self.pooler = BertPooler(config) if add_pooling_layer else None
        self.post_init(generator, device, init_weights)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None):
        """input_ids: (B, T) ints in [0, vocab_size), T <= max_position_embeddings unless
        position_ids are given.

        attention_mask: (B, T), HF's polarity: 1 (or True) = a real token, 0 = padding; padded
            keys are masked out of every query (HF adds finfo.min to their scores, npformer leaves them
            out of the softmax: the same weights). A padded position's own query still attends to
            the real tokens, so its hidden state is HF's too. Only a row with no real token differs:
            npformer gives its queries zero attention output, HF spreads them evenly over all keys.
            None: every position is real.
        token_type_ids: (B, T) or (1, T) ints in [0, type_vocab_size) (segment A = 0, B = 1); None: zeros.
        position_ids: (B, T) or (1, T) ints in [0, max_position_embeddings); None: 0 .. T - 1.
        Returns BaseModelOutputWithPooling(last_hidden_state, pooler_output), a NamedTuple.
        """
        ids = self._ints("input_ids", input_ids, None, self.config.vocab_size, "vocab_size")
        B, T = ids.shape
        xp = backend.get_array_module(ids)
        if position_ids is None:
            if T > self.config.max_position_embeddings:
                raise ValueError(f"{type(self).__name__}: input_ids has shape {tuple(ids.shape)}: {T} positions exceed "
                                 f"max_position_embeddings = {self.config.max_position_embeddings}")
            pos = xp.arange(T)[None, :]                                          # (1, T)
        else:
            pos = self._ints("position_ids", position_ids, (B, T), self.config.max_position_embeddings,
                             "max_position_embeddings")
        if token_type_ids is None:
            types = xp.zeros((1, T), dtype=ids.dtype)                            # (1, T)
        else:
            types = self._ints("token_type_ids", token_type_ids, (B, T), self.config.type_vocab_size,
                               "type_vocab_size")
        mask = None if attention_mask is None else self._mask(attention_mask, B, T)
        x = self.embeddings(ids, types, pos)                                      # (B, T, H)
        x = self.encoder(x, mask)                                                 # (B, T, H)
        return BaseModelOutputWithPooling(x, None if self.pooler is None else self.pooler(x))

    # ------------------------------------------------------------------ inputs
    def _array(self, name: str, value):
        """value (Tensor, array or nested list) as an array on the model's device."""
        return constant(type(self).__name__, value, self.embeddings.word_embeddings.weight, f"{name} is",
                        "the model is")

    def _ints(self, name: str, value, shape, high: int, field: str):
        """An int array of shape (B, T) (shape None: any 2-D, T >= 1) or (1, T), its values in [0, high)."""
        a = self._array(name, value)
        where = type(self).__name__
        if shape is None:
            ok, expected = a.ndim == 2 and a.shape[1] >= 1, "(B, T) with T >= 1"
        else:
            ok, expected = a.ndim == 2 and a.shape[1] == shape[1] and a.shape[0] in (1, shape[0]), \
                f"(B, T) = {shape} or (1, T)"
        if a.dtype.kind not in "iu" or not ok:
            raise ValueError(f"{where}: {name} must be integers of shape {expected}; got {a.dtype} {tuple(a.shape)}")
        if a.size and (int(a.min()) < 0 or int(a.max()) >= high):
            raise ValueError(f"{where}: {name} {tuple(a.shape)} holds values outside [0, {field}) = [0, {high}): "
                             f"min {int(a.min())}, max {int(a.max())}")
        return a

    def _mask(self, attention_mask, B: int, T: int):
        """(B, 1, 1, T) bool, True = attend: the keys where attention_mask is nonzero."""
        am = self._array("attention_mask", attention_mask)
        if (am.dtype != np.bool_ and am.dtype.kind not in "iuf") or tuple(am.shape) != (B, T):
            raise ValueError(f"{type(self).__name__}: attention_mask must be 1/0 (or bool) of shape (B, T) = "
                             f"{(B, T)}, the shape of input_ids; got {am.dtype} {tuple(am.shape)}")
        return (am != 0)[:, None, None, :]
