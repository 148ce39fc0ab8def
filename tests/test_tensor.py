"""Tensor (npformer/tensor.py): properties, conversions, tensor() dtype rules, Python operators."""

import numpy as np
import pytest

import npformer as nf
from tests.helpers import DEVICE, T, host


def _rand(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape)


# ----------------------------------------------------------------------------- properties

def test_properties_of_leaf_and_result():
    x = T(_rand(0, 2, 3), requires_grad=True)
    assert x.shape == (2, 3) and isinstance(x.shape, tuple)
    assert x.dtype == np.float64 and x.ndim == 2 and x.size == 6 and len(x) == 2
    assert x.device == DEVICE
    assert x.is_leaf and x.grad_fn is None and x.grad is None
    y = x * 2.0
    assert not y.is_leaf and y.grad_fn == "mul" and y.requires_grad
    z = T(_rand(1, 3))
    assert z.is_leaf and not z.requires_grad and (z + 1.0).grad_fn is None
    with pytest.raises(TypeError, match="0-d"):
        len(T(np.array(1.0)))


def test_item_numpy_tolist():
    x0 = _rand(2, 2, 3)
    x = T(x0)
    assert T(np.array([[3.5]])).item() == 3.5
    assert isinstance(T(np.array(7)).item(), int)
    with pytest.raises(ValueError, match=r"one-element.*\(2, 3\)"):
        x.item()
    arr = x.numpy()
    assert isinstance(arr, np.ndarray) and arr.dtype == np.float64
    np.testing.assert_array_equal(arr, x0)
    assert x.tolist() == x0.tolist()


# ----------------------------------------------------------------------------- tensor()

def test_tensor_dtype_rules():
    assert nf.tensor([1.0, 2.0]).dtype == np.float32          # Python floats -> float32
    assert nf.tensor(3.0).dtype == np.float32
    assert nf.tensor([1, 2, 3]).dtype == np.int64              # Python ints -> int64
    assert nf.tensor([True, False]).dtype == np.bool_
    assert nf.tensor(np.zeros(3)).dtype == np.float64          # float64 NumPy arrays are kept
    assert nf.tensor(np.zeros(3, dtype=np.float32)).dtype == np.float32
    assert nf.tensor(np.float64(2.0)).dtype == np.float64      # so are NumPy scalars
    assert nf.tensor([1.0], dtype=np.float64).dtype == np.float64
    assert nf.tensor(np.arange(3), dtype=np.float32).dtype == np.float32


def test_tensor_values_device_and_requires_grad():
    t = nf.tensor([[1.5, -2.0]], requires_grad=True)
    assert t.device == DEVICE and t.requires_grad and t.is_leaf
    assert host(t).tolist() == [[1.5, -2.0]]
    u = nf.tensor(T(_rand(3, 4)))                               # from a Tensor: same data, new leaf
    assert u.device == DEVICE and u.shape == (4,) and not u.requires_grad
    with pytest.raises(TypeError, match="int64"):
        nf.tensor([1, 2], requires_grad=True)


def test_to_same_device_is_identity():
    x = T(_rand(4, 3), requires_grad=True)
    assert x.to(DEVICE) is x
    c = x.to("cpu")
    assert c.device == "cpu"
    np.testing.assert_array_equal(c.numpy(), host(x))
    if DEVICE == "cpu":
        assert c is x
    with pytest.raises(ValueError, match="unknown device"):
        x.to("tpu")


# ----------------------------------------------------------------------------- operators

def test_binary_operators_match_numpy_and_gradients():
    a0, b0 = _rand(5, 3, 4), np.abs(_rand(6, 3, 4)) + 0.5
    a, b = T(a0, requires_grad=True), T(b0, requires_grad=True)
    cases = [(a + b, a0 + b0), (a - b, a0 - b0), (a * b, a0 * b0), (a / b, a0 / b0),
             (b ** a, b0 ** a0), (a @ b.T, a0 @ b0.T), (-a, -a0)]
    for got, want in cases:
        np.testing.assert_allclose(host(got), want, rtol=1e-14)
    (a * b - a / b).sum().backward()
    np.testing.assert_allclose(host(a.grad), b0 - 1 / b0, rtol=1e-14)
    np.testing.assert_allclose(host(b.grad), a0 + a0 / b0 ** 2, rtol=1e-14)


def test_reflected_operators_with_scalars():
    x0 = np.abs(_rand(7, 5)) + 0.5
    x = T(x0, requires_grad=True)
    cases = [(2.0 + x, 2.0 + x0), (2.0 - x, 2.0 - x0), (2.0 * x, 2.0 * x0), (2.0 / x, 2.0 / x0),
             (2.0 ** x, 2.0 ** x0), (x ** 2, x0 ** 2), (3 - x, 3 - x0)]
    for got, want in cases:
        assert isinstance(got, nf.Tensor) and got.dtype == np.float64
        np.testing.assert_allclose(host(got), want, rtol=1e-14)
    (2.0 / x).sum().backward()
    np.testing.assert_allclose(host(x.grad), -2.0 / x0 ** 2, rtol=1e-14)


def test_scalars_do_not_upcast_float32():
    x = T(_rand(8, 4), dtype=np.float32)
    for y in (x * 2.0, 2.0 * x, x + np.float64(1.0), np.float64(3.0) * x, x / 3, x ** 2, 1 - x):
        assert isinstance(y, nf.Tensor) and y.dtype == np.float32


def test_reflected_operators_with_arrays_on_the_left(xp):
    x0, m0 = _rand(9, 2, 3), _rand(10, 2, 3)
    x = T(x0, requires_grad=True)
    m = xp.asarray(m0)                       # an array of the device under test
    for got, want in [(m + x, m0 + x0), (m - x, m0 - x0), (m * x, m0 * x0), (m / x, m0 / x0),
                      (m @ x.T, m0 @ x0.T)]:
        assert isinstance(got, nf.Tensor), type(got)
        np.testing.assert_allclose(host(got), want, rtol=1e-14)
    (m * x).sum().backward()
    np.testing.assert_allclose(host(x.grad), m0, rtol=1e-15)


def test_indexing_and_its_gradient():
    x0 = _rand(11, 4, 3)
    x = T(x0, requires_grad=True)
    np.testing.assert_array_equal(host(x[1]), x0[1])
    np.testing.assert_array_equal(host(x[:, 1:]), x0[:, 1:])
    np.testing.assert_array_equal(host(x[-1, 2]), x0[-1, 2])
    idx = np.array([0, 2, 0])                # row 0 taken twice
    rows = x[T(idx)]
    np.testing.assert_array_equal(host(rows), x0[idx])
    rows.sum().backward()
    np.testing.assert_array_equal(host(x.grad), np.array([[2.0] * 3, [0.0] * 3, [1.0] * 3, [0.0] * 3]))
    mask = x0 > 0
    sel = T(x0, requires_grad=True)
    picked = sel[T(mask)]
    np.testing.assert_array_equal(host(picked), x0[mask])
    picked.sum().backward()
    np.testing.assert_array_equal(host(sel.grad), mask.astype(np.float64))


def test_comparisons_give_bool_tensors_without_grad():
    x0 = _rand(12, 6)
    x = T(x0, requires_grad=True)
    for got, want in [(x < 0.1, x0 < 0.1), (x <= 0.1, x0 <= 0.1), (x > 0.1, x0 > 0.1),
                      (x >= 0.1, x0 >= 0.1), (x > T(x0 * 0.5), x0 > x0 * 0.5), (~(x > 0), ~(x0 > 0))]:
        assert got.dtype == np.bool_ and not got.requires_grad and got.grad_fn is None
        np.testing.assert_array_equal(host(got), want)


def test_repr():
    x = T(np.array([[1.0, 2.0]]), requires_grad=True)
    r = repr(x)
    assert r.startswith("tensor(") and "float64" in r and "requires_grad=True" in r
    assert "grad_fn=mul" in repr(x * 2.0)
    assert "int64" in repr(T(np.arange(3)))
    assert repr(T(np.array(1.5))).startswith("tensor(1.5")
    assert ("device='gpu'" in r) == (DEVICE == "gpu")


def test_method_spellings():
    x0 = _rand(13, 2, 3, 4)
    x = T(x0)
    assert x.reshape(6, 4).shape == (6, 4) and x.reshape((4, 6)).shape == (4, 6)
    assert x.view(-1).shape == (24,)
    assert x.transpose(0, 2).shape == (4, 3, 2) and x.permute(1, 0, 2).shape == (3, 2, 4)
    assert x.T.shape == (4, 3, 2)
    assert x.float().dtype == np.float32 and x.float().double().dtype == np.float64
    np.testing.assert_allclose(host(x.sum(axis=1)), x0.sum(axis=1), rtol=1e-14)
    np.testing.assert_allclose(host(x.mean()), x0.mean(), rtol=1e-14)
    np.testing.assert_allclose(host(x.var(axis=-1)), x0.var(axis=-1, ddof=1), rtol=1e-13)
    assert [p.shape for p in x.split(2, axis=2)] == [(2, 3, 2), (2, 3, 2)]
