"""What attention and self_attention refuse, and the exact words they refuse it with.

Each message is pinned whole (anchored at both ends): it names the op, the shapes or the value
at fault and what was expected, so a wrong shape, a dropped argument or a garbled word in any
of them fails here. Inputs on two devices are refused by name too; on a CPU-only machine the
second device is a NumPy array the backend is told to take for a CuPy one (it is refused
before any arithmetic, so nothing ever computes on it). Every test runs on both op paths.
"""

import re
import types

import numpy as np
import pytest

import npformer as nf
from npformer import backend
from tests.helpers import DEVICE, T

COVERED_OPS = set()                      # errors only; the gradcheck runs are in test_ops_attention.py
pytestmark = pytest.mark.usefixtures("ops_path")
FIT = "(query (..., L, E), key (..., S, E), value (..., S, Ev)) do not fit together"


def exactly(message):
    """A pytest.raises match= pattern for this whole message and nothing else."""
    return "^" + re.escape(message) + "$"


def ones(*shape, dtype=np.float64):
    return T(np.ones(shape, dtype=dtype))


# ----------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("sq, sk, sv", [
    ((4,), (5, 4), (5, 2)),            # q has no query axis
    ((3, 4), (4,), (5, 2)),            # k has no key axis
    ((3, 4), (5, 4), (5,)),            # v has no key axis
    ((3, 4), (5, 3), (5, 2)),          # q and k disagree on E
    ((3, 4), (5, 4), (6, 2)),          # k and v disagree on S
])
def test_q_k_v_that_do_not_fit_are_refused_with_their_shapes(sq, sk, sv):
    with pytest.raises(ValueError, match=exactly(f"attention: shapes {sq} and {sk} and {sv} {FIT}")):
        nf.attention(ones(*sq), ones(*sk), ones(*sv))


def test_batch_axes_that_do_not_broadcast_are_refused_with_the_three_shapes():
    with pytest.raises(ValueError, match=exactly("attention: shapes (2, 3, 4) and (3, 5, 4) and (3, 5, 2) "
                                                 "have batch axes that do not broadcast")):
        nf.attention(ones(2, 3, 4), ones(3, 5, 4), ones(3, 5, 2))


@pytest.mark.parametrize("batched", ["q", "k", "v"])
def test_a_mask_or_bias_that_does_not_broadcast_is_refused_with_the_scores_shape(batched):
    """The scores (..., L, S) in the message take their batch axes from q, k and v alike."""
    qkv = {name: (2,) * (name == batched) + shape for name, shape in (("q", (3, 4)), ("k", (5, 4)), ("v", (5, 2)))}
    q, k, v = (ones(*qkv[name]) for name in "qkv")
    with pytest.raises(ValueError, match=exactly("attention: mask of shape (3, 4) does not broadcast with the "
                                                 "scores (..., L, S) = (2, 3, 5)")):
        nf.attention(q, k, v, T(np.ones((3, 4), bool)).data)
    with pytest.raises(ValueError, match=exactly("attention: bias of shape (4, 5) does not broadcast with the "
                                                 "scores (..., L, S) = (2, 3, 5)")):
        nf.attention(q, k, v, bias=ones(4, 5))


# ----------------------------------------------------------------------------- mask, bias, causal, dropout

def test_masks_and_biases_of_the_wrong_kind_are_refused():
    x = ones(2, 3, 4)
    with pytest.raises(TypeError, match=exactly("attention: mask must be bool (True = attend) or floating point "
                                                "(added to the scores); got dtype int64")):
        nf.attention(x, x, x, T(np.ones((3, 3), np.int64)).data)
    with pytest.raises(TypeError, match=exactly("attention: bias must be floating point; got dtype int64")):
        nf.attention(x, x, x, bias=T(np.ones((3, 3), np.int64)).data)
    with pytest.raises(ValueError, match=exactly("attention: a floating-point mask is a bias (added to the "
                                                 "scores); pass it or bias=, not both")):
        nf.attention(x, x, x, ones(3, 3), bias=ones(3, 3))


def test_causal_with_a_bool_mask_is_refused():
    x = ones(3, 2)
    with pytest.raises(ValueError, match=exactly("attention: causal=True cannot be combined with a mask")):
        nf.attention(x, x, x, T(np.tri(3, 3, dtype=bool)).data, causal=True)


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_a_dropout_p_outside_0_1_is_refused(p):
    """Not a scaling by 1 / (1 - p) of a nonsense probability."""
    message = exactly(f"attention: dropout_p must be in [0, 1]; got {p}")
    with pytest.raises(ValueError, match=message):
        nf.attention(ones(3, 2), ones(3, 2), ones(3, 2), dropout_p=p)
    with pytest.raises(ValueError, match=message):
        nf.self_attention(ones(3, 6), 2, dropout_p=p)


# ----------------------------------------------------------------------------- self_attention

@pytest.mark.parametrize("n_head", [0, -1, 2.0, True, "2"])
def test_self_attention_needs_a_positive_int_n_head(n_head):
    with pytest.raises(ValueError, match=exactly(f"self_attention: n_head must be a positive int; got {n_head!r}")):
        nf.self_attention(ones(4, 12), n_head)


@pytest.mark.parametrize("shape, why", [((4, 10), "not a multiple of 3"), ((4, 9), "a multiple of 3, not of 6"),
                                        ((4, 3), "fewer than 3 * n_head columns"), ((12,), "no T axis")])
def test_self_attention_refuses_packed_projections_that_do_not_split_into_heads(shape, why):
    with pytest.raises(ValueError, match=exactly(f"self_attention: qkv of shape {shape} must be (..., T, 3 * E) with E "
                                                 "a multiple of n_head = 2, so its last axis a multiple of 6")):
        nf.self_attention(ones(*shape), 2)


# ----------------------------------------------------------------------------- devices

class _ArrayElsewhere(np.ndarray):
    """A NumPy array the backend is told to take for a CuPy (GPU) one; see `elsewhere`."""


@pytest.fixture
def elsewhere(monkeypatch):
    """(put, device): put(array) is that array on `device`, the device the tests do not run on."""
    if DEVICE == "gpu":
        return np.asarray, "cpu"
    monkeypatch.setattr(backend, "_cupy", types.SimpleNamespace(ndarray=_ArrayElsewhere))
    return (lambda a: np.asarray(a).view(_ArrayElsewhere)), "gpu"


def test_q_k_v_on_two_devices_are_refused_with_each_device(elsewhere):
    put, there = elsewhere
    k = nf.Tensor(put(np.ones((5, 4))))
    with pytest.raises(backend.DeviceMismatchError,
                       match=exactly(f"attention: inputs are on different devices ((3, 4) on {DEVICE}, (5, 4) on "
                                     f"{there}, (5, 2) on {DEVICE}); move them with .to(device) first")):
        nf.attention(ones(3, 4), k, ones(5, 2))


def test_a_mask_or_bias_on_another_device_is_refused_by_name(elsewhere):
    put, there = elsewhere
    x = ones(3, 4)
    for mask in (put(np.ones((3, 3), bool)), put(np.zeros((3, 3)))):      # a bool mask, a float mask
        with pytest.raises(backend.DeviceMismatchError,
                           match=exactly(f"attention: mask is on {there} but q is on {DEVICE}")):
            nf.attention(x, x, x, mask)
    for bias in (put(np.zeros((3, 3))), nf.Tensor(put(np.zeros((3, 3))), requires_grad=True)):
        with pytest.raises(backend.DeviceMismatchError,
                           match=exactly(f"attention: bias is on {there} but q is on {DEVICE}")):
            nf.attention(x, x, x, bias=bias)
