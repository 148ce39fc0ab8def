"""The fast ops (npformer/fast) equal the reference ops (npformer/ops) in float64, and the switch.

One hypothesis property per fast op: on drawn shapes, masks, dropout seeds, frozen inputs and
tuning parameters (causal blocks of 1-5 rows, GELU pieces of 1-7 elements, so that blocking
happens on small shapes), the output and every input's gradient of the fast version equal the
reference's to 1e-12 (a dropout generator of one seed draws the same mask on both paths).
"""

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import npformer as nf
from npformer import backend, fast
from npformer.ops import FAST, REFERENCE
from tests.helpers import DEVICE, T, host
from tests.strategies import arrays, shapes

TOL = dict(rtol=1e-12, atol=1e-12)
TESTED = {"attention", "self_attention", "gelu", "layer_norm", "embedding", "matmul", "linear"}


def assert_fast_equals_reference(reference, fast_fn, inputs, frozen=()):
    """Run `reference` under use("reference") and `fast_fn` under use("fast") on float64 `inputs`
    (the i-th frozen when i in `frozen`); back-propagate one cotangent; compare output and gradients."""
    results = []
    for path, fn in (("reference", reference), ("fast", fast_fn)):
        with nf.ops.use(path):
            ts = [T(a, requires_grad=i not in frozen) for i, a in enumerate(inputs)]
            out = fn(*ts)
            if any(t.requires_grad for t in ts):
                out.backward(T(np.random.default_rng(0).standard_normal(out.shape)).data)
            results.append([host(out)] + [None if t.grad is None else host(t.grad) for t in ts])
    for i, (a, b) in enumerate(zip(*results)):
        what = "output" if i == 0 else f"gradient of input {i - 1}"
        if a is None or b is None:
            assert a is None and b is None, f"{what}: one path gave no gradient"
        else:
            assert b.shape == a.shape and b.dtype == a.dtype, what
            np.testing.assert_allclose(b, a, err_msg=what, **TOL)


def test_every_fast_op_is_tested_here():
    assert set(FAST) == TESTED, f"fast ops without a property here, or gone: {sorted(set(FAST) ^ TESTED)}"


# ----------------------------------------------------------------------------- attention

@st.composite
def attention_cases(draw):
    """(q, k, v shapes with broadcast batch axes, a bool mask broadcasting to the scores, the shape of an
    additive bias (an input, so its gradient is compared too) or None, causal)."""
    L, S, E, Ev = (draw(st.integers(1, 6)) for _ in range(4))
    batch = draw(st.sampled_from([(), (2,), (2, 1), (1, 2)]))
    kv_batch = draw(st.sampled_from([batch, batch[-1:], (1,) * len(batch)]))
    kind = draw(st.sampled_from(["none", "bool", "bias", "bool+bias", "causal", "self-causal", "causal+bias"]))
    if kind in ("self-causal", "causal+bias"):      # L == S, equal batch axes: the blocked path (not with a bias)
        S, kv_batch = L, batch
    shapes_ = [(L, S), (S,), (1, S), (L, 1), (2, L, S), (1, 1, L, S), batch + (1, S)]
    mask = bias = None
    if "bool" in kind:
        mask = draw(hnp.arrays(bool, draw(st.sampled_from(shapes_))))
    if "bias" in kind:
        bias = draw(st.sampled_from(shapes_))
    return batch + (L, E), kv_batch + (S, E), kv_batch + (S, Ev), mask, bias, "causal" in kind


@given(case=attention_cases(), scale=st.sampled_from([1.0, 0.3]), dropout_p=st.sampled_from([0.0, 0.0, 0.4]),
       seed=st.integers(0, 2 ** 16), block=st.integers(1, 5), frozen=st.sets(st.integers(0, 3), max_size=3),
       data=st.data())
def test_attention(case, scale, dropout_p, seed, block, frozen, data):
    """Output and the gradients of q, k, v and of an additive bias (drawn with -inf entries) to 1e-12."""
    sq, sk, sv, mask, bias_shape, causal = case
    inputs = [data.draw(arrays(s), label=n) for s, n in ((sq, "q"), (sk, "k"), (sv, "v"))]
    if bias_shape is not None:
        inputs.append(data.draw(hnp.arrays(np.float64, bias_shape, elements=st.sampled_from(
            [0.0, -1.0, 0.5, 2.25, -np.inf])), label="bias"))
    m = None if mask is None else T(mask).data
    kw = dict(scale=scale, dropout_p=dropout_p, causal=causal)
    assert_fast_equals_reference(
        lambda a, b, c, *bias: nf.attention(a, b, c, m, generator=nf.random.Generator(seed, DEVICE),
                                            bias=bias[0] if bias else None, **kw),
        lambda a, b, c, *bias: fast.attention(a, b, c, m, generator=nf.random.Generator(seed, DEVICE),
                                              bias=bias[0] if bias else None, causal_block=block, **kw),
        inputs, frozen)


@given(T_=st.integers(1, 11), n_head=st.integers(1, 3), D=st.integers(1, 3), batch=st.sampled_from([(), (2,), (2, 1)]),
       causal=st.booleans(), dropout_p=st.sampled_from([0.0, 0.0, 0.3]), seed=st.integers(0, 2 ** 16),
       block=st.integers(1, 5), data=st.data())
def test_self_attention(T_, n_head, D, batch, causal, dropout_p, seed, block, data):
    x = data.draw(arrays(batch + (T_, 3 * n_head * D)), label="qkv")
    kw = dict(causal=causal, dropout_p=dropout_p)
    assert_fast_equals_reference(
        lambda t: nf.self_attention(t, n_head, generator=nf.random.Generator(seed, DEVICE), **kw),
        lambda t: fast.self_attention(t, n_head, generator=nf.random.Generator(seed, DEVICE), causal_block=block,
                                      **kw),
        [x])


def test_causal_block_chooses_the_blocked_path(monkeypatch):
    """The property above reaches the blocks: self-attention of >= 2 blocks takes them, fewer rows do not."""
    module = sys.modules["npformer.fast.attention"]
    taken = []
    blocks_forward = module._blocks_forward
    monkeypatch.setattr(module, "_blocks_forward", lambda *a: taken.append(a[-1]) or blocks_forward(*a))
    x = T(np.random.default_rng(0).standard_normal((7, 3)))
    for block in (2, 3, 4):
        fast.self_attention(nf.concatenate([x, x, x], axis=1), 1, causal=True, causal_block=block)
        fast.attention(x, x, x, causal=True, causal_block=block)
    assert taken == [2, 2, 3, 3] and fast.CAUSAL_BLOCK == 64


# ----------------------------------------------------------------------------- gelu

@given(x=arrays(shapes(max_dims=3, max_side=5), "wide"), approximate=st.sampled_from(["none", "tanh"]),
       chunk=st.integers(1, 7))
def test_gelu(x, approximate, chunk):
    assert_fast_equals_reference(lambda t: nf.gelu(t, approximate=approximate),
                                 lambda t: fast.gelu(t, approximate=approximate, chunk=chunk), [x])


@given(data=st.data(), chunk=st.integers(1, 7), approximate=st.sampled_from(["none", "tanh"]),
       dtype=st.sampled_from([np.float64, np.float32]))
def test_gelu_in_pieces_is_bitwise_the_whole_computation(data, chunk, approximate, dtype):
    """Any piece size gives the same bits as one piece: each element's arithmetic is the same."""
    x = data.draw(arrays(shapes(max_dims=3, max_side=5), "wide"), label="x").astype(dtype)
    g = np.random.default_rng(0).standard_normal(x.shape).astype(dtype)
    results = []
    for size in (chunk, 10 ** 9):
        t = T(x, requires_grad=True)
        out = fast.gelu(t, approximate=approximate, chunk=size)
        out.backward(T(g).data)
        results.append((host(out), host(t.grad)))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- layer_norm, embedding

@given(data=st.data(), k=st.integers(1, 2), weight=st.booleans(), bias=st.booleans(),
       frozen=st.sets(st.integers(0, 2), max_size=2))
def test_layer_norm(data, k, weight, bias, frozen):
    x = data.draw(arrays(shapes(min_dims=k, max_dims=3, max_side=4)), label="x")
    ns = x.shape[x.ndim - k:]
    params = [data.draw(arrays(ns), label=n) for n, on in (("weight", weight), ("bias", bias)) if on]

    def call(op):
        def fn(a, *p):
            w = p[0] if weight else None
            b = p[-1] if bias else None
            return op(a, ns, w, b, eps=1e-5)
        return fn
    assert_fast_equals_reference(call(nf.layer_norm), call(fast.layer_norm), [x] + params, frozen)


@given(V=st.integers(1, 5), D=st.integers(1, 3), data=st.data())
def test_embedding(V, D, data):
    idx = data.draw(hnp.arrays(np.int64, shapes(max_dims=3, max_side=4), elements=st.integers(0, V - 1)), label="idx")
    weight = data.draw(arrays((V, D)), label="weight")
    assert_fast_equals_reference(lambda w: nf.embedding(w, T(idx)), lambda w: fast.embedding(w, T(idx)), [weight])


@given(rows=st.integers(1, 7), tail=st.sampled_from([(), (1,), (3,), (2, 3)]),
       index_shape=st.sampled_from([(0,), (5,), (12,), (3, 4)]), dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 2 ** 16))
def test_scatter_add_rows_equals_add_at_bit_for_bit(rows, tail, index_shape, dtype, seed):
    """The fast embedding backward's 1-D scatter adds in np.add.at's order."""
    rng = np.random.default_rng(seed)
    index = rng.integers(0, rows, index_shape)
    values = rng.standard_normal(index_shape + tail).astype(dtype)
    start = rng.standard_normal((rows,) + tail).astype(dtype)
    mine, reference = start.copy(), start.copy()
    backend.scatter_add_rows(mine, index, values)
    np.add.at(reference, index, values)
    np.testing.assert_array_equal(mine, reference)


# ----------------------------------------------------------------------------- matmul, linear

MATMUL_SHAPES = [((3, 4), (4, 5)), ((4,), (4, 5)), ((3, 4), (4,)), ((2, 3, 4), (4, 5)), ((2, 1, 3, 4), (4, 2)),
                 ((2, 1, 3, 4), (5, 4, 2)), ((4,), (2, 4, 3)), ((2, 3, 4), (4,))]


@given(shapes_=st.sampled_from(MATMUL_SHAPES), frozen=st.sets(st.integers(0, 1), max_size=1), data=st.data())
def test_matmul(shapes_, frozen, data):
    a, b = (data.draw(arrays(s), label=n) for s, n in zip(shapes_, "ab"))
    assert_fast_equals_reference(nf.matmul, fast.matmul, [a, b], frozen)


@given(lead=hnp.array_shapes(min_dims=0, max_dims=3, max_side=3), n_in=st.integers(1, 3), n_out=st.integers(1, 3),
       bias=st.booleans(), frozen=st.sets(st.integers(0, 2), max_size=2), data=st.data())
def test_linear(lead, n_in, n_out, bias, frozen, data):
    inputs = [data.draw(arrays(s), label=n) for s, n in ((lead + (n_in,), "x"), ((n_out, n_in), "w"))]
    inputs += [data.draw(arrays((n_out,)), label="b")] if bias else []
    assert_fast_equals_reference(nf.linear, fast.linear, inputs, frozen)


# ----------------------------------------------------------------------------- the switch

def test_use_as_a_context_manager_restores_and_as_a_call_sets():
    start = nf.ops.current()                       # "fast", or what NPFORMER_OPS chose
    with nf.ops.use("reference"):
        assert nf.ops.current() == "reference"
        assert nf.ops.IMPLEMENTATION["attention"] is REFERENCE["attention"]
        with nf.ops.use("fast"):
            assert nf.ops.current() == "fast" and nf.ops.IMPLEMENTATION["attention"] is FAST["attention"]
        assert nf.ops.current() == "reference"
    assert nf.ops.current() == start
    try:
        nf.ops.use("reference")
        assert nf.ops.current() == "reference" and nf.ops.IMPLEMENTATION["gelu"] is REFERENCE["gelu"]
        nf.ops.use("fast")
        assert nf.ops.current() == "fast" and nf.ops.IMPLEMENTATION["gelu"] is FAST["gelu"]
    finally:
        nf.ops.use(start)


def test_an_op_without_a_fast_version_runs_its_reference_on_both_paths():
    assert "softmax" not in FAST
    for path in ("reference", "fast"):
        with nf.ops.use(path):
            assert nf.ops.IMPLEMENTATION["softmax"] is REFERENCE["softmax"]


def test_unknown_path_is_refused_and_changes_nothing():
    with pytest.raises(ValueError, match=r"use: path must be one of \('reference', 'fast'\); got 'quick'"):
        nf.ops.use("quick")
    assert nf.ops.current() == nf.ops.path_from_environment()


@pytest.mark.parametrize("value, expected", [("reference", "reference"), ("fast", "fast"), ("", "fast")])
def test_the_environment_variable_chooses_at_import(value, expected):
    code = "import npformer as nf; print(nf.ops.current(), nf.ops.IMPLEMENTATION['gelu'].__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "NPFORMER_OPS": value}).stdout.split()
    assert out == [expected, "npformer.fast.activations" if expected == "fast" else "npformer.ops.activations"]


def test_both_paths_promote_dtypes_alike_and_refuse_integer_layer_norm():
    """The fast linear added its bias in place (keeping x's dtype) and fast causal attention took
    its output dtype from q and v only; both now follow the reference's promotion."""
    r = np.random.default_rng(0)
    x32, w32, b64 = (r.standard_normal(s).astype(d) for s, d in (((3, 4), np.float32), ((5, 4), np.float32),
                                                                ((5,), np.float64)))
    q32, k64, v32 = (r.standard_normal((1, 130, 4)).astype(d) for d in (np.float32, np.float64, np.float32))
    for path in ("reference", "fast"):
        with nf.ops.use(path):
            assert nf.linear(nf.tensor(x32), nf.tensor(w32), nf.tensor(b64)).dtype == np.float64, path
            assert nf.attention(nf.tensor(q32), nf.tensor(k64), nf.tensor(v32), causal=True).dtype == np.float64, path
            with pytest.raises(TypeError, match="layer_norm: the input must be floating point; got int64"):
                nf.layer_norm(nf.tensor(np.ones((3, 4), dtype=np.int64)), 4)
