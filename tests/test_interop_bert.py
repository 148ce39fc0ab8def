"""from_torch / to_torch for HF transformers' BERT models (npformer/interop/bert.py), checked with
npformer.interop.compare in float64: outputs (the loss included), input and parameter gradients and
one AdamW step at rtol 1e-10, with padding masks and token types; round trips bit for bit.

Run with -s to print the worst relative difference per model and kind (entries that are zero in
exact arithmetic, the key biases' gradients, are left out of the table: compare's atol covers them).
"""

import numpy as np
import pytest

from npformer import models
from npformer.interop import compare, from_torch, to_torch
from tests.helpers import T, host
from tests.test_models_bert import batch
from tests.torch_compare import one_torch_thread, print_worst

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.verify
ADAMW = ("AdamW", {"lr": 1e-2, "weight_decay": 0.1})
WORST = {}
TINY = dict(vocab_size=13, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=12,
            max_position_embeddings=10, type_vocab_size=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_report():
    with one_torch_thread():
        yield
    print_worst("worst relative difference of BERT twins (compare, float64)", WORST)


def hf_bert(cls, seed, attn="eager", **overrides):
    """A small float64 HF BERT model in eval mode with every parameter moved off its init."""
    config = transformers.BertConfig(**{**TINY, **overrides}, attn_implementation=attn)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, cls)(config).double().eval()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    return model




def check(name, hf, twin, ids, **kwargs):
    """compare with one AdamW step at rtol 1e-10; the worst rel per kind recorded (exact zeros aside)."""
    report = compare(hf, twin, ids, kwargs=kwargs, steps=1, optimizer=ADAMW)
    report.assert_close(rtol=1e-10)
    slot = WORST.setdefault(name, {})
    for kind in ("output", "loss", "input_grad", "grad", "updated"):
        entries = [e for e in report.select(kind) if "key.bias" not in e.name]
        if entries:
            slot[kind] = max([slot.get(kind, 0.0)] + [e.rel for e in entries])
    return report


def assert_same_state(a: dict, b: dict):
    """Two torch state dicts: the same names, dtypes and bits."""
    assert list(a) == list(b)
    for k in a:
        x, y = a[k].detach().numpy(), b[k].detach().numpy()
        assert x.dtype == y.dtype and np.array_equal(x.view(np.uint8), y.view(np.uint8)), k


FIELDS = {"BertModel": ["last_hidden_state", "pooler_output"], "BertForMaskedLM": ["loss", "logits"],
          "BertForSequenceClassification": ["loss", "logits"],
          "BertForQuestionAnswering": ["loss", "start_logits", "end_logits"]}
CASES = [
    ("BertModel", {}, lambda ids, mask: {}),
    ("BertForMaskedLM", {}, lambda ids, mask: dict(labels=np.where(mask == 1, ids, -100))),
    ("BertForSequenceClassification", dict(num_labels=3), lambda ids, mask: dict(labels=np.array([2, 0, 1]))),
    ("BertForQuestionAnswering", {}, lambda ids, mask: dict(start_positions=np.array([1, 9, 0]),
                                                             end_positions=np.array([4, 3, -1]))),
]


@pytest.mark.parametrize("cls,options,labels", CASES, ids=[c[0] for c in CASES])
def test_twin_matches_hf_with_padding_token_types_and_loss(cls, options, labels):
    hf = hf_bert(cls, 1, **options)
    twin = from_torch(hf)
    assert type(twin) is getattr(models, cls) and not hasattr(twin, "torch_mapping")   # names are HF's
    ids, mask, types = batch(1)
    extra = labels(ids, mask)
    report = check(cls, hf, twin, ids, attention_mask=mask, token_type_ids=types, **extra)
    outputs = [e.name for e in report.select("output")]                  # HF's fields, in HF's order
    assert outputs == ["output." + f for f in FIELDS[cls]] and all(not e.note for e in report.select("grad"))
    assert_same_state(to_torch(twin).state_dict(), hf.state_dict())


def test_mlm_untied_and_bert_model_without_pooler():
    hf = hf_bert("BertForMaskedLM", 2, tie_word_embeddings=False, hidden_act="relu")
    twin = from_torch(hf)
    assert twin.cls.predictions.decoder.weight is not twin.bert.embeddings.word_embeddings.weight
    ids, mask, types = batch(2)
    report = check("BertForMaskedLM untied", hf, twin, ids, attention_mask=mask, token_type_ids=types,
                   labels=np.where(mask == 1, ids, -100))
    assert report.select("grad", "cls.predictions.bias")[0].note == "no gradient on either side"   # unused in HF too
    assert_same_state(to_torch(twin).state_dict(), hf.state_dict())
    hf = hf_bert("BertModel", 3, hidden_act="gelu_new")
    hf.pooler = None
    twin = from_torch(hf)
    assert twin.pooler is None
    check("BertModel no pooler", hf, twin, batch(3)[0], attention_mask=batch(3)[1])
    back = to_torch(twin)
    assert back.pooler is None
    assert_same_state(back.state_dict(), hf.state_dict())


@pytest.mark.parametrize("num_labels,problem_type", [(1, None), (3, "multi_label_classification")])
def test_sequence_classification_regression_and_multi_label(num_labels, problem_type):
    hf = hf_bert("BertForSequenceClassification", 4, num_labels=num_labels, problem_type=problem_type,
                 classifier_dropout=0.0)
    twin = from_torch(hf)
    assert twin.config.problem_type == problem_type and twin.dropout.p == 0.0
    ids, mask, types = batch(4)
    rng = np.random.default_rng(4)
    labels = rng.standard_normal(3) if num_labels == 1 else (rng.random((3, 3)) < 0.5).astype(np.float64)
    report = check(f"BertForSequenceClassification {problem_type or 'regression'}", hf, twin, ids,
                   attention_mask=mask, token_type_ids=types, labels=labels)
    assert report.select("input_grad", "labels")[0].scale > 0            # float labels get a gradient, as in torch


def test_sdpa_attention_and_position_ids_match_too():
    hf = hf_bert("BertModel", 5, attn="sdpa", hidden_act="gelu_pytorch_tanh")
    twin = from_torch(hf)
    ids, mask, types = batch(5)
    pos = np.array([[0, 1, 2, 3, 4, 5], [2, 3, 4, 5, 6, 7], [9, 8, 7, 6, 5, 4]])
    check("BertModel sdpa", hf, twin, ids, attention_mask=mask.astype(bool), token_type_ids=types, position_ids=pos)


def test_a_row_without_real_tokens_is_the_documented_difference():
    """Every position of a row with a real token agrees with HF, padded positions too; a row whose
    attention_mask is all 0 is finite here (zero attention output), HF's spreads evenly over its keys."""
    hf = hf_bert("BertModel", 6)
    twin = from_torch(hf)
    ids, mask, types = batch(6)
    mask[2] = 0
    with torch.no_grad():
        theirs = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types))
    ours = twin(T(ids), attention_mask=T(mask), token_type_ids=T(types))
    h, want = host(ours.last_hidden_state), theirs.last_hidden_state.numpy()
    assert np.abs(h[:2] - want[:2]).max() <= 1e-13 * np.abs(want).max()
    assert np.isfinite(h).all() and np.abs(h[2] - want[2]).max() > 1e-3


def test_to_torch_of_an_npformer_model_and_float32():
    config = models.BertConfig(**{**TINY, "num_labels": 4, "hidden_act": "gelu_new"})
    ours = models.BertForSequenceClassification(config, generator=np.random.default_rng(7), dtype=np.float64).eval()
    back = to_torch(ours)
    assert type(back) is transformers.BertForSequenceClassification and back.config.num_labels == 4
    assert back.config.hidden_act == "gelu_new" and back.config._attn_implementation == "eager"
    ids, mask, types = batch(7)
    check("npformer -> BertForSequenceClassification", back, ours, ids, attention_mask=mask, token_type_ids=types)
    hf32 = hf_bert("BertForQuestionAnswering", 7).float()
    twin32 = from_torch(hf32)
    assert twin32.parameters()[0].dtype == np.float32 and not twin32.training
    with torch.no_grad():
        want = hf32(torch.tensor(ids), attention_mask=torch.tensor(mask)).start_logits.numpy()
    got = host(twin32(T(ids), attention_mask=T(mask)).start_logits)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert to_torch(twin32).qa_outputs.weight.dtype == torch.float32


@pytest.mark.parametrize("overrides,match", [
    (dict(is_decoder=True), r"BertConfig.is_decoder=True is not supported"),
    (dict(is_decoder=True, add_cross_attention=True), r"is not supported"),
    (dict(hidden_act="silu"), r"BertConfig.hidden_act='silu' is not supported"),
    (dict(num_labels=3), r"config.num_labels must be 2"),
])
def test_options_npformer_lacks_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        from_torch(hf_bert("BertForQuestionAnswering", 8, **overrides))
