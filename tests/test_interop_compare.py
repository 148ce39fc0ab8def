"""npformer.interop.compare: from_torch pairs agree at 1e-10 through AdamW steps; planted bugs (a
changed weight, GELU tanh for erf, a parameter or gradient on one side only) are reported under the
right name and fail assert_close; the report covers every kind and reads as a table; the caller's
modules are left exactly as they were; outputs of any nesting are flattened alike on both sides.
"""

import numpy as np
import pytest

import npformer as nf
from npformer import nn
from npformer.interop import compare, from_torch, load_torch_state_dict
from npformer.interop.comparison import KINDS, Report
from tests.helpers import host
from tests.torch_compare import one_torch_thread

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.verify
ADAMW = ("AdamW", {"lr": 1e-2, "weight_decay": 0.1})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_torch_thread():
        yield


def encoder_layer(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(d_model=8, nhead=2, dim_feedforward=12, dropout=0.0, activation="gelu")
    return torch.nn.TransformerEncoderLayer(**{**args, **kw})


def inputs(seed=0, shape=(5, 2, 8)):
    """x (T, B, D) float32 (compare makes float64 copies) and a causal mask (True = masked out)."""
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return x, np.triu(np.ones((shape[0], shape[0]), bool), 1)


# ----------------------------------------------------------------------------- agreement

@pytest.mark.parametrize("norm_first", [False, True])
def test_from_torch_encoder_layer_agrees_through_two_adamw_steps(norm_first):
    layer = encoder_layer(norm_first=norm_first)
    x, causal = inputs()
    report = compare(layer, from_torch(layer), x, kwargs=dict(src_mask=causal), steps=2, optimizer=ADAMW)
    report.assert_close(rtol=1e-10)
    names = [n for n, _ in layer.named_parameters()]
    assert {e.kind for e in report} == set(KINDS)
    for kind in ("weight", "grad", "updated"):
        assert [e.name for e in report.select(kind)] == names
    assert [e.name for e in report.select("input_grad")] == ["inputs[0]"]         # the mask is not floating
    assert [e.name for e in report.select("output")] == ["output"]
    assert all(e.rel < 1e-12 for e in report.select("grad") if e.scale > 1e-12)
    assert max(e.rel for e in report.select("updated")) > 0                      # the steps changed something


def test_multihead_attention_pair_compares_both_outputs():
    torch.manual_seed(3)
    mha = torch.nn.MultiheadAttention(6, 3, batch_first=True, kdim=4, vdim=5)
    rng = np.random.default_rng(3)
    q, k, v = rng.standard_normal((2, 4, 6)), rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 5))
    pad = np.array([[False, False, True], [False, False, False]])
    # npformer's need_weights defaults to False, torch's to True: torch's weights have no counterpart
    (missing,) = compare(mha, from_torch(mha), q, k, v).failures()
    assert (missing.name, missing.note) == ("output[1]", "the twin has no such output")
    report = compare(mha, from_torch(mha), q, k, v, kwargs=dict(key_padding_mask=pad, need_weights=True), steps=1,
                     optimizer=("SGD", {"lr": 0.1, "momentum": 0.9}))
    report.assert_close(rtol=1e-10)
    assert [e.name for e in report.select("output")] == ["output[0]", "output[1]"]   # (attn_output, weights)
    assert [e.name for e in report.select("input_grad")] == ["inputs[0]", "inputs[1]", "inputs[2]"]


def test_callers_modules_are_left_as_they_were():
    layer = encoder_layer(1)
    twin = from_torch(layer)                                          # float32 both
    layer.linear1.weight.grad = torch.ones_like(layer.linear1.weight)
    twin.linear1.weight.grad = twin.linear1.weight.xp.full(twin.linear1.weight.shape, 2.0, np.float32)
    t_before = {k: v.clone() for k, v in layer.state_dict().items()}
    n_before = {k: host(v) for k, v in twin.state_dict().items()}
    compare(layer, twin, *inputs(1)[:1], steps=2, optimizer=ADAMW).assert_close()
    assert all(torch.equal(layer.state_dict()[k], v) and v.dtype == torch.float32 for k, v in t_before.items())
    assert all(np.array_equal(host(twin.state_dict()[k]), v) and v.dtype == np.float32 for k, v in n_before.items())
    assert torch.equal(layer.linear1.weight.grad, torch.ones_like(layer.linear1.weight))
    assert layer.linear2.weight.grad is None and twin.linear2.weight.grad is None
    np.testing.assert_array_equal(host(twin.linear1.weight.grad), 2.0)


# ----------------------------------------------------------------------------- planted bugs

def test_a_weight_changed_by_1e_7_is_named_first():
    layer = encoder_layer(2)
    twin = from_torch(layer, dtype=np.float64)
    twin.linear2.bias.data[3] += 1e-7
    report = compare(layer, twin, *inputs(2)[:1])
    bad = report.select("weight", "linear2.bias")[0]
    assert bad.abs == pytest.approx(1e-7, rel=1e-6)
    assert [e.name for e in report.select("weight") if e.abs > 0] == ["linear2.bias"]
    with pytest.raises(AssertionError, match=r"first to differ .*\n  weight linear2.bias \(8,\): abs 1.00e-07"):
        report.assert_close()


def test_gelu_tanh_instead_of_erf_shows_in_outputs_and_gradients():
    layer = encoder_layer(4)
    twin = from_torch(layer)
    twin.activation = nn.GELU(approximate="tanh")                     # the planted bug
    report = compare(layer, twin, *inputs(4)[:1])
    assert max(e.abs for e in report.select("weight")) == 0.0
    assert 1e-6 < report.select("output")[0].rel < 1e-2               # small, and far above rounding
    assert report.worst(1, "grad")[0].rel > 1e-6
    with pytest.raises(AssertionError, match=r"first to differ .*\n  output output \(5, 2, 8\)"):
        report.assert_close()


def test_a_parameter_on_one_side_only_is_reported_not_skipped():
    torch.manual_seed(5)
    lin = torch.nn.Linear(3, 2)
    with nf.default_dtype(np.float64):
        twin = nn.Linear(3, 2, bias=False)
    twin.weight.data[...] = twin.weight.xp.asarray(lin.weight.detach().numpy())
    report = compare(lin, twin, np.ones((4, 3)))
    (weight,) = [e for e in report.select("weight") if e.name == "bias"]
    assert weight.abs == np.inf and "the twin has no parameter bias" in weight.note
    assert "the twin has no parameter bias" in report.select("grad", "bias")[0].note
    with pytest.raises(AssertionError, match="weight bias"):
        report.assert_close()
    # the other way round: a parameter of the twin that no torch parameter maps to
    with nf.default_dtype(np.float64):
        twin2 = nn.Linear(3, 2)
    twin2.load_state_dict({k: v.detach().numpy() for k, v in lin.state_dict().items()})
    lin_nobias = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        lin_nobias.weight.copy_(lin.weight)
    report = compare(lin_nobias, twin2, np.ones((4, 3)))
    assert [e.note for e in report.select("weight", "bias")] == ["twin only: no torch parameter maps to it"]
    assert [e.note for e in report.select("grad", "bias")] == ["twin only: no torch parameter maps to it"]


def test_a_gradient_on_one_side_only_is_reported():
    layer = encoder_layer(6)
    twin = from_torch(layer)
    twin.norm2.bias.requires_grad = False
    report = compare(layer, twin, *inputs(6)[:1])
    (entry,) = report.select("grad", "norm2.bias")
    assert entry.abs == np.inf and entry.note == "the twin has no gradient for it"
    assert [e.name for e in report.failures()] == ["norm2.bias"]


# ----------------------------------------------------------------------------- outputs, losses, optimizers

class TorchNest(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)

    def forward(self, x, ids):
        y = self.lin(x)
        return {"a": y, "none": None, "b": (y * 2, None, ids, [y.sum()])}


class TwinNest(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2, dtype=np.float64)

    def forward(self, x, ids):
        y = self.lin(x)
        return {"a": y, "none": None, "b": (y * 2, None, nf.tensor(ids), [y.sum()])}


def test_nested_outputs_are_flattened_alike_and_integer_inputs_pass_through():
    torch.manual_seed(7)
    ours, theirs = TorchNest(), TwinNest()
    theirs.load_state_dict({k: v.numpy() for k, v in ours.state_dict().items()})
    ids = np.array([[1, 2]])
    report = compare(ours, theirs, np.random.default_rng(7).standard_normal((2, 3)), ids)
    report.assert_close()
    assert [e.name for e in report.select("output")] == ["output.a", "output.b[0]", "output.b[3][0]"]
    assert [e.name for e in report.select("input_grad")] == ["inputs[0]"]          # ids: no gradient


def test_hf_model_outputs_are_flattened_by_field():
    modeling_outputs = pytest.importorskip("transformers.modeling_outputs")

    class HF(TorchNest):
        def forward(self, x, ids):
            return modeling_outputs.BaseModelOutput(last_hidden_state=self.lin(x), hidden_states=None)

    class Plain(TwinNest):
        def forward(self, x, ids):
            return (self.lin(x),)
    torch.manual_seed(8)
    ours, theirs = HF(), Plain()
    theirs.load_state_dict({k: v.numpy() for k, v in ours.state_dict().items()})
    report = compare(ours, theirs, np.ones((2, 3)), None)
    report.assert_close()
    assert [e.name for e in report.select("output")] == ["output.last_hidden_state"]


def test_a_given_loss_and_optimizer_factories():
    layer = encoder_layer(8)
    losses = (lambda y: (y ** 2).mean(), lambda y: (y ** 2).mean())
    factories = (lambda ps: torch.optim.SGD(ps, lr=0.5), lambda ps: nf.optim.SGD(ps, lr=0.5))
    report = compare(layer, from_torch(layer), *inputs(8)[:1], loss=losses, steps=3, optimizer=factories)
    report.assert_close(rtol=1e-10)
    assert "the given loss" in report.title and "3 optimizer steps" in report.title
    one = compare(layer, from_torch(layer), *inputs(8)[:1], loss=lambda y: (y ** 2).mean())
    assert one.select("loss")[0].scale == pytest.approx(report.select("loss")[0].scale)


def test_an_optimizer_missing_on_one_side_is_refused_naming_those_both_have():
    layer = encoder_layer(9)
    with pytest.raises(ValueError, match=r"'LBFGS' is not one both .*\['Adam', 'AdamW', 'SGD'\]"):
        compare(layer, from_torch(layer), *inputs(9)[:1], steps=1, optimizer=("LBFGS", {}))
    with pytest.raises(ValueError, match="steps must be an int >= 0; got -1"):
        compare(layer, from_torch(layer), *inputs(9)[:1], steps=-1)


def test_active_dropout_warns():
    layer = encoder_layer(10, dropout=0.2)
    with pytest.warns(UserWarning, match="dropout"):
        compare(layer, from_torch(layer), *inputs(10)[:1])


# ----------------------------------------------------------------------------- the report itself

def test_report_reads_as_a_table_and_as_data():
    layer = encoder_layer(11)
    report = compare(layer, from_torch(layer), *inputs(11)[:1])
    assert isinstance(report, Report) and len(report) == len(list(report))
    text = str(report).splitlines()
    assert text[0].startswith("compare TransformerEncoderLayer (torch) with TransformerEncoderLayer (npformer)")
    assert text[1].split() == ["kind", "name", "shape", "max|torch|", "abs", "rel"]
    assert any(line.startswith("grad") and "linear1.weight" in line for line in text)
    e = report.select("grad", "linear1.weight")[0]
    assert (e.kind, e.name, e.shape) == ("grad", "linear1.weight", (12, 8))
    assert e.rel == pytest.approx(e.abs / e.scale) and e.abs < 1e-14
    assert [x.kind for x in report.worst(3)] and len(report.worst(3)) == 3
    with pytest.raises(ValueError, match="kind must be one of"):
        report.select("grads")
    with pytest.raises(ValueError, match="tolerance kinds"):
        report.assert_close(atol={"grads": 1.0})
    # per-kind tolerances: only the updated entries' atol changes
    assert report.failures(atol={"grad": 0.0}, rtol=0.0) and not report.failures(atol=1.0)


def test_a_module_that_calls_its_submodules_through_a_closure():
    """minGPT keeps `self.mlpf = lambda x: ...` over its own submodules: a deep copy of such a module
    would still compute with the original's weights, so compare runs the caller's module itself
    (in float64) and puts every parameter, gradient and dtype back afterwards."""
    class Closure(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.act = torch.nn.Linear(3, 3), torch.nn.Tanh()
            self.f = lambda x: self.act(self.lin(x))

        def forward(self, x):
            return self.f(x)

    torch.manual_seed(0)
    m = Closure()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with nf.default_dtype(np.float64):
        twin = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    load_torch_state_dict(twin, m, rename={"lin": "0"}, cast=True)
    x = np.random.default_rng(0).standard_normal((2, 3))
    report = compare(m, twin, x, steps=1, optimizer=ADAMW).assert_close()
    assert {e.kind for e in report} >= {"output", "input_grad", "grad", "updated"}
    assert all(torch.equal(m.state_dict()[k], v) and v.dtype == torch.float32 for k, v in before.items())
    assert m.lin.weight.grad is None
