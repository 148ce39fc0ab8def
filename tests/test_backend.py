"""The array backend (npformer/backend.py): devices, array modules, erf, scatter-add, generators,
device-mismatch errors, and the CuPy guard: a scan of npformer's source that checks every array
function, array method and keyword it uses exists in CuPy (runs on the CPU; needs cupy importable).
"""

import math
import types

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import npformer as nf
from npformer import backend
from tests.cupy_guard import cupy_problems, parameters, scan_package, scan_source
from tests.helpers import DEVICE, T, host

GPU = backend.gpu_available()
NO_GPU_REASON = f"needs a GPU: {backend.gpu_unavailable_reason()}"


# ----------------------------------------------------------------------------- devices

@pytest.mark.parametrize("value, expected", [(None, "cpu"), ("cpu", "cpu"), (" CPU ", "cpu"), ("", "cpu")])
def test_default_device_reads_environment(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("NPFORMER_DEVICE", raising=False)
    else:
        monkeypatch.setenv("NPFORMER_DEVICE", value)
    assert backend.default_device() == expected


@pytest.mark.parametrize("name", ["tpu", "cuda", "cpu0"])
def test_unknown_device_lists_valid_ones(monkeypatch, name):
    monkeypatch.setenv("NPFORMER_DEVICE", name)
    for call in (backend.default_device, lambda: backend.check_device(name), lambda: backend.xp_for(name)):
        with pytest.raises(ValueError, match=rf"{name!r}.*'cpu', 'gpu'"):
            call()


def test_gpu_request_without_gpu_says_why(monkeypatch):
    if GPU:
        pytest.skip("a GPU is available here, so requesting it succeeds (checked below)")
    monkeypatch.setenv("NPFORMER_DEVICE", "gpu")
    reason = backend.gpu_unavailable_reason()
    assert "CuPy" in reason
    with pytest.raises(RuntimeError, match="device 'gpu' requested but") as info:
        backend.default_device()
    assert reason in str(info.value)
    with pytest.raises(RuntimeError, match="requested but"):
        nf.zeros(2, device="gpu")


@pytest.mark.skipif(not GPU, reason=NO_GPU_REASON)
def test_gpu_request_with_gpu(monkeypatch):
    monkeypatch.setenv("NPFORMER_DEVICE", "gpu")
    assert backend.default_device() == "gpu" and backend.gpu_unavailable_reason() == "a GPU is available"
    assert nf.tensor([1.0]).device == "gpu"


def test_array_module_and_device_of(xp):
    a = xp.zeros(3)
    assert backend.get_array_module(a) is xp
    assert backend.get_array_module(a, a) is xp
    assert backend.get_array_module() is np and backend.get_array_module(1.0, [2]) is np
    assert backend.get_array_module(T(np.ones(2)).data) is xp and T(np.ones(2)).xp is xp
    assert backend.device_of(a) == DEVICE and backend.device_of(np.zeros(1)) == "cpu"
    assert backend.is_array(a) and backend.is_array(np.zeros(1))
    assert not backend.is_array([1.0]) and not backend.is_array(T(np.ones(1)))
    assert backend.xp_for("cpu") is np


def test_transfers_on_cpu():
    a = np.arange(4.0)
    assert backend.to_device(a, "cpu") is a and backend.to_numpy(a) is a


@pytest.mark.skipif(not GPU, reason=NO_GPU_REASON)
def test_transfers_round_trip_through_gpu():
    a = np.random.default_rng(0).standard_normal((3, 2))
    g = backend.to_device(a, "gpu")
    assert backend.device_of(g) == "gpu" and backend.to_device(g, "gpu") is g
    np.testing.assert_array_equal(backend.to_numpy(g), a)
    np.testing.assert_array_equal(backend.to_device(g, "cpu"), a)


# ----------------------------------------------------------------------------- device mismatch

@pytest.mark.skipif(not GPU, reason=NO_GPU_REASON)
def test_device_mismatch_on_real_gpu():
    c = nf.Tensor(np.ones((2, 3)))
    g = nf.Tensor(backend.to_device(np.ones((2, 3)), "gpu"))
    with pytest.raises(backend.DeviceMismatchError, match=r"add:.*cpu.*gpu"):
        c + g
    with pytest.raises(backend.DeviceMismatchError, match=r"matmul:.*gpu.*cpu"):
        g @ c.T
    with pytest.raises(backend.DeviceMismatchError):
        backend.get_array_module(c.data, g.data)


class _FakeGpuArray(np.ndarray):
    """A NumPy array the backend is told to treat as a GPU array (see fake_gpu)."""


@pytest.fixture
def fake_gpu(monkeypatch):
    """Make the backend classify _FakeGpuArray as a CuPy array, without a GPU.

    backend._cupy.ndarray is the single place where npformer learns which
    device an array is on; pointing it at a NumPy subclass lets the CPU run the
    unchanged device checks of the ops and the engine.
    """
    monkeypatch.setattr(backend, "_cupy", types.SimpleNamespace(ndarray=_FakeGpuArray))
    return lambda a: np.asarray(a, dtype=np.asarray(a).dtype).view(_FakeGpuArray)


def test_device_mismatch_checked_without_gpu(fake_gpu):
    rng = np.random.default_rng(1)
    c = nf.Tensor(rng.standard_normal((2, 3)), requires_grad=True)
    g = nf.Tensor(fake_gpu(rng.standard_normal((2, 3))))
    assert c.device == "cpu" and g.device == "gpu"
    with pytest.raises(backend.DeviceMismatchError, match=r"arrays on different devices"):
        backend.get_array_module(c.data, g.data)
    cases = {
        "add": lambda: c + g, "mul": lambda: g * c, "sub": lambda: c - g, "div": lambda: c / g,
        "matmul": lambda: c @ g.T, "maximum": lambda: nf.maximum(c, g),
        "concatenate": lambda: nf.concatenate([c, g]), "stack": lambda: nf.stack([g, c]),
        "where": lambda: nf.where(np.ones((2, 3), bool), c, g),
        "layer_norm": lambda: nf.layer_norm(c, 3, weight=nf.Tensor(fake_gpu(np.ones(3)))),
    }
    for op, call in cases.items():
        with pytest.raises(backend.DeviceMismatchError, match=rf"^{op}: .*on cpu.*on gpu|^{op}: .*on gpu.*on cpu"):
            call()
    # non-Tensor operands (indices, targets, masks, the backward grad) are checked too
    with pytest.raises(backend.DeviceMismatchError, match="cross_entropy: target is on gpu but logits are on cpu"):
        nf.cross_entropy(c, fake_gpu(np.array([0, 2])))
    with pytest.raises(backend.DeviceMismatchError, match="embedding: indices are on gpu but weight is on cpu"):
        nf.embedding(c, fake_gpu(np.array([1, 0])))
    with pytest.raises(backend.DeviceMismatchError, match="getitem: index is on gpu"):
        c[fake_gpu(np.array([1, 0]))]
    with pytest.raises(backend.DeviceMismatchError, match="masked_fill: mask is on gpu"):
        nf.masked_fill(c, fake_gpu(np.zeros((2, 3), bool)), 0.0)
    with pytest.raises(backend.DeviceMismatchError, match="backward: grad is on gpu but the tensor is on cpu"):
        (c * 2.0).backward(fake_gpu(np.ones((2, 3))))


# ----------------------------------------------------------------------------- erf

_ERF_POINTS = np.concatenate([np.linspace(-8.0, 8.0, 16001),
                              [0.0, 1e-300, -1e-12, 1e-6, 2.9999999, 3.0, -3.0000001, 5.5, 27.0, -40.0]])


def test_erf_float64_accuracy(xp):
    x = _ERF_POINTS
    got = host(backend.erf(xp.asarray(x)))
    want = np.array([math.erf(v) for v in x])
    assert got.dtype == np.float64
    assert np.max(np.abs(got - want)) <= 1e-14
    small = np.abs(x) < 1.0
    assert np.max(np.abs(got[small] - want[small]) / np.maximum(np.abs(want[small]), 1e-300)) <= 1e-13


def test_erf_float32_accuracy(xp):
    x = _ERF_POINTS.astype(np.float32)
    arr = xp.asarray(x)
    got = backend.erf(arr)
    assert got.dtype == np.float32
    want = np.array([math.erf(float(v)) for v in x])
    assert np.max(np.abs(host(got).astype(np.float64) - want)) <= 1e-6
    np.testing.assert_array_equal(host(arr), x)        # the input is left alone


# ----------------------------------------------------------------------------- scatter-add, generators

def test_scatter_add_repeated_indices(xp):
    target = xp.zeros(5)
    backend.scatter_add(target, xp.asarray([0, 2, 2, 4, 2]), xp.asarray([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert host(target).tolist() == [1.0, 0.0, 10.0, 0.0, 4.0]
    rows = xp.ones((3, 2))                              # rows of a 2-D target, row 1 hit twice
    backend.scatter_add(rows, xp.asarray([1, 1, 0]), xp.asarray([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    assert host(rows).tolist() == [[6.0, 7.0], [5.0, 7.0], [1.0, 1.0]]


@given(rows=st.integers(1, 7), tail=st.sampled_from([(), (1,), (3,), (2, 3)]), n=st.integers(0, 12),
       dtype=st.sampled_from([np.float32, np.float64]), negative=st.booleans(), seed=st.integers(0, 2**16))
def test_scatter_add_rows_on_the_cpu_equals_add_at_bit_for_bit(rows, tail, n, dtype, negative, seed):
    # the fast embedding backward's rows, picked by a 1-D index, go through a flattened 1-D
    # np.add.at; it must add in np.add.at's order
    rng = np.random.default_rng(seed)
    index = rng.integers(-rows if negative else 0, rows, n)
    values = rng.standard_normal((n,) + tail).astype(dtype)
    start = rng.standard_normal((rows,) + tail).astype(dtype)
    mine, reference = start.copy(), start.copy()
    backend.scatter_add_rows(mine, index, values)
    np.add.at(reference, index, values)
    np.testing.assert_array_equal(mine, reference)


def test_scatter_add_out_of_range_rows_raise():
    with pytest.raises(IndexError):
        backend.scatter_add(np.zeros((3, 2)), np.array([0, 3]), np.ones((2, 2)))


def test_seeded_generators_reproduce():
    a, b, c = (backend.default_rng(s, DEVICE) for s in (7, 7, 8))
    assert backend.rng_device(a) == DEVICE
    draws = [host(r.standard_normal((4,), dtype=np.float64)) for r in (a, b, c)]
    np.testing.assert_array_equal(draws[0], draws[1])
    assert not np.array_equal(draws[0], draws[2])
    u = host(a.random((1000,), dtype=np.float32))
    assert u.dtype == np.float32 and 0.0 <= u.min() and u.max() < 1.0
    np.testing.assert_array_equal(u, host(b.random((1000,), dtype=np.float32)))


# ----------------------------------------------------------------------------- the CuPy guard
# (the scanner lives in tests/cupy_guard.py)

@pytest.fixture
def cupy_module():
    return pytest.importorskip("cupy", reason="the CuPy guard needs cupy importable (no GPU needed)")


def test_npformer_array_code_exists_in_cupy(cupy_module):
    uses = scan_package()
    names = {(u.kind, u.name) for u in uses}
    for expected in [("module", "asarray"), ("module", "zeros"), ("module", "exp"), ("module", "where"),
                     ("module", "random.default_rng"), ("cupyx", "scatter_add"), ("method", "reshape"),
                     ("method", "sum"), ("method", "astype"), ("method", "swapaxes"), ("generator", "random")]:
        assert expected in names, f"the scanner no longer sees {expected}"
    assert any(u.name == "asarray" and "dtype" in u.keywords for u in uses)
    assert any(u.kind == "method" and u.name == "sum" and "keepdims" in u.keywords for u in uses)
    problems = cupy_problems(uses)
    assert problems == [], "npformer uses array API that CuPy lacks:\n" + "\n".join(problems)


def test_generator_and_cupyx_functions_exist(cupy_module):
    import cupyx
    import cupyx.scipy.special
    assert callable(cupyx.scatter_add) and callable(cupyx.scipy.special.erf)
    for name in ("random", "standard_normal"):
        assert "dtype" in parameters(getattr(cupy_module.random.Generator, name))[0]
    assert callable(cupy_module.random.default_rng)


_FAKE_SOURCE = '''
import numpy as np
def op(a, b, x):
    xp = a.xp
    y = xp.some_numpy_only_function(a.data)        # not in cupy
    z = xp.asarray(b, device="cpu")                # numpy-only keyword of a real function
    with xp.errstate(over="ignore"):               # numpy-only context manager
        w = a.xp.exp(x, where=True)                # ufunc keyword cupy rejects
    ok = xp.zeros((2, 3), dtype=xp.float32)        # fine
    s = (y * 2).sum(axis=0, where=True)            # method keyword cupy lacks
    a.data.resize((3,))                            # method cupy lacks
    def backward(g):
        return g.reshape(a.shape).getfield(np.float32)   # method cupy lacks
    rng = default_generator("cpu")
    rng.random((2,), dtype=np.float32, method="fast")    # generator keyword cupy lacks
    return np.errstate, s.tolist(), backward       # numpy itself is not checked
def host_side():
    rng = np.random.default_rng(0)                 # a NumPy generator: not checked
    return rng.permutation(3)
def host_param(rng: np.random.Generator):
    return rng.choice(3)                           # annotated as a NumPy generator: not checked
def device_param(rng):
    return rng.shuffle(3)                          # a device generator: checked (cupy lacks shuffle)
'''


def test_guard_catches_numpy_only_usage(cupy_module):
    uses = scan_source(_FAKE_SOURCE, "fake.py")
    problems = "\n".join(cupy_problems(uses))
    for expected in ["fake.py:5: xp.some_numpy_only_function", "xp.asarray(device=)", "xp.errstate",
                     "xp.exp(where=)", "array.sum(where=)", "array.resize", "array.getfield",
                     "generator.random(method=)", "generator.shuffle"]:
        assert expected in problems, (expected, problems)
    assert "zeros" not in problems and "float32" not in problems and "tolist" not in problems
    assert "np.errstate" not in problems and "permutation" not in problems and "choice" not in problems
    assert len(problems.splitlines()) == 9, problems


def test_elementwise_pieces_cover_the_array_once():
    assert backend.elementwise_pieces(10, "cpu", 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert backend.elementwise_pieces(10, "gpu", 4) == [slice(0, 10)]
    assert backend.elementwise_pieces(0, "cpu", 4) == []
