"""Tensor factories (npformer/creation.py) and seeded randomness (npformer/random.py)."""

import numpy as np
import pytest

import npformer as nf
from tests.helpers import DEVICE, T, host


@pytest.mark.parametrize("factory, value", [(nf.zeros, 0.0), (nf.ones, 1.0)])
def test_zeros_ones(factory, value):
    t = factory(2, 3)
    assert t.shape == (2, 3) and t.dtype == np.float32 and t.device == DEVICE and not t.requires_grad
    assert (host(t) == value).all()
    assert factory((4,)).shape == (4,) and factory([1, 2]).shape == (1, 2)
    d = factory(3, dtype=np.float64, requires_grad=True)
    assert d.dtype == np.float64 and d.requires_grad and d.is_leaf
    assert factory(2, dtype=np.int64).dtype == np.int64
    with pytest.raises(TypeError, match="int64"):
        factory(2, dtype=np.int64, requires_grad=True)


def test_full():
    t = nf.full((2, 2), 2.5)
    assert t.shape == (2, 2) and t.dtype == np.float32 and host(t).tolist() == [[2.5, 2.5], [2.5, 2.5]]
    assert nf.full([3], 7, dtype=np.int64).tolist() == [7, 7, 7]
    assert nf.full((1,), 0.1, dtype=np.float64).item() == 0.1


def test_like_factories_keep_shape_dtype_device():
    x = T(np.zeros((2, 5)))
    for f, v in ((nf.zeros_like, 0.0), (nf.ones_like, 1.0)):
        y = f(x)
        assert y.shape == (2, 5) and y.dtype == np.float64 and y.device == DEVICE and (host(y) == v).all()
    assert nf.ones_like(x, dtype=np.float32).dtype == np.float32
    assert nf.zeros_like(x, requires_grad=True).requires_grad


def test_arange():
    t = nf.arange(5)
    assert t.dtype == np.int64 and t.tolist() == [0, 1, 2, 3, 4] and t.device == DEVICE
    assert nf.arange(2, 8, 3).tolist() == [2, 5]
    f = nf.arange(0.0, 1.0, 0.25)
    assert f.dtype == np.float32 and f.tolist() == [0.0, 0.25, 0.5, 0.75]
    assert nf.arange(4, dtype=np.float64).dtype == np.float64


@pytest.mark.parametrize("factory", [nf.rand, nf.randn])
def test_random_factories_shape_dtype(factory):
    g = nf.random.Generator(0, device=DEVICE)
    t = factory(200, 50, generator=g)
    assert t.shape == (200, 50) and t.dtype == np.float32 and t.device == DEVICE
    d = factory((3, 4), dtype=np.float64, generator=g, requires_grad=True)
    assert d.shape == (3, 4) and d.dtype == np.float64 and d.requires_grad
    v = host(t).astype(np.float64)
    if factory is nf.rand:
        assert v.min() >= 0.0 and v.max() < 1.0 and abs(v.mean() - 0.5) < 0.02
    else:
        assert abs(v.mean()) < 0.03 and abs(v.std() - 1.0) < 0.03


@pytest.mark.parametrize("factory", [nf.rand, nf.randn])
def test_generator_reproducibility(factory):
    a = host(factory(4, 3, generator=nf.random.Generator(123, device=DEVICE)))
    b = host(factory(4, 3, generator=nf.random.Generator(123, device=DEVICE)))
    c = host(factory(4, 3, generator=nf.random.Generator(124, device=DEVICE)))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    g = nf.random.Generator(123, device=DEVICE)
    first, second = host(factory(4, 3, generator=g)), host(factory(4, 3, generator=g))
    np.testing.assert_array_equal(first, a)
    assert not np.array_equal(first, second)          # a generator advances


def test_manual_seed_reproducibility():
    nf.manual_seed(2024)
    a1, b1 = host(nf.randn(5)), host(nf.rand(2, 2))
    nf.manual_seed(2024)
    a2, b2 = host(nf.randn(5)), host(nf.rand(2, 2))
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(b1, b2)
    assert not np.array_equal(a1, host(nf.randn(5)))    # the global stream moves on
    nf.manual_seed(2025)
    assert not np.array_equal(a1, host(nf.randn(5)))
    assert nf.random.default_generator(DEVICE) is nf.random.default_generator(DEVICE)
    nf.manual_seed(0)
