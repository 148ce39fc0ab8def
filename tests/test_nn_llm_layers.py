"""The LLM building blocks of npformer.nn: RMSNorm and SiLU (nn/layers.py), F.rms_norm and F.silu
(nn/functional.py) and GatedFeedForward (nn/feedforward.py): parameters, formulas, float64 gradient
checks, errors; parity with torch.nn.RMSNorm (eps=None included), torch.nn.functional.silu and
transformers' LlamaMLP, outputs and every gradient, to 1e-10 in float64; from_torch / to_torch.
(The ops' own gradient checks are in tests/test_ops_rms_norm.py.)
"""

import math
import re

import numpy as np
import pytest

import npformer as nf
from npformer import nn
from npformer.nn import functional as F
from tests.helpers import DEVICE, T, host
from tests.test_nn_layers import F64, gradcheck_module

EPS64 = np.finfo(np.float64).eps


def randomise(module, seed):
    """Every parameter of an npformer module drawn from N(0, 0.25), seeded."""
    rng = np.random.default_rng(seed)
    for p in module.parameters():
        p.data[...] = p.xp.asarray(rng.standard_normal(p.shape) * 0.5)
    return module


def rms_norm_ref(x, k, weight=None, eps=EPS64):
    axes = tuple(range(x.ndim - k, x.ndim))
    y = x / np.sqrt((x * x).mean(axis=axes, keepdims=True) + eps)
    return y if weight is None else y * weight


def silu_ref(x):
    return x / (1.0 + np.exp(-x))


def gelu_ref(x):
    return x * 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def gelu_tanh_ref(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


# ----------------------------------------------------------------------------- RMSNorm, SiLU, F

@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm_layer_parameters_repr_formula_and_gradcheck(affine):
    norm = nn.RMSNorm((2, 3), eps=1e-3, elementwise_affine=affine, **F64)
    assert [n for n, _ in norm.named_parameters()] == (["weight"] if affine else [])
    assert norm.normalized_shape == (2, 3) and norm.eps == 1e-3
    assert repr(norm) == f"RMSNorm((2, 3), eps=0.001, elementwise_affine={affine})"
    if affine:
        assert norm.weight.dtype == np.float64 and norm.weight.shape == (2, 3)
        np.testing.assert_array_equal(host(norm.weight), np.ones((2, 3)))      # ones, as torch
        randomise(norm, 1)
    rng = np.random.default_rng(2)
    x = T(rng.standard_normal((4, 2, 3)), requires_grad=True)
    w = host(norm.weight) if affine else None
    np.testing.assert_allclose(host(norm(x)), rms_norm_ref(host(x), 2, w, 1e-3), rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(host(norm(x)), host(F.rms_norm(x, (2, 3), norm.weight, 1e-3)))
    assert gradcheck_module(norm, [x], rtol=1e-6, atol=1e-8)


def test_rms_norm_layer_defaults():
    """eps=None (the dtype's epsilon), elementwise_affine=True, an int normalized_shape, the default dtype."""
    norm = nn.RMSNorm(4)
    assert norm.normalized_shape == (4,) and norm.eps is None and norm.elementwise_affine
    assert norm.weight.dtype == nf.get_default_dtype()
    assert repr(norm) == "RMSNorm((4,), eps=None, elementwise_affine=True)"
    x = np.array([[1e-8, -2e-8, 3e-8, 0.5e-8]])             # mean(x^2) ~ 3.6e-16: the eps shows
    got = host(nn.RMSNorm(4, **F64)(T(x)))
    np.testing.assert_allclose(got, rms_norm_ref(x, 1, eps=EPS64), rtol=1e-13)
    assert not np.allclose(got, rms_norm_ref(x, 1, eps=0.0), rtol=1e-3)


def test_silu_module_and_functional():
    x = T(np.linspace(-6.0, 6.0, 13).reshape(13, 1), requires_grad=True)
    np.testing.assert_allclose(host(nn.SiLU()(x)), silu_ref(host(x)), rtol=1e-14, atol=1e-15)
    np.testing.assert_array_equal(host(F.silu(x)), host(nn.SiLU()(x)))
    assert repr(nn.SiLU()) == "SiLU()" and not list(nn.SiLU().parameters())
    assert gradcheck_module(nn.SiLU(), [x], rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- GatedFeedForward

ACT_REFS = {"silu": silu_ref, "gelu": gelu_ref, "gelu_tanh": gelu_tanh_ref}


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("bias", [False, True])
def test_gated_feed_forward_parameters_formula_and_gradcheck(activation, bias):
    ff = nn.GatedFeedForward(4, 6, activation=activation, bias=bias, generator=nf.random.Generator(0, DEVICE), **F64)
    names = [n for n, _ in ff.named_parameters()]
    expected = ["gate_proj.weight", "up_proj.weight", "down_proj.weight"]
    if bias:
        expected = ["gate_proj.weight", "gate_proj.bias", "up_proj.weight", "up_proj.bias", "down_proj.weight",
                    "down_proj.bias"]
    assert names == expected                                  # LLaMA's names, in LlamaMLP's order
    shapes = dict((n, p.shape) for n, p in ff.named_parameters())
    assert shapes["gate_proj.weight"] == shapes["up_proj.weight"] == (6, 4) and shapes["down_proj.weight"] == (4, 6)
    randomise(ff, 3)
    rng = np.random.default_rng(4)
    x = T(rng.standard_normal((2, 3, 4)), requires_grad=True)
    p = {n: host(q) for n, q in ff.named_parameters()}

    def lin(v, name):
        return v @ p[f"{name}.weight"].T + (p[f"{name}.bias"] if bias else 0.0)
    act = ACT_REFS[activation]
    want = lin(act(lin(host(x), "gate_proj")) * lin(host(x), "up_proj"), "down_proj")
    out = ff(x)
    assert out.shape == (2, 3, 4)
    np.testing.assert_allclose(host(out), want, rtol=1e-12, atol=1e-12)
    assert gradcheck_module(ff, [x], rtol=1e-6, atol=1e-8)


def test_gated_feed_forward_construction():
    """generator= makes the weights reproducible (torch.nn.Linear's init); dtype and device carried;
    a bad activation names the layer, the value and the allowed ones."""
    make = lambda seed, **kw: nn.GatedFeedForward(3, 5, generator=nf.random.Generator(seed, DEVICE), **kw)  # noqa: E731
    a, b, c = make(7), make(7), make(8)
    for (n, p), (_, q), (_, r) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        np.testing.assert_array_equal(host(p), host(q))
        assert not np.array_equal(host(p), host(r)), n
        bound = 1.0 / np.sqrt(p.shape[1])
        assert np.abs(host(p)).max() <= bound
    assert a.gate_proj.weight.dtype == nf.get_default_dtype()
    assert make(0, dtype=np.float64).down_proj.weight.dtype == np.float64
    assert make(0, device=DEVICE).up_proj.weight.device == DEVICE
    assert repr(make(0, activation="gelu_tanh")).startswith(
        "GatedFeedForward(hidden_size=3, intermediate_size=5, activation='gelu_tanh'\n  (gate_proj): Linear(")
    with pytest.raises(ValueError, match=re.escape("GatedFeedForward: activation must be one of 'silu', 'gelu', "
                                                   "'gelu_tanh'; got 'swiglu'")):
        nn.GatedFeedForward(3, 5, activation="swiglu")


def test_llm_layers_errors_name_the_op_and_the_shapes():
    with pytest.raises(ValueError, match=re.escape("rms_norm: input of shape (2, 5) does not end with "
                                                   "normalized_shape (4,)")):
        nn.RMSNorm(4, **F64)(T(np.ones((2, 5))))
    with pytest.raises(ValueError, match=re.escape("GatedFeedForward: input of shape (2, 5) must end with "
                                                   "hidden_size 4")):
        nn.GatedFeedForward(4, 6, **F64)(T(np.ones((2, 5))))
    with pytest.raises(ValueError, match=re.escape("GatedFeedForward: input of shape () must end with hidden_size 4")):
        nn.GatedFeedForward(4, 6, **F64)(T(np.array(1.0)))


# ----------------------------------------------------------------------------- parity with torch

@pytest.fixture
def torch():
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                 # tiny ops: threads contending for 2 cores only slow them down
    yield torch
    torch.set_num_threads(threads)


def close(ours, theirs, what):
    """float64 parity: every element within 1e-10 relative, or 1e-10 of the largest |torch| value."""
    a, b = host(ours), theirs.detach().numpy()
    assert a.shape == b.shape, f"{what}: shape {a.shape} vs torch {b.shape}"
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10 * np.abs(b).max(), err_msg=what)


def backward_both(ours_out, theirs_out, torch, seed):
    """Backward of both outputs with the same random upstream gradient."""
    g = np.random.default_rng(seed).standard_normal(ours_out.shape)
    ours_out.backward(T(g).data)
    theirs_out.backward(torch.tensor(g))


@pytest.mark.verify
def test_silu_matches_torch(torch):
    x = np.random.default_rng(10).standard_normal((3, 5)) * 4
    x[0, :3] = [-40.0, 0.0, 40.0]
    ours, theirs = T(x.T, requires_grad=True), torch.tensor(x.T, requires_grad=True)    # a transposed view
    out, want = nn.SiLU()(ours), torch.nn.SiLU()(theirs)
    close(out, want, "silu")
    close(F.silu(ours), torch.nn.functional.silu(theirs), "F.silu")
    backward_both(out, want, torch, 11)
    close(ours.grad, theirs.grad, "silu input gradient")


@pytest.mark.verify
@pytest.mark.parametrize("eps", [None, 1e-6, 1e-2])
@pytest.mark.parametrize("normalized_shape", [5, (3, 5)])
@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm_matches_torch(torch, eps, normalized_shape, affine):
    """torch.nn.RMSNorm with copied weights: the output and the input and weight gradients. One row is
    of size 1e-8, where eps=None's 2.2e-16 changes the result (a wrong default eps shows)."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 3, 5))
    x[0] *= 1e-8
    ours = nn.RMSNorm(normalized_shape, eps=eps, elementwise_affine=affine, **F64)
    theirs = torch.nn.RMSNorm(normalized_shape, eps=eps, elementwise_affine=affine, dtype=torch.float64)
    if affine:
        randomise(ours, 13)
        theirs.load_state_dict({"weight": torch.tensor(host(ours.weight))})
    xs = np.asfortranarray(x)                                                  # non-contiguous input
    a, b = T(xs, requires_grad=True), torch.tensor(x, requires_grad=True)
    out, want = ours(a), theirs(b)
    close(out, want, "RMSNorm output")
    close(F.rms_norm(a, normalized_shape, ours.weight, eps), torch.nn.functional.rms_norm(
        b, (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape, theirs.weight, eps),
        "F.rms_norm output")
    backward_both(out, want, torch, 14)
    close(a.grad, b.grad, "RMSNorm input gradient")
    if affine:
        close(ours.weight.grad, theirs.weight.grad, "RMSNorm weight gradient")


LLAMA_ACTS = [("silu", "silu"), ("gelu", "gelu"), ("gelu_tanh", "gelu_pytorch_tanh")]


@pytest.mark.verify
@pytest.mark.parametrize("activation, hidden_act", LLAMA_ACTS)
@pytest.mark.parametrize("bias", [False, True])
def test_gated_feed_forward_matches_llama_mlp(torch, activation, hidden_act, bias):
    """transformers' LlamaMLP loads our state dict as it is (same names and shapes) and computes the same
    output and the same gradients of the input and of every weight."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP
    config = LlamaConfig(hidden_size=6, intermediate_size=10, num_attention_heads=2, num_key_value_heads=2,
                         hidden_act=hidden_act, mlp_bias=bias)
    theirs = LlamaMLP(config).double()
    ours = randomise(nn.GatedFeedForward(6, 10, activation=activation, bias=bias, **F64), 20)
    theirs.load_state_dict({k: torch.tensor(host(v)) for k, v in ours.state_dict().items()}, strict=True)
    x = np.random.default_rng(21).standard_normal((2, 4, 6)) * 2
    a, b = T(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    out, want = ours(a), theirs(b)
    close(out, want, f"GatedFeedForward({activation}) output")
    backward_both(out, want, torch, 22)
    close(a.grad, b.grad, "input gradient")
    grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        close(p.grad, grads[name].grad, f"{name} gradient")


# ----------------------------------------------------------------------------- from_torch / to_torch

@pytest.mark.verify
@pytest.mark.parametrize("eps", [None, 1e-5])
@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm_and_silu_twins(torch, eps, affine):
    """from_torch of a Sequential(Linear, SiLU, RMSNorm) builds npformer's, carrying eps (None too) and
    elementwise_affine, and computes what it computes; to_torch gives back the same classes, options
    and weights, bit for bit."""
    from npformer.interop import SUPPORTED, from_torch, to_torch
    assert {"RMSNorm", "SiLU"} <= set(SUPPORTED)
    torch.manual_seed(0)
    src = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.SiLU(),
                              torch.nn.RMSNorm(6, eps=eps, elementwise_affine=affine)).double()
    if affine:
        with torch.no_grad():
            src[2].weight.copy_(torch.randn(6, dtype=torch.float64))
    twin = from_torch(src)
    assert type(twin[1]) is nn.SiLU and type(twin[2]) is nn.RMSNorm
    assert twin[2].eps == eps and twin[2].elementwise_affine == affine and twin[2].normalized_shape == (6,)
    x = np.random.default_rng(30).standard_normal((3, 4))
    close(twin(T(x)), src(torch.tensor(x)), "Sequential(Linear, SiLU, RMSNorm) output")
    back = to_torch(twin)
    assert type(back[1]) is torch.nn.SiLU and type(back[2]) is torch.nn.RMSNorm
    assert back[2].eps == eps and back[2].elementwise_affine == affine and tuple(back[2].normalized_shape) == (6,)
    for (k, v), (k2, w) in zip(src.state_dict().items(), back.state_dict().items()):
        assert k == k2 and v.dtype == w.dtype and torch.equal(v, w)
    ours = nn.RMSNorm((2, 3), eps=1e-4, **F64)
    randomise(ours, 31)
    exported = to_torch(ours)
    assert exported.eps == 1e-4 and tuple(exported.normalized_shape) == (2, 3)
    np.testing.assert_array_equal(exported.weight.detach().numpy(), host(ours.weight))
