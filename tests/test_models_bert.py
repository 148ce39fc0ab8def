"""BERT and its heads (npformer/models/bert.py, bert_heads.py) without torch: config checks, HF's
parameter names, HF's initialisation, weight tying (gradients from both uses), padding masks, the
losses against formulas written out in NumPy, numeric gradient checks in float64, and clear errors.
The comparisons with HF transformers are in test_interop_bert.py.
"""

import numpy as np
import pytest

import npformer as nf
from npformer.models import (BertConfig, BertForMaskedLM, BertForQuestionAnswering, BertForSequenceClassification,
                             BertModel)
from tests.helpers import DEVICE, T, host
from tests.test_nn_layers import gradcheck_module

TINY = dict(vocab_size=13, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=12,
            max_position_embeddings=10, type_vocab_size=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def tiny(cls=BertModel, seed=0, scale=0.3, **overrides):
    """A float64 model with every parameter from N(0, scale^2) (BERT's init would hide mistakes)."""
    kw = {k: overrides.pop(k) for k in ("add_pooling_layer",) if k in overrides}
    model = cls(BertConfig(**{**TINY, **overrides}), dtype=np.float64, device=DEVICE, **kw)
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        p.data[...] = p.xp.asarray(rng.standard_normal(p.shape) * scale)
    return model


def batch(seed=0, B=3, Tn=6):
    """(input_ids, attention_mask, token_type_ids): rows of 6, 4 and 2 real tokens, right-padded with 0,
    segment B from position 3 on."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 13, (B, Tn))
    mask = (np.arange(Tn)[None, :] < np.array([6, 4, 2])[:B, None]).astype(np.int64)
    ids[mask == 0] = 0
    types = (np.arange(Tn)[None, :] >= 3).astype(np.int64) * mask
    return ids, mask, types


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("field,value,match", [
    ("hidden_size", 10, r"hidden_size \(10\) must be divisible by num_attention_heads \(4\)"),
    ("vocab_size", 0, "vocab_size must be a positive integer"),
    ("num_hidden_layers", 1.5, "num_hidden_layers must be a positive integer"),
    ("hidden_act", "swish", "hidden_act must be one of 'gelu', 'gelu_new', 'gelu_pytorch_tanh', 'relu'"),
    ("hidden_dropout_prob", 1.0, r"hidden_dropout_prob must be in \[0, 1\)"),
    ("classifier_dropout", -0.1, r"classifier_dropout must be in \[0, 1\)"),
    ("layer_norm_eps", 0.0, "layer_norm_eps must be a number > 0"),
    ("initializer_range", -1.0, "initializer_range must be a number >= 0"),
    ("pad_token_id", 30522, r"pad_token_id must be None or an int in \[0, vocab_size\) = \[0, 30522\)"),
    ("problem_type", "ranking", "problem_type must be None or one of"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings must be True or False"),
])
def test_config_names_the_bad_field(field, value, match):
    kw = {"num_attention_heads": 4} if field == "hidden_size" else {}
    with pytest.raises(ValueError, match=match):
        BertConfig(**{field: value, **kw})


def test_config_defaults_are_bert_base_and_round_trip_through_a_dict():
    c = BertConfig()
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == \
        (30522, 768, 12, 12, 3072)
    assert (c.hidden_act, c.layer_norm_eps, c.pad_token_id, c.type_vocab_size, c.num_labels) == \
        ("gelu", 1e-12, 0, 2, 2)
    assert BertConfig(**c.to_dict()) == c
    with pytest.raises(TypeError, match="config must be a BertConfig"):
        BertModel(dict(TINY))


# ----------------------------------------------------------------------------- names and initialisation

def test_parameter_names_are_hf_names():
    one = {**TINY, "num_hidden_layers": 1}
    layer = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm"]
    trunk = ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
             "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"] + \
        [f"encoder.layer.0.{m}.{w}" for m in layer for w in ("weight", "bias")]
    pooler = ["pooler.dense.weight", "pooler.dense.bias"]
    bert = ["bert." + n for n in trunk]
    assert list(BertModel(BertConfig(**one)).state_dict()) == trunk + pooler
    assert list(BertModel(BertConfig(**one), add_pooling_layer=False).state_dict()) == trunk
    mlm = bert + ["cls.predictions.bias"] + [f"cls.predictions.{m}.{w}" for m in ("transform.dense",
                                             "transform.LayerNorm", "decoder") for w in ("weight", "bias")]
    assert list(BertForMaskedLM(BertConfig(**one)).state_dict()) == mlm
    assert list(BertForSequenceClassification(BertConfig(**one)).state_dict()) == \
        bert + ["bert." + n for n in pooler] + ["classifier.weight", "classifier.bias"]
    assert list(BertForQuestionAnswering(BertConfig(**one)).state_dict()) == \
        bert + ["qa_outputs.weight", "qa_outputs.bias"]


def test_initialisation_is_hfs_seeded_and_leaves_the_global_generator_alone():
    c = BertConfig(**{**TINY, "hidden_size": 64, "intermediate_size": 96, "initializer_range": 0.05})
    state = nf.random.default_generator("cpu").bit_generator.state
    m = BertForMaskedLM(c, generator=np.random.default_rng(3))
    assert nf.random.default_generator("cpu").bit_generator.state == state
    for name, p in m.named_parameters():
        a = host(p)
        if a.ndim == 2:
            assert abs(a.std() - 0.05) < 0.01, name
        elif name.endswith("bias"):
            assert not a.any(), name
        else:
            assert (a == 1).all(), name
    assert not host(m.bert.embeddings.word_embeddings.weight)[0].any()        # pad_token_id 0: its row is zero
    again = BertForMaskedLM(c, generator=np.random.default_rng(3))
    assert all(np.array_equal(host(a), host(b)) for a, b in zip(m.parameters(), again.parameters()))
    assert m.parameters()[0].dtype == np.float32                             # npformer's default dtype
    assert BertModel(c, dtype=np.float64).parameters()[0].dtype == np.float64


def test_mlm_decoder_is_tied_and_gets_both_gradients():
    """The word embeddings get the gradient of the lookup and of the decoder, added (not lost, not doubled)."""
    tied = tiny(BertForMaskedLM, 1)
    preds = tied.cls.predictions
    assert preds.decoder.weight is tied.bert.embeddings.word_embeddings.weight and preds.decoder.bias is preds.bias
    assert "cls.predictions.decoder.weight" not in dict(tied.named_parameters())
    untied = tiny(BertForMaskedLM, 1, tie_word_embeddings=False)
    assert untied.cls.predictions.decoder.weight is not untied.bert.embeddings.word_embeddings.weight
    untied.load_state_dict(tied.state_dict())
    ids, mask, types = batch(1)
    labels = np.where(mask == 1, ids, -100)
    for m in (tied, untied):
        m(T(ids), T(mask), T(types), labels=T(labels)).loss.backward()
    both = host(untied.bert.embeddings.word_embeddings.weight.grad) + host(untied.cls.predictions.decoder.weight.grad)
    assert rel(host(tied.bert.embeddings.word_embeddings.weight.grad), both) < 1e-14
    assert rel(host(preds.bias.grad), host(untied.cls.predictions.decoder.bias.grad)) < 1e-14
    assert untied.cls.predictions.bias.grad is None                          # untied, HF leaves it unused too
    assert not host(untied.bert.embeddings.word_embeddings.weight.grad)[0].any()   # the pad row: no lookup grad


# ----------------------------------------------------------------------------- padding

def test_padding_masks_keys_and_pad_contents_do_not_matter(ops_path):
    model = tiny(BertModel, 2)
    ids, mask, types = batch(2)
    out = model(T(ids), attention_mask=T(mask), token_type_ids=T(types))
    h, pooled = host(out.last_hidden_state), host(out.pooler_output)
    assert np.isfinite(h).all() and pooled.shape == (3, 8)
    other = ids.copy()
    other[mask == 0] = 7                                      # different tokens at the padded positions
    h2 = host(model(T(other), attention_mask=T(mask), token_type_ids=T(types)).last_hidden_state)
    assert rel(h2[mask == 1], h[mask == 1]) < 1e-13          # real positions: the same
    for b, n in enumerate([6, 4, 2]):                         # and the same as the row alone, unpadded
        alone = host(model(T(ids[b:b + 1, :n]), token_type_ids=T(types[b:b + 1, :n])).last_hidden_state)[0]
        assert rel(h[b, :n], alone) < 1e-13
    full = host(model(T(ids), token_type_ids=T(types)).last_hidden_state)
    assert rel(host(model(T(ids), T(np.ones_like(mask)), T(types)).last_hidden_state), full) < 1e-15
    assert rel(full[0], h[0]) < 1e-15 and rel(full[1], h[1]) > 1e-3      # the mask did something
    empty = host(model(T(ids), T(np.zeros_like(mask)), T(types)).last_hidden_state)
    assert np.isfinite(empty).all()                           # no real token at all: finite (zero attention)


def test_defaults_are_zero_token_types_and_positions_from_zero():
    model = tiny(BertModel, 3)
    ids = np.random.default_rng(3).integers(0, 13, (2, 5))
    plain = host(model(T(ids)).last_hidden_state)
    explicit = model(T(ids), token_type_ids=T(np.zeros((2, 5), np.int64)), position_ids=T(np.arange(5)[None]))
    assert rel(host(explicit.last_hidden_state), plain) < 1e-15
    shifted = host(model(T(ids), position_ids=T(np.arange(1, 6)[None].repeat(2, 0))).last_hidden_state)
    assert rel(shifted, plain) > 1e-3


# ----------------------------------------------------------------------------- losses

def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_mlm_loss_ignores_minus_100():
    model = tiny(BertForMaskedLM, 4)
    ids, mask, types = batch(4)
    labels = np.full_like(ids, -100)
    labels[0, 1], labels[1, 3], labels[2, 0] = 5, 12, 0
    loss, logits = model(T(ids), T(mask), T(types), labels=T(labels))
    lp = log_softmax(host(logits))
    want = -np.mean([lp[0, 1, 5], lp[1, 3, 12], lp[2, 0, 0]])
    assert abs(float(host(loss)) - want) < 1e-13
    assert model(T(ids), T(mask), T(types)).loss is None


def test_sequence_classification_losses_follow_problem_type():
    rng = np.random.default_rng(5)
    ids, mask, types = batch(5)
    single = tiny(BertForSequenceClassification, 5, num_labels=3)
    loss, logits = single(T(ids), T(mask), T(types), labels=T(np.array([2, 0, 1])))
    assert abs(float(host(loss)) + np.mean(log_softmax(host(logits))[[0, 1, 2], [2, 0, 1]])) < 1e-13
    reg = tiny(BertForSequenceClassification, 5, num_labels=1)
    y = rng.standard_normal(3)
    loss, logits = reg(T(ids), T(mask), T(types), labels=T(y))
    assert abs(float(host(loss)) - np.mean((host(logits)[:, 0] - y) ** 2)) < 1e-13
    multi = tiny(BertForSequenceClassification, 5, num_labels=3)
    y = (rng.random((3, 3)) < 0.5).astype(np.float64)
    loss, logits = multi(T(ids), T(mask), T(types), labels=T(y))             # float labels: multi-label
    x = host(logits)
    bce = -(y * np.log(1 / (1 + np.exp(-x))) + (1 - y) * np.log(1 - 1 / (1 + np.exp(-x))))
    assert abs(float(host(loss)) - bce.mean()) < 1e-13
    forced = tiny(BertForSequenceClassification, 5, num_labels=3, problem_type="regression")
    loss, logits = forced(T(ids), T(mask), T(types), labels=T(y))
    assert abs(float(host(loss)) - np.mean((host(logits) - y) ** 2)) < 1e-13


def test_question_answering_loss_clamps_and_ignores_out_of_range_positions():
    model = tiny(BertForQuestionAnswering, 6)
    ids, mask, types = batch(6)
    start, end = np.array([1, 9, 2]), np.array([3, 4, -2])   # 9 -> T = 6: ignored; -2 -> 0
    loss, s, e = model(T(ids), T(mask), T(types), start_positions=T(start), end_positions=T(end[:, None]))
    ls, le = log_softmax(host(s)), log_softmax(host(e))
    want = (-np.mean([ls[0, 1], ls[2, 2]]) - np.mean([le[0, 3], le[1, 4], le[2, 0]])) / 2
    assert s.shape == e.shape == (3, 6) and abs(float(host(loss)) - want) < 1e-13


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("cls,labels", [
    (BertForMaskedLM, dict(labels=np.where(batch(7)[1] == 1, batch(7)[0], -100))),
    (BertForSequenceClassification, dict(labels=np.array([1, 0, 1]))),
    (BertForQuestionAnswering, dict(start_positions=np.array([0, 2, 1]), end_positions=np.array([5, 3, 1]))),
])
def test_gradients_match_central_differences(cls, labels):
    """pad_token_id=None: a padding row's lookups are constants (as torch's padding_idx), which central
    differences would see through."""
    model = tiny(cls, 7, num_hidden_layers=1, hidden_act="gelu_new", pad_token_id=None)
    ids, mask, types = batch(7)

    class Call(nf.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self):
            return tuple(o for o in self.model(T(ids), T(mask), T(types), **{k: T(v) for k, v in labels.items()}))
    gradcheck_module(Call(), [], directions=3, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs,error,match", [
    (dict(input_ids=np.array([[1, 13]])), ValueError,
     r"input_ids \(1, 2\) holds values outside \[0, vocab_size\) = \[0, 13\): min 1, max 13"),
    (dict(input_ids=np.ones((1, 11), np.int64)), ValueError,
     r"input_ids has shape \(1, 11\): 11 positions exceed max_position_embeddings = 10"),
    (dict(input_ids=np.ones(4, np.int64)), ValueError, r"input_ids must be integers of shape \(B, T\)"),
    (dict(input_ids=np.ones((1, 4))), ValueError, r"input_ids must be integers of shape \(B, T\).*float64"),
    (dict(attention_mask=np.ones((2, 3))), ValueError,
     r"attention_mask must be 1/0 \(or bool\) of shape \(B, T\) = \(2, 4\).*got float64 \(2, 3\)"),
    (dict(token_type_ids=np.full((2, 4), 3)), ValueError,
     r"token_type_ids \(2, 4\) holds values outside \[0, type_vocab_size\) = \[0, 3\)"),
    (dict(token_type_ids=np.zeros((2, 5), np.int64)), ValueError,
     r"token_type_ids must be integers of shape \(B, T\) = \(2, 4\) or \(1, T\); got int64 \(2, 5\)"),
    (dict(position_ids=np.array([[0, 1, 2, 10]])), ValueError,
     r"position_ids \(1, 4\) holds values outside \[0, max_position_embeddings\) = \[0, 10\)"),
])
def test_bad_inputs_name_the_argument_and_shape(kwargs, error, match):
    model = tiny(BertModel)
    args = {"input_ids": np.ones((2, 4), np.int64), **kwargs}
    with pytest.raises(error, match=match):
        model(**{k: T(v) for k, v in args.items()})


def test_bad_labels_and_heads_raise():
    ids = T(np.ones((2, 4), np.int64))
    with pytest.raises(ValueError, match=r"labels must be integers of shape \(B, T\) = \(2, 4\)"):
        tiny(BertForMaskedLM)(ids, labels=T(np.ones((2, 3), np.int64)))
    with pytest.raises(ValueError, match=r"labels must be in \[0, vocab_size\) = \[0, 13\) or -100 .*got 13"):
        tiny(BertForMaskedLM)(ids, labels=T(np.full((2, 4), 13)))
    with pytest.raises(ValueError, match=r"\(single_label_classification\): labels must be in \[0, num_labels\)"):
        tiny(BertForSequenceClassification)(ids, labels=T(np.array([0, 2])))
    with pytest.raises(ValueError, match=r"\(regression\): labels must be numbers of shape \(2,\)"):
        tiny(BertForSequenceClassification, num_labels=1)(ids, labels=T(np.zeros(3)))
    with pytest.raises(ValueError, match="config.num_labels must be 2"):
        BertForQuestionAnswering(BertConfig(**TINY, num_labels=3))
    with pytest.raises(ValueError, match="pass both start_positions and end_positions"):
        tiny(BertForQuestionAnswering)(ids, start_positions=T(np.array([0, 1])))
    with pytest.raises(ValueError, match=r"end_positions must be integers of shape \(B,\) = \(2,\)"):
        tiny(BertForQuestionAnswering)(ids, start_positions=T(np.array([0, 1])), end_positions=T(np.zeros(2)))


def test_dropout_is_active_in_training_only():
    model = tiny(BertForSequenceClassification, 8, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    ids, mask, types = batch(8)
    run = lambda: host(model(T(ids), T(mask), T(types)).logits)               # noqa: E731
    assert rel(run(), run()) > 1e-6                                            # training: fresh masks
    model.eval()
    assert np.array_equal(run(), run())
