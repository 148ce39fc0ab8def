"""Basic layers, initialisers, the functional forms and positional encodings: values, float64
gradient checks and errors. (gradcheck_module is shared with the attention and Transformer tests.)"""

import math

import numpy as np
import pytest

import npformer as nf
from npformer import nn
from npformer.nn import functional as F
from npformer.nn import init
from tests.helpers import DEVICE, T, host

F64 = dict(dtype=np.float64, device=DEVICE)


def gradcheck_module(module, inputs, pick=lambda out: out, directions=None, **kw):
    """gradcheck of pick(module(*inputs)) w.r.t. every input that requires grad and every parameter.

    Parameters are swapped for gradcheck's own leaves for the duration of each call (a
    parameter shared by several modules is swapped in all of them).
    """
    named = list(module.named_parameters())
    slots = [[(m, n) for m in module.modules() for n, q in m._parameters.items() if q is p] for _, p in named]
    n_in = len(inputs)

    def fn(*args):
        saved = [[(m, n, m._parameters[n]) for m, n in s] for s in slots]
        for s, t in zip(slots, args[n_in:]):
            for m, n in s:
                m._parameters[n] = t
        try:
            return pick(module(*args[:n_in]))
        finally:
            for entries in saved:
                for m, n, p in entries:
                    m._parameters[n] = p

    params = [nf.Tensor(p.data.copy(), requires_grad=True) for _, p in named]
    return nf.gradcheck(fn, list(inputs) + params, directions=directions, **kw)


def rand(rng, *shape, grad=True):
    return T(rng.standard_normal(shape), requires_grad=grad)


# ----------------------------------------------------------------------------- Linear, Embedding, LayerNorm

@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_formula_and_gradchecks(bias):
    rng = np.random.default_rng(0)
    lin = nn.Linear(3, 4, bias=bias, generator=nf.random.Generator(1), **F64)
    assert host(lin.weight).shape == (4, 3) and (lin.bias is None) == (not bias)
    x = rand(rng, 2, 5, 3)
    want = host(x) @ host(lin.weight).T + (host(lin.bias) if bias else 0)
    np.testing.assert_allclose(host(lin(x)), want, rtol=1e-12)
    assert gradcheck_module(lin, [x])
    assert gradcheck_module(lin, [rand(rng, 3)])                 # a single vector


def test_linear_init_bounds_reproducibility_and_dtype():
    a = nn.Linear(16, 8, generator=nf.random.Generator(3), device=DEVICE)
    b = nn.Linear(16, 8, generator=nf.random.Generator(3), **F64)
    assert a.weight.dtype == np.float32 and b.weight.dtype == np.float64
    np.testing.assert_allclose(host(a.weight), host(b.weight), rtol=1e-6)   # same draws, then cast
    for p in (b.weight, b.bias):
        assert np.abs(host(p)).max() <= 1 / math.sqrt(16) and np.abs(host(p)).max() > 0.5 / math.sqrt(16)
    c = nn.Linear(16, 8, generator=nf.random.Generator(4), **F64)
    assert not np.allclose(host(c.weight), host(b.weight))
    with pytest.raises(ValueError, match=r"linear: input of shape \(2, 5\) does not match weight of shape \(8, 16\)"):
        b(rand(np.random.default_rng(0), 2, 5))


def test_embedding_lookup_and_gradient_with_repeated_indices():
    emb = nn.Embedding(6, 3, generator=nf.random.Generator(0), **F64)
    idx = T(np.array([[0, 5, 5], [2, 0, 1]]))
    np.testing.assert_array_equal(host(emb(idx)), host(emb.weight)[host(idx)])
    assert gradcheck_module(emb, [idx])
    assert abs(host(emb.weight).std() - 1) < 0.6                          # drawn from N(0, 1)


@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
def test_layer_norm_formula_parameters_and_gradcheck(affine, bias):
    rng = np.random.default_rng(2)
    ln = nn.LayerNorm((2, 3), eps=1e-3, elementwise_affine=affine, bias=bias, **F64)
    assert [n for n, _ in ln.named_parameters()] == (["weight"] if affine else []) + (["bias"] if bias else [])
    for p in ln.parameters():
        p.data[...] = ln.weight.xp.asarray(rng.standard_normal((2, 3)))
    x = rand(rng, 4, 2, 3)
    xh = host(x)
    mu = xh.mean(axis=(1, 2), keepdims=True)
    want = (xh - mu) / np.sqrt(((xh - mu) ** 2).mean(axis=(1, 2), keepdims=True) + 1e-3)
    if affine:
        want = want * host(ln.weight) + (host(ln.bias) if bias else 0)
    np.testing.assert_allclose(host(ln(x)), want, rtol=1e-10, atol=1e-12)
    assert gradcheck_module(ln, [x])


# ----------------------------------------------------------------------------- Dropout and activations

def test_dropout_train_eval_and_generator():
    x = T(np.ones((50, 40), np.float32))
    d = nn.Dropout(0.25, generator=nf.random.Generator(0, DEVICE))
    y = host(d(x))
    assert set(np.unique(y)) <= {0.0, np.float32(1 / 0.75)}
    assert 0.15 < (y == 0).mean() < 0.35
    again = host(nn.Dropout(0.25, generator=nf.random.Generator(0, DEVICE))(x))
    np.testing.assert_array_equal(y, again)
    d.eval()
    assert d(x) is x
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]; got 1.5"):
        nn.Dropout(1.5)
    xg = T(np.random.default_rng(0).standard_normal((5, 4)), requires_grad=True)
    out = nn.Dropout(0.5, generator=nf.random.Generator(1, DEVICE))(xg)
    out.backward(T(np.ones((5, 4))).data)
    np.testing.assert_array_equal(host(xg.grad), (host(out) != 0) * 2.0)
    # a fresh generator per call gives gradcheck the same mask every time
    assert nf.gradcheck(lambda x: nn.Dropout(0.3, generator=nf.random.Generator(5, DEVICE))(x), [xg])


def test_activations_match_their_formulas_and_gradcheck():
    erf = np.vectorize(math.erf)
    rng = np.random.default_rng(3)
    x = rand(rng, 3, 4)
    xh = host(x)
    cases = [(nn.ReLU(), np.maximum(xh, 0)), (nn.Tanh(), np.tanh(xh)), (nn.Identity(7, k=1), xh),
             (nn.GELU(), 0.5 * xh * (1 + erf(xh / math.sqrt(2)))),
             (nn.GELU("tanh"), 0.5 * xh * (1 + np.tanh(math.sqrt(2 / math.pi) * (xh + 0.044715 * xh ** 3))))]
    for mod, want in cases:
        np.testing.assert_allclose(host(mod(x)), want, rtol=1e-12, atol=1e-14)
        assert nf.gradcheck(mod, [x])                              # x is away from ReLU's kink
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'; got 'fast'"):
        nn.GELU("fast")


def test_sequential_applies_in_order_and_gradchecks():
    rng = np.random.default_rng(4)
    seq = nn.Sequential(nn.Linear(3, 5, **F64), nn.GELU(), nn.Linear(5, 2, **F64))
    x = rand(rng, 4, 3)
    np.testing.assert_allclose(host(seq(x)), host(seq[2](seq[1](seq[0](x)))), rtol=0)
    assert [n for n, _ in seq.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert gradcheck_module(seq, [x])


# ----------------------------------------------------------------------------- initialisers

def test_initialisers_fill_in_place_with_the_right_distribution():
    g = nf.random.Generator(0)
    w = nf.zeros(200, 300, dtype=np.float64, device=DEVICE)
    assert init.xavier_uniform_(w, generator=g) is w
    bound = math.sqrt(6 / (200 + 300))
    assert np.abs(host(w)).max() <= bound and abs(host(w).var() - bound ** 2 / 3) < 0.05 * bound ** 2
    init.normal_(w, mean=1.0, std=0.5, generator=g)
    assert abs(host(w).mean() - 1.0) < 0.01 and abs(host(w).std() - 0.5) < 0.01
    init.uniform_(w, -2.0, -1.0, generator=g)
    assert host(w).min() >= -2.0 and host(w).max() < -1.0
    assert (host(init.zeros_(w)) == 0).all() and (host(init.ones_(w)) == 1).all()
    assert (host(init.constant_(w, 0.5)) == 0.5).all()
    assert init.xavier_normal_(w, gain=2.0, generator=g) is w
    std = 2.0 * math.sqrt(2 / (200 + 300))
    assert abs(host(w).mean()) < 0.01 * std * 10 and abs(host(w).std() - std) < 0.01 * std
    with pytest.raises(ValueError, match=r"at least 2 dimensions; got shape \(3,\)"):
        init.xavier_uniform_(nf.zeros(3))


# ----------------------------------------------------------------------------- functional

def test_functional_names_use_torch_dim_and_delegate():
    rng = np.random.default_rng(5)
    x = rand(rng, 3, 4)
    xh = host(x)
    e = np.exp(xh - xh.max(axis=0))
    np.testing.assert_allclose(host(F.softmax(x, dim=0)), e / e.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(host(F.log_softmax(x, dim=0)), np.log(e / e.sum(axis=0)), rtol=1e-12)
    target = T(np.array([1, 3, -100]))
    lp = host(F.log_softmax(x, dim=1))
    np.testing.assert_allclose(host(F.cross_entropy(x, target)), -(lp[0, 1] + lp[1, 3]) / 2, rtol=1e-12)
    assert nf.gradcheck(lambda x: F.cross_entropy(x, target, label_smoothing=0.1, reduction="sum"), [x])
    w, b = rand(rng, 2, 4), rand(rng, 2)
    np.testing.assert_allclose(host(F.linear(x, w, b)), xh @ host(w).T + host(b), rtol=1e-12)
    assert nf.gradcheck(F.linear, [x, w, b])
    table = rand(rng, 5, 2)
    np.testing.assert_array_equal(host(F.embedding(T(np.array([4, 0])), table)), host(table)[[4, 0]])
    np.testing.assert_allclose(host(F.layer_norm(x, 4)), host(nn.LayerNorm(4, **F64)(x)), rtol=0)
    assert F.dropout(x, 0.9, training=False) is x


# ----------------------------------------------------------------------------- positional encodings

def _paper_table(max_len, d):
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)), element by element."""
    pe = np.zeros((max_len, d))
    for pos in range(max_len):
        for j in range(d):
            i2 = j - (j % 2)
            angle = pos / 10000 ** (i2 / d)
            pe[pos, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    return pe


@pytest.mark.parametrize("d_model", [6, 7])
def test_sinusoidal_table_is_the_paper_formula(d_model):
    enc = nn.SinusoidalPositionalEncoding(d_model, max_len=60, **F64)
    np.testing.assert_allclose(host(enc.pe), _paper_table(60, d_model), rtol=0, atol=1e-13)
    assert "pe" in enc.state_dict() and enc.parameters() == []
    f32 = nn.SinusoidalPositionalEncoding(d_model, max_len=60, device=DEVICE)
    assert f32.pe.dtype == np.float32


@pytest.mark.parametrize("batch_first", [True, False])
def test_sinusoidal_forward_adds_the_table_along_time(batch_first):
    rng = np.random.default_rng(6)
    enc = nn.SinusoidalPositionalEncoding(4, max_len=10, batch_first=batch_first, **F64)
    x = rand(rng, *((2, 5, 4) if batch_first else (5, 2, 4)))
    pe = host(enc.pe)[3:8]
    want = host(x) + (pe[None] if batch_first else pe[:, None])
    np.testing.assert_allclose(host(enc(x, start=3)), want, rtol=1e-14)
    assert nf.gradcheck(enc, [x])
    with pytest.raises(ValueError, match="sequence length 5 .starting at position 6. exceeds max_len 10"):
        enc(x, start=6)
    long = rand(rng, *((1, 11, 4) if batch_first else (11, 1, 4)))
    with pytest.raises(ValueError, match="sequence length 11 .* exceeds max_len 10"):
        enc(long)


@pytest.mark.parametrize("batch_first", [True, False])
def test_learned_positional_embedding(batch_first):
    rng = np.random.default_rng(7)
    pos = nn.LearnedPositionalEmbedding(8, 3, batch_first=batch_first, generator=nf.random.Generator(0), **F64)
    assert [n for n, _ in pos.named_parameters()] == ["weight"] and pos.weight.shape == (8, 3)
    x = rand(rng, *((2, 4, 3) if batch_first else (4, 2, 3)))
    w = host(pos.weight)[2:6]
    np.testing.assert_allclose(host(pos(x, start=2)), host(x) + (w[None] if batch_first else w[:, None]), rtol=0)
    assert gradcheck_module(pos, [x])
    with pytest.raises(ValueError, match="sequence length 9 .* exceeds max_len 8"):
        pos(rand(rng, *((1, 9, 3) if batch_first else (9, 1, 3))))
    with pytest.raises(ValueError, match=r"input of shape .* must end with d_model 3"):
        pos(rand(rng, 1, 2, 5))


def test_gradcheck_module_reaches_the_parameters():
    """A parameter with a wrong gradient must be caught (the swap really feeds gradcheck's leaves in)."""
    from npformer.ops._core import result

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(T(np.array([1.5, -0.5])))

        def forward(self, x):
            w = self.w
            return result(x.data * w.data, (x, w), lambda g: (g * w.data, 0.9 * g * x.data), "bad_mul")

    x = T(np.array([0.3, 2.0]))                   # x needs no grad: only the parameter is checked
    with pytest.raises(nf.GradcheckError, match="input 1"):
        gradcheck_module(Scale(), [x])
