"""from_torch / to_torch for the models people write, checked with npformer.interop.compare in float64
(outputs, input and parameter gradients, one AdamW step, rtol 1e-10) and round trips bit for bit:
torch.nn building blocks in containers, HF's GPT2LMHeadModel (tied and untied, and with a
left-padded batch), and HF's GPT2ForSequenceClassification.

Run with -s to print the worst relative difference per model and kind.
"""

from collections import OrderedDict

import numpy as np
import pytest

import npformer as nf
from npformer import nn
from npformer.interop import TorchMapping, compare, from_torch, to_torch
from npformer.models.classifier import SequenceClassifier
from npformer.models.gpt import GPT
from tests.helpers import T, host
from tests.torch_compare import one_torch_thread, print_worst

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.verify
ADAMW = ("AdamW", {"lr": 1e-2, "weight_decay": 0.1})
WORST = {}


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_report():
    with one_torch_thread():
        yield
    print_worst("worst relative difference of from_torch twins (compare, float64)", WORST)


def check(name, model, twin, *inputs, **kw):
    """compare(...) with one AdamW step, asserted at rtol 1e-10; the worst rel per kind recorded."""
    report = compare(model, twin, *inputs, steps=1, optimizer=ADAMW, **kw)
    report.assert_close(rtol=1e-10)
    slot = WORST.setdefault(name, {})
    for kind in ("output", "input_grad", "grad", "updated"):
        if report.select(kind):
            slot[kind] = max(slot.get(kind, 0.0), report.worst(1, kind)[0].rel)
    return report


def randomise(m, seed, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return m


def assert_same_state(a: dict, b: dict):
    """Two torch state dicts: the same names, dtypes and bits."""
    assert list(a) == list(b)
    for k in a:
        x, y = a[k].detach().numpy(), b[k].detach().numpy()
        assert x.dtype == y.dtype and np.array_equal(x.view(np.uint8), y.view(np.uint8)), k


# ----------------------------------------------------------------------------- torch.nn blocks

def test_sequential_of_blocks_matches_and_round_trips():
    tn = torch.nn
    m = randomise(tn.Sequential(tn.Linear(5, 8), tn.GELU(approximate="tanh"), tn.Dropout(0.0), tn.LayerNorm(8),
                                tn.ReLU(), tn.Identity(), tn.Sequential(tn.Linear(8, 6), tn.Tanh()), tn.GELU(),
                                tn.Linear(6, 3, bias=False)).double(), 1)
    twin = from_torch(m)
    assert [type(c).__name__ for c in twin] == ["Linear", "GELU", "Dropout", "LayerNorm", "ReLU", "Identity",
                                                "Sequential", "GELU", "Linear"]
    assert twin[1].approximate == "tanh" and twin[7].approximate == "none"
    x = np.random.default_rng(1).standard_normal((3, 4, 5))
    report = check("Sequential of blocks", m, twin, x)
    assert report.select("input_grad")[0].scale > 0
    back = to_torch(twin)
    assert type(back) is tn.Sequential and type(back[6]) is tn.Sequential and back[1].approximate == "tanh"
    assert_same_state(back.state_dict(), m.state_dict())
    with torch.no_grad():
        assert torch.equal(back(torch.tensor(x)), m(torch.tensor(x)))


def test_embedding_with_padding_idx_matches_and_its_row_gets_no_gradient():
    tn = torch.nn
    m = tn.Sequential(tn.Embedding(9, 6, padding_idx=-2), tn.Linear(6, 4), tn.ReLU()).double()
    randomise(m, 2)
    twin = from_torch(m)
    assert twin[0].padding_idx == 7
    idx = np.random.default_rng(2).integers(0, 9, (3, 5))
    idx[0, :2] = 7
    report = check("Embedding(padding_idx)", m, twin, idx)
    assert report.select("grad", "0.weight")[0].scale > 0
    twin(T(idx)).sum().backward()
    grad, used = host(twin[0].weight.grad), sorted(set(idx.ravel()) - {7})
    assert not np.any(grad[7]) and np.any(grad[used])
    back = to_torch(twin)
    assert back[0].padding_idx == 7
    assert_same_state(back.state_dict(), m.state_dict())
    fresh = nn.Embedding(5, 3, padding_idx=0)
    assert not np.any(host(fresh.weight)[0])                       # starts at zero, as torch's


def test_module_list_children_convert_recursively():
    tn = torch.nn
    m = tn.ModuleList([tn.Linear(4, 4), tn.GELU(), tn.ModuleList([tn.LayerNorm(4), tn.Dropout(0.25)])]).double()
    randomise(m, 3)
    m.eval()
    twin = from_torch(m)
    assert type(twin) is nn.ModuleList and type(twin[2]) is nn.ModuleList and twin[2][1].p == 0.25
    assert not twin.training and not twin[2][1].training
    x = np.random.default_rng(3).standard_normal((2, 4))
    for ours, theirs in ((twin[0], m[0]), (twin[1], m[1]), (twin[2][0], m[2][0])):
        want = theirs(torch.tensor(x)).detach().numpy()
        assert np.abs(host(ours(T(x))) - want).max() <= 1e-15 * np.abs(want).max()
    back = to_torch(twin)
    assert type(back) is tn.ModuleList and type(back[2][1]) is tn.Dropout and back[2][1].p == 0.25
    assert_same_state(back.state_dict(), m.state_dict())


@pytest.mark.parametrize("make,error,match", [
    (lambda: torch.nn.Sequential(OrderedDict(fc=torch.nn.Linear(2, 2))), ValueError, r"children named \['fc'\]"),
    (lambda: torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Conv1d(2, 2, 1)), TypeError,
     r"Sequential.1: torch.nn.modules.conv.Conv1d is not supported"),
    (lambda: torch.nn.Embedding(4, 2, max_norm=1.0), ValueError, r"Embedding\(max_norm=1.0\) is not supported"),
])
def test_blocks_that_do_not_fit_raise(make, error, match):
    with pytest.raises(error, match=match):
        from_torch(make())


# ----------------------------------------------------------------------------- HF GPT-2

try:
    import transformers
except ImportError:                    # the torch.nn tests above still run
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="needs transformers")


def gpt2(seed, cls="GPT2LMHeadModel", **overrides):
    """A small float64 HF GPT-2 model (eager attention, no dropout) with every parameter moved off its init."""
    kw = dict(vocab_size=17, n_positions=8, n_embd=8, n_layer=2, n_head=2, activation_function="gelu_new",
              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
              attn_implementation="eager")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, cls)(transformers.GPT2Config(**{**kw, **overrides})).double()
    return randomise(model, seed, scale=0.2)


def lm_losses(targets):
    """(torch loss, twin loss): cross-entropy of the logits against targets aligned with them (-1 ignored)."""
    V = lambda logits: logits.shape[-1]
    t = torch.tensor(targets)
    return (lambda out: torch.nn.functional.cross_entropy(out.logits.reshape(-1, V(out.logits)), t.reshape(-1),
                                                          ignore_index=-1),
            lambda out: nf.nn.functional.cross_entropy(out[0].reshape(-1, V(out[0])), targets.reshape(-1),
                                                       ignore_index=-1))


@needs_transformers
@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_lm_head_model_twin_reports_in_hf_names(tie):
    hf = gpt2(4, tie_word_embeddings=tie)
    twin = from_torch(hf)
    assert twin.config.tie_embeddings == tie
    assert "transformer.h.0.attn.c_attn.weight" in twin.torch_mapping.spec["transpose"]   # Conv1D: (in, out)
    rng = np.random.default_rng(4)
    idx, targets = rng.integers(0, 17, (2, 8)), rng.integers(0, 17, (2, 8))
    targets[1, 3] = -1
    report = check(f"GPT2LMHeadModel tie={tie}", hf, twin, idx, loss=lm_losses(targets))
    assert report.select("grad", "transformer.h.0.attn.c_attn.weight")[0].shape == (8, 24)   # HF's layout
    assert ("lm_head.weight" in {e.name for e in report.select("grad")}) == (not tie)
    assert_same_state(to_torch(twin).state_dict(), hf.state_dict())


class RealRows(torch.nn.Module):
    """The logits of an HF model at the non-pad positions only: (N, V)."""

    def __init__(self, model, rows, cols):
        super().__init__()
        self.model, self.rows, self.cols = model, torch.tensor(rows), torch.tensor(cols)

    def forward(self, idx, attention_mask, position_ids):
        return self.model(idx, attention_mask=attention_mask, position_ids=position_ids).logits[self.rows, self.cols]


class RealRowsTwin(nn.Module):
    """The same for npformer's GPT."""

    def __init__(self, model, rows, cols):
        super().__init__()
        self.model, self.rows, self.cols = model, rows, cols

    def forward(self, idx, attention_mask, position_ids):
        logits, _ = self.model(idx, attention_mask=attention_mask, position_ids=position_ids)
        return nf.ops.getitem(logits, (logits.xp.asarray(self.rows), logits.xp.asarray(self.cols)))


@needs_transformers
def test_left_padded_batch_matches_hf_at_the_real_positions():
    """HF's convention: attention_mask 1 = token, 0 = pad; position_ids as HF's generate makes them
    (cumsum(mask) - 1, pads at 1). The real positions agree with HF to rounding, with gradients and an
    AdamW step; the pad rows hold npformer's own finite values (their queries attend to nothing: zero
    attention output), not HF's (which spreads them evenly over every key)."""
    hf = gpt2(5)
    twin = from_torch(hf)
    rng = np.random.default_rng(5)
    idx = rng.integers(0, 17, (3, 8))
    mask = (np.arange(8)[None, :] >= np.array([[0], [3], [6]])).astype(np.int64)   # 8, 5 and 2 real tokens
    pos = mask.cumsum(-1) - 1
    pos[mask == 0] = 1
    rows, cols = np.nonzero(mask)
    mapping = TorchMapping(transpose=[f"model.{n}" for n in twin.torch_mapping.spec["transpose"]])
    check("GPT2LMHeadModel left-padded", RealRows(hf, rows, cols), RealRowsTwin(twin, rows, cols), idx,
          mask, pos, mapping=mapping)
    full = host(twin(T(idx), attention_mask=T(mask), position_ids=T(pos))[0])
    assert np.isfinite(full).all()
    with torch.no_grad():
        theirs = hf(torch.tensor(idx), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits
    assert np.abs(full[0] - theirs[0].numpy()).max() < 1e-12                       # the unpadded row: all of it


# ----------------------------------------------------------------------------- GPT2ForSequenceClassification

def classification_losses(labels):
    t = torch.tensor(labels)
    return (lambda out: torch.nn.functional.cross_entropy(out.logits, t),
            lambda out: nf.nn.functional.cross_entropy(out[0], labels))


@needs_transformers
def test_gpt2_for_sequence_classification_twin_matches_and_round_trips():
    pad = 16
    hf = gpt2(6, "GPT2ForSequenceClassification", num_labels=3, pad_token_id=pad)
    twin = from_torch(hf)
    assert type(twin) is SequenceClassifier and type(twin.backbone) is GPT
    assert twin.pooling == "last" and twin.pad_id == pad and twin.head.bias is None and twin.num_classes == 3
    rng = np.random.default_rng(6)
    idx = rng.integers(0, 16, (3, 8))
    idx[1, 5:] = pad                                                   # right padding: last real token at 4
    idx[2, 1:] = pad
    labels = np.array([2, 0, 1])
    report = check("GPT2ForSequenceClassification", hf, twin, idx, loss=classification_losses(labels))
    assert {e.name for e in report.select("grad")} >= {"score.weight", "transformer.wte.weight"}
    with torch.no_grad():
        theirs = hf(torch.tensor(idx)).logits.numpy()
    ours = host(twin(T(idx))[0])
    assert np.abs(ours - theirs).max() <= 1e-12 * np.abs(theirs).max()
    back = to_torch(twin)
    assert type(back) is type(hf) and back.config.pad_token_id == pad and back.config.num_labels == 3
    assert_same_state(back.state_dict(), hf.state_dict())


@needs_transformers
def test_sequence_classification_without_pad_token_pools_the_last_token():
    hf = gpt2(7, "GPT2ForSequenceClassification", num_labels=2)
    twin = from_torch(hf)
    assert twin.pad_id is None
    idx = np.random.default_rng(7).integers(0, 17, (1, 6))
    check("GPT2ForSequenceClassification no pad", hf, twin, idx, loss=classification_losses(np.array([1])))


@needs_transformers
def test_classifier_options_hf_cannot_hold_raise():
    with pytest.raises(ValueError, match="problem_type 'regression'"):
        from_torch(gpt2(8, "GPT2ForSequenceClassification", num_labels=1))
    with pytest.raises(ValueError, match="problem_type 'multi_label_classification'"):
        from_torch(gpt2(8, "GPT2ForSequenceClassification", num_labels=3, problem_type="multi_label_classification"))
    backbone = from_torch(gpt2(8))
    for clf, match in ((SequenceClassifier(backbone, 2), "no bias"),
                       (SequenceClassifier(backbone, 2, head_bias=False, dropout=0.1), "no dropout"),
                       (SequenceClassifier(backbone, 2, pooling="mean", head_bias=False), "pooling='last'")):
        with pytest.raises(ValueError, match=match):
            to_torch(clf)
