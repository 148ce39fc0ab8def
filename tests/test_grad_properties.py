"""Properties every op in npformer.ops.OPS must have, over drawn valid calls of it.

OP_CASES (tests/op_cases.py) maps each op name to a strategy that draws one call of the op on
float64 inputs (an OpCase); test_every_op_has_a_case fails when an op has none, so a new op must
be added there. For every op, and the wrong line each property catches:

- the forward and the backward leave their inputs, constants (masks, indices) and incoming
  gradient unchanged, and a leaf's .grad is its own array (a backward or an engine that
  writes in place, e.g. ``g *= mask``); the result records the op's name as its grad_fn;
- the backward gives the same input gradients, to 1e-12, for an upstream gradient that is
  transposed, reversed (negative strides), strided, or a stride-0 broadcast view as for a
  contiguous copy (a backward that assumes a contiguous gradient, e.g. one that reshapes it
  through ``.data`` or ``ravel`` of a view, or writes into it);
- float64 central differences agree with rtol=1e-6, atol=1e-8 (a 1e-4 relative error in a
  backward; gradcheck's own torch defaults, rtol=1e-3, let it through);
- with only some inputs requiring grad, each subset still gradchecks and the others get no
  .grad (a backward that reads the wrong ``needs(...)`` flag or mixes up its outputs).
"""

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import npformer as nf
from npformer import backend
from npformer.ops import OPS
from tests.helpers import DEVICE, T, host
from tests.op_cases import OP_CASES, OP_PATHS

TIGHT = dict(rtol=1e-6, atol=1e-8)     # sees a 1e-4 relative error; central differences stay well inside

# The op name a result records (its grad_fn), where it is not the op's own name.
GRAD_FN = {"split": {"getitem"}, "transpose": {"transpose", "reshape"}, "dropout": {"dropout", "mul_const", None},
           "self_attention": {"self_attention", "reshape"}}     # the reference merges the heads with reshape

# Ops whose case can draw two or more differentiable inputs: each subset of them is gradchecked alone.
MULTI_INPUT = {"add", "sub", "mul", "div", "pow", "maximum", "minimum", "where", "matmul", "linear",
               "layer_norm", "rms_norm", "concatenate", "stack", "attention"}


# ----------------------------------------------------------------------------- helpers

def _outputs(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _backward(outs, grads):
    """Tensor.backward of every output that requires grad, each with its own gradient array."""
    for o, g in zip(outs, grads):
        if o.requires_grad:
            o.backward(g, retain_graph=True)


def _upstream(outs, seed=0):
    """A contiguous, writeable gradient array on the device for each output."""
    rng = np.random.default_rng(seed)
    xp = backend.xp_for(DEVICE)
    return [xp.asarray(rng.standard_normal(o.shape)) for o in outs]


def _layouts(g):
    """(name, view) pairs of non-contiguous arrays of g's shape: the first three hold g's values,
    the broadcasts (stride 0) repeat g's first row or one number."""
    xp = backend.get_array_module(g)
    out = []
    if g.ndim >= 2:
        out.append(("transposed", xp.ascontiguousarray(g.T).T))
    if g.ndim >= 1:
        out.append(("reversed", xp.flip(xp.flip(g).copy())))
        wide = xp.zeros(g.shape[:-1] + (2 * g.shape[-1],), dtype=g.dtype)
        wide[..., ::2] = g
        out.append(("strided", wide[..., ::2]))
        out.append(("broadcast row", xp.broadcast_to(g[:1], g.shape)))
    out.append(("broadcast scalar", xp.broadcast_to(xp.asarray(0.75, dtype=g.dtype), g.shape)))
    return out


def _drawn(data, name):
    """A drawn case of op `name` and a leaf tensor that requires grad for each of its arrays."""
    case = data.draw(OP_CASES[name], label="case")
    return case, [T(a, requires_grad=True) for a in case.arrays]


def _grads_with(case, grads):
    """Input gradients (host arrays, None where none came) after backward with `grads`."""
    inputs = [T(a, requires_grad=True) for a in case.arrays]
    _backward(_outputs(case.fn(*inputs)), grads)
    return [None if t.grad is None else host(t.grad) for t in inputs]


# ----------------------------------------------------------------------------- properties

def test_every_op_has_a_case():
    missing = sorted(set(OPS) - set(OP_CASES))
    assert not missing, f"ops with no entry in OP_CASES (tests/op_cases.py): {missing}"
    unknown = sorted(set(OP_CASES) - set(OPS))
    assert not unknown, f"OP_CASES names that are not ops: {unknown}"


@pytest.mark.parametrize("name, path", OP_PATHS)
@given(data=st.data())
def test_forward_and_backward_leave_inputs_and_gradient_unchanged(name, path, data):
    with nf.ops.use(path):
        case, inputs = _drawn(data, name)
        before = [host(t).copy() for t in inputs]
        consts = [c.copy() for c in case.consts]
        outs = _outputs(case.fn(*inputs))
        for t, b in zip(inputs, before):
            np.testing.assert_array_equal(host(t), b, err_msg=f"{name}: the forward changed an input")
        for o in outs:
            assert o.grad_fn in GRAD_FN.get(name, {name}), f"{name}: the result records grad_fn {o.grad_fn!r}"
        grads = _upstream(outs)
        kept = [host(g).copy() for g in grads]
        _backward(outs, grads)
        for g, k in zip(grads, kept):
            np.testing.assert_array_equal(host(g), k, err_msg=f"{name}: the backward changed its incoming gradient")
        for t, b in zip(inputs, before):
            np.testing.assert_array_equal(host(t), b, err_msg=f"{name}: the backward changed an input")
        for c, k in zip(case.consts, consts):
            np.testing.assert_array_equal(c, k, err_msg=f"{name}: a mask/index/target array was changed")
        for t in inputs:                      # a leaf's .grad is its own: changing it changes nothing else
            if t.grad is not None:
                t.grad += 1.0
        for g, k in zip(grads, kept):
            np.testing.assert_array_equal(host(g), k, err_msg=f"{name}: a .grad shares memory with the gradient")


@pytest.mark.parametrize("name, path", OP_PATHS)
@given(data=st.data())
def test_backward_is_right_for_non_contiguous_gradients(name, path, data):
    with nf.ops.use(path):
        case, inputs = _drawn(data, name)
        grads = _upstream(_outputs(case.fn(*inputs)))
        kinds = {}
        for g in grads:
            for kind, view in _layouts(g):
                kinds.setdefault(kind, []).append(view)
        for kind, views in kinds.items():
            if len(views) != len(grads):
                continue
            expected = _grads_with(case, [v.copy() for v in views])          # C-contiguous copies
            got = _grads_with(case, views)
            for i, (e, a) in enumerate(zip(expected, got)):
                assert (e is None) == (a is None), f"{name}: input {i} got a gradient with one layout only"
                if e is not None:
                    np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-12,
                                               err_msg=f"{name}: input {i}, {kind} upstream gradient")


@pytest.mark.parametrize("name, path", OP_PATHS)
@given(data=st.data())
def test_gradcheck_with_tight_tolerances(name, path, data):
    with nf.ops.use(path):
        case, inputs = _drawn(data, name)
        assert nf.gradcheck(case.fn, inputs, eps=case.eps, **TIGHT)
        assert len(inputs) == 1 or name in MULTI_INPUT, f"add {name!r} to MULTI_INPUT (tested with inputs frozen)"


@pytest.mark.parametrize("name, path", [p for p in OP_PATHS if p.values[0] in MULTI_INPUT])
@given(data=st.data())
def test_gradcheck_with_some_inputs_frozen(name, path, data):
    case = data.draw(OP_CASES[name], label="case")
    with nf.ops.use(path):
        n = len(case.arrays)
        for r in range(1, n):
            for wanted in itertools.combinations(range(n), r):
                inputs = [T(a, requires_grad=i in wanted) for i, a in enumerate(case.arrays)]
                assert nf.gradcheck(case.fn, inputs, eps=case.eps, **TIGHT)
                frozen = [i for i in range(n) if i not in wanted]
                assert all(inputs[i].grad is None for i in frozen), f"{name}: a frozen input got a .grad"


def test_reductions_default_to_all_axes_no_keepdims_and_bessel():
    """sum/mean/max/var with no arguments reduce everything to 0-d, var with correction=1 (torch's
    defaults; the table always passes them, so a wrong default would go unseen there)."""
    x = np.array([[1.0, -2.0, 0.5], [3.0, 0.25, -1.0]])
    for op, expected in ((nf.sum, x.sum()), (nf.mean, x.mean()), (nf.max, x.max()), (nf.var, x.var(ddof=1))):
        out = op(T(x))
        assert out.shape == () and np.isclose(host(out), expected), op.__name__
