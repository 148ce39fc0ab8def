"""The errors of the fused ops, embedding and dropout: each message matched whole, so a wrong op
name, a wrong shape or a dropped part of the message fails. (Their forwards and gradchecks are in
tests/test_ops_fused.py.)"""

import re
import types

import numpy as np
import pytest

import npformer as nf
from npformer import backend
from tests.helpers import T

COVERED_OPS = set()                                # errors only: no op is gradient-checked here
pytestmark = pytest.mark.usefixtures("ops_path")   # every test on the reference and the fast path


def raises(kind, message):
    """pytest.raises for exactly `message` (plain text, not a pattern)."""
    return pytest.raises(kind, match=f"^{re.escape(message)}$")


@pytest.mark.parametrize("op", [nf.softmax, nf.log_softmax])
@pytest.mark.parametrize("axis", [2, -3])
def test_softmax_axis_out_of_range(op, axis):
    with raises(ValueError, f"{op.__name__}: axis {axis} is out of range for a tensor with 2 dimensions"):
        op(T(np.ones((2, 3))), axis=axis)


def test_cross_entropy_errors():
    x = T(np.ones((3, 4)))
    with raises(ValueError, "cross_entropy: logits of shape (3, 4) need target of shape (3,) (classes on axis 1); "
                            "got target of shape (4,)"):
        nf.cross_entropy(x, T(np.array([0, 1, 2, 3])))
    with raises(ValueError, "cross_entropy: logits of shape (2, 4, 5) need target of shape (2, 5) "
                            "(classes on axis 1); got target of shape (2, 4)"):
        nf.cross_entropy(T(np.ones((2, 4, 5))), T(np.zeros((2, 4), dtype=np.int64)))
    with raises(ValueError, "cross_entropy: logits of shape (4,) need target of shape () (classes on axis 1); "
                            "got target of shape (1,)"):
        nf.cross_entropy(T(np.ones(4)), T(np.array([2])))               # 1-D logits take a 0-d target
    with raises(ValueError, "cross_entropy: logits must be (C,), (N, C) or (N, C, d1, ...); got a 0-d tensor"):
        nf.cross_entropy(T(np.array(1.0)), T(np.array(0)))
    with raises(TypeError, "cross_entropy: target must hold integer class indices; got dtype float64"):
        nf.cross_entropy(x, T(np.array([0.0, 1.0, 2.0])))
    with raises(IndexError, "cross_entropy: target 4 is out of range for 4 classes"):
        nf.cross_entropy(x, T(np.array([0, 4, 1])))
    with raises(IndexError, "cross_entropy: target -3 is out of range for 4 classes"):
        nf.cross_entropy(x, T(np.array([0, -3, 1])))                    # negative, not ignore_index
    with raises(ValueError, "cross_entropy: reduction must be 'mean', 'sum' or 'none'; got 'avg'"):
        nf.cross_entropy(x, T(np.array([0, 1, 2])), reduction="avg")
    for eps in (1.5, 1.0001, -0.1):
        with raises(ValueError, f"cross_entropy: label_smoothing must be in [0, 1]; got {eps}"):
            nf.cross_entropy(x, T(np.array([0, 1, 2])), label_smoothing=eps)


def test_layer_norm_errors():
    x = T(np.ones((2, 3)))
    with raises(ValueError, "layer_norm: input of shape (2, 3) does not end with normalized_shape (4,)"):
        nf.layer_norm(x, (4,))
    with raises(ValueError, "layer_norm: input of shape (2, 3) does not end with normalized_shape ()"):
        nf.layer_norm(x, ())
    with raises(ValueError, "layer_norm: weight has shape (2,); expected normalized_shape (3,)"):
        nf.layer_norm(x, 3, weight=T(np.ones(2)))
    with raises(ValueError, "layer_norm: bias has shape (2,); expected normalized_shape (3,)"):
        nf.layer_norm(x, 3, weight=T(np.ones(3)), bias=T(np.ones(2)))
    with raises(ValueError, "layer_norm: bias has shape (3, 1); expected normalized_shape (3,)"):
        nf.layer_norm(x, 3, bias=T(np.ones((3, 1))))
    with raises(TypeError, "layer_norm: the input must be floating point; got int64 (cast it with .astype)"):
        nf.layer_norm(T(np.ones((2, 3), dtype=np.int64)), 3)


def test_embedding_errors():
    w = T(np.ones((5, 2)))
    with raises(IndexError, "embedding: index 5 is out of range for 5 rows"):
        nf.embedding(w, T(np.array([0, 5])))
    with raises(IndexError, "embedding: index -1 is out of range for 5 rows"):
        nf.embedding(w, T(np.array([-1, 0])))
    with raises(IndexError, "embedding: index 3 is out of range for 2 rows"):   # the too-large one is named,
        nf.embedding(T(np.ones((2, 5))), T(np.array([3, -1])))                # measured against rows, not columns
    with raises(TypeError, "embedding: indices must be integers; got dtype float64"):
        nf.embedding(w, T(np.array([0.0, 1.0])))
    with raises(ValueError, "embedding: weight must be 2-D (num_embeddings, embedding_dim); got shape (5,)"):
        nf.embedding(T(np.ones(5)), T(np.array([0])))


def test_dropout_p_out_of_range():
    for p in (1.5, -0.5):
        with raises(ValueError, f"dropout: p must be in [0, 1]; got {p}"):
            nf.dropout(T(np.ones(3)), p)


# ----------------------------------------------------------------------------- device mismatch

class _FakeGpuArray(np.ndarray):
    """A NumPy array the backend is told to treat as a GPU array (as in tests/test_backend.py)."""


@pytest.fixture
def gpu(monkeypatch):
    """A function making a host array look like a GPU one: the ops' device checks run on the CPU."""
    monkeypatch.setattr(backend, "_cupy", types.SimpleNamespace(ndarray=_FakeGpuArray))
    return lambda a: np.asarray(a).view(_FakeGpuArray)


def test_device_mismatch_names_the_op_and_the_operands(gpu):
    """Host arrays, not T(...): the fake GPU arrays are NumPy ones, on any device under test."""
    x, w = nf.Tensor(np.ones((2, 3))), nf.Tensor(np.ones(3))
    with raises(backend.DeviceMismatchError, "layer_norm: inputs are on different devices ((2, 3) on cpu, "
                                             "(3,) on cpu, (3,) on gpu); move them with .to(device) first"):
        nf.layer_norm(x, 3, weight=w, bias=nf.Tensor(gpu(np.ones(3))))
    with raises(backend.DeviceMismatchError, "cross_entropy: target is on cpu but logits are on gpu"):
        nf.cross_entropy(nf.Tensor(gpu(np.ones((2, 3)))), np.array([0, 2]))
    with raises(backend.DeviceMismatchError, "embedding: indices are on gpu but weight is on cpu"):
        nf.embedding(x, gpu(np.array([1, 0])))
