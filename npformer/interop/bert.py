"""BERT twins: transformers' BertModel, BertForMaskedLM, BertForSequenceClassification and
BertForQuestionAnswering <-> the npformer.models classes of the same names.

Configuration: HF's BertConfig fields carry over unchanged (npformer's BertConfig has HF's names):
    vocab_size, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, hidden_act,
    hidden_dropout_prob, attention_probs_dropout_prob, max_position_embeddings, type_vocab_size,
    initializer_range, layer_norm_eps, pad_token_id, num_labels, classifier_dropout, problem_type,
    tie_word_embeddings
Anything the npformer models lack (is_decoder, add_cross_attention, a position_embedding_type other
than "absolute", a hidden_act that is not one of bert.ACT2FN's, a QA head without num_labels = 2)
raises ValueError naming the option. chunk_size_feed_forward changes only how HF schedules the
feed-forward, not what it computes, and is not carried.

Weights: the state-dict names are HF's (``bert.encoder.layer.0.attention.self.query.weight``) and
the layouts too (Linear weights (out, in)), so they are copied by name and the twin needs no
TorchMapping. A BertModel built with add_pooling_layer=False stays without pooler. Exported models
use the eager attention path (attn_implementation="eager"): softmax(q k^T / sqrt(hs) + mask) v, as
npformer computes it.
"""

from __future__ import annotations

import numpy as np

from .. import backend

HF_CLASSES = ("BertModel", "BertForMaskedLM", "BertForSequenceClassification", "BertForQuestionAnswering")
FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
          "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
          "initializer_range", "layer_norm_eps", "pad_token_id", "num_labels", "classifier_dropout", "problem_type",
          "tie_word_embeddings")
# config attribute -> the only value npformer's BERT can mirror
_FIXED = {"is_decoder": False, "add_cross_attention": False, "position_embedding_type": "absolute"}


def hf_bert_kind(module):
    """The class name for a transformers model in HF_CLASSES, else None (without importing transformers)."""
    cls = type(module)
    return cls.__name__ if cls.__name__ in HF_CLASSES and cls.__module__.startswith("transformers.") else None


def is_bert(module) -> bool:
    """True for an npformer BertModel or BERT task model."""
    from ..models.bert import BertPreTrainedModel
    return isinstance(module, BertPreTrainedModel)


def config_from_hf(c):
    """npformer BertConfig equivalent to transformers' BertConfig c; ValueError naming any option it lacks."""
    from ..models.bert import ACT2FN, BertConfig
    for name, wanted in _FIXED.items():
        value = getattr(c, name, wanted)
        if value != wanted:
            raise ValueError(f"BertConfig.{name}={value!r} is not supported (npformer's BERT needs {wanted!r})")
    if not isinstance(c.hidden_act, str) or c.hidden_act not in ACT2FN:
        raise ValueError(f"BertConfig.hidden_act={c.hidden_act!r} is not supported; supported: "
                         f"{', '.join(map(repr, ACT2FN))}")
    values = {name: getattr(c, name) for name in FIELDS}
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "layer_norm_eps"):
        values[name] = float(values[name])
    if values["classifier_dropout"] is not None:
        values["classifier_dropout"] = float(values["classifier_dropout"])
    return BertConfig(**values)


def config_to_hf(config, **extra):
    """transformers' BertConfig (eager attention) equivalent to an npformer BertConfig."""
    import transformers
    return transformers.BertConfig(**{name: getattr(config, name) for name in FIELDS},
                                   attn_implementation="eager", **extra)


def _twin_class(kind: str):
    from ..models import bert, bert_heads
    return getattr(bert, kind, None) or getattr(bert_heads, kind)


def bert_from_hf(model, dtype, device=None):
    """The npformer twin (dtype, device) of an HF BERT model of a class in HF_CLASSES, weights copied by name."""
    kind = hf_bert_kind(model)
    config = config_from_hf(model.config)
    options = dict(add_pooling_layer=model.pooler is not None) if kind == "BertModel" else {}
    twin = _twin_class(kind)(config, dtype=dtype, device=device, init_weights=False, **options)
    # cast=True: the dtype was chosen by the caller (or is the source's)
    twin.load_state_dict({k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}, cast=True)
    return twin.train(model.training)


def bert_to_hf(twin, torch_dtype):
    """The transformers model (eager attention, torch_dtype, CPU) of the class named like the
    npformer BERT `twin`, with its weights."""
    import torch
    import transformers
    kind = type(twin).__name__
    if kind not in HF_CLASSES:
        raise TypeError(f"to_torch: {kind} has no transformers twin; supported: {', '.join(HF_CLASSES)}")
    options = dict(add_pooling_layer=twin.pooler is not None) if kind == "BertModel" else {}
    with torch.random.fork_rng(devices=[]):                # its random init leaves torch's RNG alone
        model = getattr(transformers, kind)(config_to_hf(twin.config), **options)
    model = model.to(torch_dtype)
    model.load_state_dict({k: torch.from_numpy(np.array(backend.to_numpy(v))) for k, v in twin.state_dict().items()})
    return model.train(twin.training)
