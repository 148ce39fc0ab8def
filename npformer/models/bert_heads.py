"""Task heads on BertModel, with HF's class, module and parameter names.

    BertForMaskedLM                 logits = decoder(LayerNorm(act(dense(h))))      (B, T, V)
                                    decoder.weight is the word embeddings (tie_word_embeddings),
                                    decoder.bias is cls.predictions.bias
    BertForSequenceClassification   logits = classifier(dropout(pooler_output))    (B, num_labels)
    BertForQuestionAnswering        start_logits, end_logits = qa_outputs(h)       (B, T) each

h = BertModel's last_hidden_state (B, T, H) (shapes as in bert.py). Each forward returns a NamedTuple
in the field order of HF's ModelOutput, the loss first (None without labels): ``loss, logits =
model(ids, labels=y)`` and ``out.logits`` both read as they do with HF. (npformer's GPT returns
(logits, loss); these follow HF so that outputs line up with HF's field by field.)
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from .. import nn, ops
from ..nn import functional as F
from ..nn.layers import empty_parameter
from ..tensor import Tensor
from .bert import ACT2FN, BertConfig, BertModel, BertPreTrainedModel


class MaskedLMOutput(NamedTuple):
    """loss: mean cross-entropy over the labels that are not -100, or None; logits: (B, T, V)."""
    loss: Optional[Tensor]
    logits: Tensor


class SequenceClassifierOutput(NamedTuple):
    """loss: see BertForSequenceClassification.forward, or None; logits: (B, num_labels)."""
    loss: Optional[Tensor]
    logits: Tensor


class QuestionAnsweringModelOutput(NamedTuple):
    """loss: (CE(start) + CE(end)) / 2, or None; start_logits, end_logits: (B, T) over positions."""
    loss: Optional[Tensor]
    start_logits: Tensor
    end_logits: Tensor


# ----------------------------------------------------------------------------- masked language model

class BertPredictionHeadTransform(nn.Module):
    """LayerNorm(act(dense(h))): (B, T, H) -> (B, T, H)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.hidden_act = config.hidden_act
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.LayerNorm(ACT2FN[self.hidden_act](self.dense(hidden_states)))


class BertLMPredictionHead(nn.Module):
    """decoder(transform(h)): (B, T, H) -> (B, T, V). `bias` (V,) is the decoder's bias once
    BertForMaskedLM ties them; untied (tie_word_embeddings=False), HF's decoder keeps its own bias
    and `bias` is left unused, and so it is here."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = nn.init.zeros_(empty_parameter((config.vocab_size,)))

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.decoder(self.transform(hidden_states))


class BertOnlyMLMHead(nn.Module):
    """The `cls` module of BertForMaskedLM: just `predictions`."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, sequence_output: Tensor) -> Tensor:
        return self.predictions(sequence_output)


class BertForMaskedLM(BertPreTrainedModel):
    """BERT's masked-language-model: `bert` (BertModel without pooler) and `cls` (the LM head).

    forward(input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None)
        -> MaskedLMOutput(loss, logits (B, T, V)).
    """

    def __init__(self, config: BertConfig, generator=None, dtype=None, device: str = None,
                 init_weights: bool = True):
        """generator, dtype, device, init_weights: as BertModel's."""
        super().__init__(config)
        with self.building(dtype):
            self.bert = BertModel(config, add_pooling_layer=False, init_weights=False)
            self.cls = BertOnlyMLMHead(config)
        if config.tie_word_embeddings:
            predictions = self.cls.predictions
            predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight   # (V, H), shared
            predictions.decoder.bias = predictions.bias                                # (V,), shared
        self.post_init(generator, device, init_weights)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None):
        """Inputs as BertModel.forward. labels: (B, T) ints in [0, vocab_size), or -100 where no
        token is to be predicted (the unmasked positions); the loss is the mean cross-entropy over
        the others (nan when there are none, as torch's)."""
        h = self.bert(input_ids, attention_mask, token_type_ids, position_ids).last_hidden_state   # (B, T, H)
        logits = self.cls(h)                                                                     # (B, T, V)
        loss = None
        if labels is not None:
            B, T, V = logits.shape
            y = self.bert._array("labels", labels)
            if y.dtype.kind not in "iu" or tuple(y.shape) != (B, T):
                raise ValueError(f"BertForMaskedLM: labels must be integers of shape (B, T) = {(B, T)}, the shape "
                                 f"of input_ids; got {y.dtype} {tuple(y.shape)}")
            bad = ((y < 0) | (y >= V)) & (y != -100)
            if bool(bad.any()):
                raise ValueError(f"BertForMaskedLM: labels must be in [0, vocab_size) = [0, {V}) or -100 (ignored); "
                                 f"got {int(y[bad].ravel()[0])}")
            loss = F.cross_entropy(logits.reshape(B * T, V), y.reshape(B * T), ignore_index=-100)
        return MaskedLMOutput(loss, logits)


# ----------------------------------------------------------------------------- sequence classification

class BertForSequenceClassification(BertPreTrainedModel):
    """`bert` (BertModel with pooler), `dropout` (classifier_dropout, else hidden_dropout_prob) and
    `classifier` Linear(H, num_labels) on the pooled [CLS] state.

    forward(input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None)
        -> SequenceClassifierOutput(loss, logits (B, num_labels)).
    """

    def __init__(self, config: BertConfig, generator=None, dtype=None, device: str = None,
                 init_weights: bool = True):
        """generator, dtype, device, init_weights: as BertModel's."""
        super().__init__(config)
        self.num_labels = config.num_labels
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        with self.building(dtype):
            self.bert = BertModel(config, init_weights=False)
            self.dropout = nn.Dropout(p)
            self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init(generator, device, init_weights)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None):
        """Inputs as BertModel.forward. The loss, by config.problem_type, as HF's (when None:
        "regression" for num_labels = 1, else "single_label_classification" for integer labels and
        "multi_label_classification" for floating ones):
          regression                  mean squared error; labels (B,) (or (B, 1)) for num_labels = 1,
                                      (B, num_labels) otherwise
          single_label_classification mean cross-entropy; labels (B,) ints in [0, num_labels)
          multi_label_classification  mean binary cross-entropy of sigmoid(logits); labels (B, num_labels) in [0, 1]
        """
        pooled = self.bert(input_ids, attention_mask, token_type_ids, position_ids).pooler_output   # (B, H)
        logits = self.classifier(self.dropout(pooled))                                          # (B, num_labels)
        loss = None if labels is None else self._loss(logits, labels)
        return SequenceClassifierOutput(loss, logits)

    def _loss(self, logits: Tensor, labels) -> Tensor:
        """The loss of config.problem_type; float labels given as a Tensor get their gradient, as in torch."""
        B, C = logits.shape
        y = self.bert._array("labels", labels)
        kind = self.config.problem_type or ("regression" if C == 1 else "single_label_classification"
                                            if y.dtype.kind in "iu" else "multi_label_classification")
        where = f"BertForSequenceClassification ({kind})"
        if kind == "single_label_classification":
            if y.dtype.kind not in "iu" or y.size != B or y.ndim not in (1, 2):
                raise ValueError(f"{where}: labels must be integers of shape (B,) = ({B},); got {y.dtype} "
                                 f"{tuple(y.shape)}")
            y = y.reshape(B)
            if bool(((y < 0) | (y >= C)).any()):
                raise ValueError(f"{where}: labels must be in [0, num_labels) = [0, {C}); got values from "
                                 f"{int(y.min())} to {int(y.max())}")
            return F.cross_entropy(logits, y)
        want = (B,) if kind == "regression" and C == 1 else (B, C)
        if y.dtype.kind not in "iufb" or (tuple(y.shape) != want and not (C == 1 and tuple(y.shape) == (B, 1))):
            raise ValueError(f"{where}: labels must be numbers of shape {want}; got {y.dtype} {tuple(y.shape)}")
        y = labels if isinstance(labels, Tensor) and y.dtype.kind == "f" else Tensor(y)
        y = ops.astype(y, logits.dtype).reshape(logits.shape)                       # (B, C)
        if kind == "regression":
            d = logits - y
            return ops.mean(d * d)
        # log(1 + exp(x)) - x y, computed without overflow as max(x, 0) - x y + log(1 + exp(-|x|))
        return ops.mean(F.relu(logits) - logits * y + ops.log(1.0 + ops.exp(-ops.abs(logits))))


# ----------------------------------------------------------------------------- extractive question answering

class BertForQuestionAnswering(BertPreTrainedModel):
    """`bert` (BertModel without pooler) and `qa_outputs` Linear(H, 2): a start and an end score for
    every position of the answer span. config.num_labels must be 2 (HF's default).

    forward(input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
            start_positions=None, end_positions=None)
        -> QuestionAnsweringModelOutput(loss, start_logits (B, T), end_logits (B, T)).
    """

    def __init__(self, config: BertConfig, generator=None, dtype=None, device: str = None,
                 init_weights: bool = True):
        """generator, dtype, device, init_weights: as BertModel's."""
        if isinstance(config, BertConfig) and config.num_labels != 2:
            raise ValueError(f"BertForQuestionAnswering: config.num_labels must be 2 (start and end logits); "
                             f"got {config.num_labels}")
        super().__init__(config)
        self.num_labels = config.num_labels
        with self.building(dtype):
            self.bert = BertModel(config, add_pooling_layer=False, init_weights=False)
            self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init(generator, device, init_weights)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                start_positions=None, end_positions=None):
        """Inputs as BertModel.forward. start_positions, end_positions: (B,) (or (B, 1)) ints, both or
        neither; as HF, each is clamped to [0, T] and T (a position outside the input) is ignored.
        The loss is (mean CE(start_logits, start) + mean CE(end_logits, end)) / 2."""
        h = self.bert(input_ids, attention_mask, token_type_ids, position_ids).last_hidden_state   # (B, T, H)
        B, T, _ = h.shape
        start, end = ops.split(self.qa_outputs(h), 1, axis=2)                                  # 2 x (B, T, 1)
        start_logits, end_logits = start.reshape(B, T), end.reshape(B, T)                      # (B, T)
        loss = None
        if (start_positions is None) != (end_positions is None):
            raise ValueError("BertForQuestionAnswering: pass both start_positions and end_positions, or neither")
        if start_positions is not None:
            losses = []
            for name, positions, logits in (("start_positions", start_positions, start_logits),
                                            ("end_positions", end_positions, end_logits)):
                y = self.bert._array(name, positions)
                if y.dtype.kind not in "iu" or tuple(y.shape) not in ((B,), (B, 1)):
                    raise ValueError(f"BertForQuestionAnswering: {name} must be integers of shape (B,) = ({B},); "
                                     f"got {y.dtype} {tuple(y.shape)}")
                y = y.reshape(B).clip(0, T)                    # T: out of the input, ignored
                losses.append(F.cross_entropy(logits, y, ignore_index=T))
            loss = (losses[0] + losses[1]) / 2
        return QuestionAnsweringModelOutput(loss, start_logits, end_logits)
