"""What every op shares (npformer/ops/_core.py): the reference/fast registry and switch,
NPFORMER_OPS, operand coercion, the device checks and their messages, and axis normalization.

The device checks run on the CPU against a stand-in second device: backend._cupy.ndarray is the
one place npformer learns that an array lives on the GPU, so pointing it at a NumPy subclass
makes the unchanged checks of the ops see two devices (as tests/test_backend.py does for the
engine).
"""

import types

import numpy as np
import pytest

import npformer as nf
from npformer import backend
from npformer.ops import _core
from npformer.ops._core import normalize_axis, unbroadcast
from tests.helpers import T, host

COVERED_OPS = set()          # no op is gradient-checked here (tests/test_ops_registry.py)


# ----------------------------------------------------------------------------- registry and switch

@pytest.fixture
def scratch_registry():
    """The op tables as they are now, restored after the test (which may register scratch ops)."""
    tables = (_core.OPS, _core.REFERENCE, _core.FAST, _core.IMPLEMENTATION)
    saved, path = [dict(t) for t in tables], _core.current()
    yield
    for table, old in zip(tables, saved):
        table.clear()
        table.update(old)
    _core._path[0] = path


def test_register_names_the_op_after_its_function_without_trailing_underscores(scratch_registry):
    """`def abs_` may name the op "abs" without shadowing the builtin inside its module."""
    def scratch_(x):
        return ("reference", x)
    op = _core.register(scratch_)
    assert _core.OPS["scratch"] is op and _core.REFERENCE["scratch"] is scratch_
    assert "scratch_" not in _core.OPS and op.__name__ == "scratch_"      # functools.wraps
    for path in _core.PATHS:                    # no fast version: the reference on both paths
        with nf.ops.use(path):
            assert op(3) == ("reference", 3)


def test_the_switch_calls_the_fast_version_only_on_the_fast_path(scratch_registry):
    def scratch(x):
        return "reference"
    op = _core.register(scratch)

    def scratch_(x):                            # the fast version's name is stripped alike
        return "fast"
    with nf.ops.use("reference"):
        assert _core.register_fast(scratch_) is scratch_ and _core.FAST["scratch"] is scratch_
        assert op(0) == "reference"             # registering does not switch paths
        with nf.ops.use("fast"):
            assert op(0) == "fast" and _core.IMPLEMENTATION["scratch"] is scratch_
        assert op(0) == "reference"


def test_a_fast_version_registered_on_the_fast_path_is_used_at_once(scratch_registry):
    def scratch(x):
        return "reference"
    op = _core.register(scratch)

    def fast_scratch(x):
        return "fast"
    fast_scratch.__name__ = "scratch"
    with nf.ops.use("fast"):
        _core.register_fast(fast_scratch)
        assert op(0) == "fast"


def test_a_fast_version_needs_a_reference_op_of_its_name(scratch_registry):
    def no_such_op(x):
        return x
    with pytest.raises(KeyError) as info:
        _core.register_fast(no_such_op)
    assert info.value.args[0] == ("register_fast: 'no_such_op' is not an op; "
                                  "a fast version needs a reference op of that name")
    assert "no_such_op" not in _core.FAST


def test_use_refuses_an_unknown_path_naming_the_choices():
    with pytest.raises(ValueError, match=r"^npformer\.ops\.use: path must be one of "
                                         r"\('reference', 'fast'\); got 'quick'$"):
        nf.ops.use("quick")


@pytest.mark.parametrize("value, path", [(None, "fast"), ("reference", "reference"), ("fast", "fast"),
                                         (" FAST ", "fast"), ("Reference\n", "reference"),
                                         ("", "fast"), ("  ", "fast")])
def test_npformer_ops_chooses_the_path_case_and_space_insensitively(monkeypatch, value, path):
    """Unset or empty means the default, "fast"."""
    if value is None:
        monkeypatch.delenv("NPFORMER_OPS", raising=False)
    else:
        monkeypatch.setenv("NPFORMER_OPS", value)
    assert nf.ops.path_from_environment() == path


def test_npformer_ops_refuses_other_values_naming_the_variable(monkeypatch):
    monkeypatch.setenv("NPFORMER_OPS", "Quick")
    with pytest.raises(ValueError, match=r"^NPFORMER_OPS must be one of \('reference', 'fast'\); got 'quick'$"):
        nf.ops.path_from_environment()


# ----------------------------------------------------------------------------- operands

def test_ops_take_plain_numbers_and_arrays():
    """With no Tensor among the inputs, numbers become 0-d tensors (float64 or int64, as in NumPy)
    and arrays are wrapped."""
    for out, value, dtype in ((nf.add(2.0, 3.0), 5.0, np.float64), (nf.add(2, 3), 5, np.int64),
                              (nf.exp(0.0), 1.0, np.float64)):
        assert out.dtype == dtype and host(out) == value
    np.testing.assert_allclose(host(nf.exp(np.array([0.0, 1.0]))), [1.0, np.e])
    assert host(nf.neg(1.5)) == -1.5


def test_a_number_next_to_an_array_takes_the_arrays_dtype():
    """As next to a Tensor (and as NumPy does): a Python number does not promote float32."""
    x32 = np.array([1.0, 2.0], dtype=np.float32)
    for out in (nf.add(2, x32), nf.mul(x32, 2.5), nf.sub(0.5, x32), nf.add(2, T(x32))):
        assert out.dtype == np.float32
    np.testing.assert_array_equal(host(nf.sub(0.5, x32)), [-0.5, -1.5])


def test_unbroadcast_sums_added_and_stretched_axes():
    g = np.arange(24.0).reshape(2, 3, 4)
    assert unbroadcast(g, (2, 3, 4)) is g
    np.testing.assert_array_equal(unbroadcast(g, (3, 1)), g.sum(axis=(0, 2))[:, None])
    np.testing.assert_array_equal(unbroadcast(g, (4,)), g.sum(axis=(0, 1)))
    np.testing.assert_array_equal(unbroadcast(g, (1, 1, 1)), g.sum(keepdims=True))
    assert unbroadcast(g, ()).shape == () and unbroadcast(g, ()) == g.sum()


# ----------------------------------------------------------------------------- axes

def test_normalize_axis_returns_non_negative_axes():
    assert normalize_axis("sum", None, 3) == (0, 1, 2)
    assert normalize_axis("sum", -1, 3) == (2,)
    assert normalize_axis("sum", (0, -1), 2) == (0, 1)
    assert normalize_axis("sum", [-3, 2], 3) == (0, 2)


@pytest.mark.parametrize("ndim, axis", [(0, 1), (0, -2), (1, 1), (1, -2), (2, 2), (2, -3)])
def test_normalize_axis_refuses_axes_out_of_range(ndim, axis):
    with pytest.raises(ValueError, match=rf"^sum: axis {axis} is out of range for a tensor with {ndim} dimensions$"):
        normalize_axis("sum", axis, ndim)
    with pytest.raises(ValueError, match=rf"^sum: axis {axis} is out of range"):
        nf.sum(T(np.ones((2,) * ndim)), axis=axis)


def test_a_0d_tensor_takes_axis_0_and_minus_1_and_reduces_over_nothing():
    """As torch does: x.sum(0) of a 0-d x is x."""
    assert normalize_axis("sum", 0, 0) == () and normalize_axis("sum", -1, 0) == ()
    x = T(np.array(2.5), requires_grad=True)
    for axis in (0, -1):
        assert nf.sum(x, axis=axis).shape == () and host(nf.sum(x, axis=axis)) == 2.5
    assert normalize_axis("sum", 0, 1) == (0,) and normalize_axis("sum", -1, 1) == (0,)


# ----------------------------------------------------------------------------- devices

class _FakeGpuArray(np.ndarray):
    """A NumPy array the backend is told to treat as a GPU array (see fake_gpu)."""


@pytest.fixture
def fake_gpu(monkeypatch):
    """Make the backend classify _FakeGpuArray as a CuPy array; returns a function putting an array 'on the GPU'."""
    def on_gpu(a, dtype=None):
        return np.asarray(a, dtype=dtype).view(_FakeGpuArray)
    monkeypatch.setattr(backend, "_cupy", types.SimpleNamespace(ndarray=_FakeGpuArray, asarray=on_gpu))
    return on_gpu


def _pair(fake_gpu):
    rng = np.random.default_rng(3)
    c = T(rng.standard_normal((2, 3)), requires_grad=True)
    g = nf.Tensor(fake_gpu(rng.standard_normal((2, 3))), requires_grad=True)
    assert c.device == "cpu" and g.device == "gpu"
    return c, g


def test_mismatched_devices_message_lists_each_input(fake_gpu, ops_path):
    c, g = _pair(fake_gpu)
    with pytest.raises(backend.DeviceMismatchError,
                       match=r"^add: inputs are on different devices \(\(2, 3\) on cpu, \(2, 3\) on gpu\); "
                             r"move them with \.to\(device\) first$"):
        nf.add(c, g)


TWO_DEVICE_CALLS = {
    "add": lambda c, g: nf.add(c, g), "sub": lambda c, g: nf.sub(g, c), "mul": lambda c, g: nf.mul(c, g),
    "div": lambda c, g: nf.div(g, c), "pow": lambda c, g: nf.pow(c, g),
    "maximum": lambda c, g: nf.maximum(c, g), "minimum": lambda c, g: nf.minimum(g, c),
    "where": lambda c, g: nf.where(np.ones((2, 3), bool), c, g),
    "concatenate": lambda c, g: nf.concatenate([c, c, g]), "stack": lambda c, g: nf.stack([g, c]),
}


@pytest.mark.parametrize("name", sorted(TWO_DEVICE_CALLS))
def test_every_op_with_several_inputs_names_itself_on_mismatched_devices(fake_gpu, ops_path, name):
    c, g = _pair(fake_gpu)
    with pytest.raises(backend.DeviceMismatchError, match=rf"^{name}: inputs are on different devices \(.*gpu"):
        TWO_DEVICE_CALLS[name](c, g)


def test_masks_and_indices_on_another_device_are_refused_by_name(fake_gpu, ops_path):
    c, _ = _pair(fake_gpu)
    mask = fake_gpu(np.ones((2, 3), bool))
    for wrapped in (mask, nf.Tensor(mask)):     # a raw array or a Tensor
        with pytest.raises(backend.DeviceMismatchError,
                           match=r"^masked_fill: mask is on gpu but the tensor is on cpu$"):
            nf.masked_fill(c, wrapped, 0.0)
        with pytest.raises(backend.DeviceMismatchError, match=r"^where: mask is on gpu but the tensor is on cpu$"):
            nf.where(wrapped, c, c)
    index = fake_gpu(np.array([1, 0]))
    for wrapped in (index, nf.Tensor(index)):
        with pytest.raises(backend.DeviceMismatchError, match=r"^getitem: index is on gpu but the tensor is on cpu$"):
            nf.getitem(c, wrapped)
        with pytest.raises(backend.DeviceMismatchError, match=r"^getitem: index is on gpu"):
            nf.getitem(c, (slice(None), wrapped))


def test_a_number_joins_an_array_on_its_device(fake_gpu):
    """With no Tensor among the inputs a number is put where the array is (not on the CPU)."""
    g = fake_gpu(np.array([1.0, 2.0], dtype=np.float32))
    for out in (nf.add(2.0, g), nf.mul(g, 3)):
        assert out.device == "gpu" and out.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(nf.add(2.0, g).data), [3.0, 4.0])
