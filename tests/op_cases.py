"""One drawn call of every op in npformer.ops.OPS: the table the op-wide tests share.

OP_CASES maps each op name to a hypothesis strategy that draws one valid call of the op on
float64 inputs (an OpCase); OP_PATHS lists (op, implementation) pairs, both paths for an op with
a fast version. tests/test_grad_properties.py checks its properties on every entry (and fails
when an op has none, so a new op must be added here); tests/test_ops_dtype.py its dtypes.
"""

import builtins
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import npformer as nf
from tests.helpers import DEVICE, T
from tests.strategies import (arrays, broadcast_pairs, distinct_arrays, index_expressions, on_device,
                              reduction_args, reshape_targets, separated_pair, shapes)


# ----------------------------------------------------------------------------- one case per op

@dataclass(frozen=True)
class OpCase:
    """One call of an op on drawn inputs, for the properties every op must have.

    fn(*tensors) calls the op on tensors made from `arrays` (float64, one per differentiable
    input) and returns a Tensor or a tuple of Tensors. consts: the other arrays fn reads (masks,
    indices, targets), which must be left unchanged too. eps: gradcheck's step.
    """
    fn: Callable
    arrays: tuple
    consts: tuple = ()
    eps: float = 1e-6


def _one(op, domain="real", **kwargs):
    return st.builds(lambda x: OpCase(lambda t: op(t, **kwargs), (x,)), arrays(shapes(), domain))


@st.composite
def _two(draw, op, domain_a="real", domain_b="real"):
    sa, sb = draw(broadcast_pairs(max_dims=3))
    return OpCase(op, (draw(arrays(sa, domain_a)), draw(arrays(sb, domain_b))))


@st.composite
def _extremum(draw, op):
    return OpCase(op, draw(separated_pair(*draw(broadcast_pairs(max_dims=3)))))


@st.composite
def _reduction(draw, op):
    shape, axis, keepdims = draw(reduction_args(max_dims=3))
    if op is nf.max:
        return OpCase(lambda t: op(t, axis, keepdims), (draw(distinct_arrays(shape)),))
    x = draw(arrays(shape))
    if op is nf.var:
        n = x.size // max(np.size(np.sum(x, axis=() if x.ndim == 0 and axis is not None else axis)), 1)
        correction = draw(st.sampled_from([0, 1])) if n > 1 else 0
        return OpCase(lambda t: op(t, axis, keepdims, correction), (x,))
    return OpCase(lambda t: op(t, axis, keepdims), (x,))


@st.composite
def _shape_op(draw, name):
    x = draw(arrays(shapes(1 if name == "split" else 0, 3)))
    n = x.ndim
    if name == "reshape":
        target = draw(reshape_targets(x.size))
        return OpCase(lambda t: nf.reshape(t, target), (x,))
    if name == "permute":
        perm = tuple(ax - n if draw(st.booleans()) else ax for ax in draw(st.permutations(range(n))))
        return OpCase(lambda t: nf.permute(t, perm), (x,))
    if name == "transpose":
        pair = (draw(st.integers(-n, n - 1)), draw(st.integers(-n, n - 1))) if n >= 2 else (-2, -1)
        return OpCase(lambda t: nf.transpose(t, *pair), (x,))
    if name == "expand":
        lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
        target = lead + tuple(draw(st.sampled_from([-1, 2, 3])) if m == 1 else draw(st.sampled_from([-1, m]))
                              for m in x.shape)
        return OpCase(lambda t: nf.expand(t, target), (x,))
    if name == "getitem":
        idx = draw(index_expressions(x.shape))
        consts = tuple(i for i in (idx if isinstance(idx, tuple) else (idx,)) if isinstance(i, np.ndarray))
        return OpCase(lambda t: nf.getitem(t, on_device(idx)), (x,), consts)
    axis = draw(st.integers(-n, n - 1))
    sizes = draw(st.one_of(st.integers(1, 3), st.lists(st.integers(0, 2), min_size=1, max_size=3)))
    if isinstance(sizes, list):
        sizes[-1] += x.shape[axis] - builtins.sum(sizes)
        if sizes[-1] < 0:
            sizes = [x.shape[axis]]
    return OpCase(lambda t: nf.split(t, sizes, axis), (x,))


@st.composite
def _join(draw, op):
    base = draw(shapes(1 if op is nf.concatenate else 0, 3))
    n = len(base)
    axis = draw(st.integers(-n, n - 1) if op is nf.concatenate else st.integers(-n - 1, n))
    count = draw(st.integers(1, 3))
    shapes_ = [base[:axis % n] + (draw(st.integers(1, 2)),) + base[axis % n + 1:] if op is nf.concatenate else base
               for _ in range(count)]
    return OpCase(lambda *ts: op(ts, axis), tuple(draw(arrays(s)) for s in shapes_))


@st.composite
def _where(draw):
    sa, sb = draw(broadcast_pairs(max_dims=3))
    cond = draw(hnp.arrays(bool, np.broadcast_shapes(sa, sb)))
    return OpCase(lambda a, b: nf.where(T(cond), a, b), (draw(arrays(sa)), draw(arrays(sb))), (cond,))


@st.composite
def _masked_fill(draw):
    shape = draw(shapes(0, 3))
    mask_shape = tuple(1 if draw(st.booleans()) else m for m in shape[draw(st.integers(0, len(shape))):])
    mask = draw(hnp.arrays(bool, mask_shape))
    value = draw(st.sampled_from([0.0, -2.5]))
    return OpCase(lambda t: nf.masked_fill(t, T(mask), value), (draw(arrays(shape)),), (mask,))


@st.composite
def _matmul(draw):
    n, k, m = (draw(st.integers(1, 3)) for _ in range(3))
    sa, sb = draw(st.sampled_from([((k,), (k,)), ((k,), (k, m)), ((n, k), (k,)), ((n, k), (k, m)),
                                   ((2, n, k), (k, m)), ((2, 1, n, k), (3, k, m)), ((k,), (2, k, m))]))
    return OpCase(nf.matmul, (draw(arrays(sa)), draw(arrays(sb))))


@st.composite
def _linear(draw):
    lead = draw(shapes(0, 2))
    n_in, n_out = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ins = [draw(arrays(lead + (n_in,))), draw(arrays((n_out, n_in)))]
    if draw(st.booleans()):
        ins.append(draw(arrays((n_out,))))
    return OpCase(nf.linear, tuple(ins))


@st.composite
def _softmax(draw, op):
    x = draw(arrays(shapes(1, 3), "wide"))
    axis = draw(st.integers(-x.ndim, x.ndim - 1))
    return OpCase(lambda t: op(t, axis), (x,))


@st.composite
def _cross_entropy(draw):
    C = draw(st.integers(2, 3))
    shape = draw(st.sampled_from([(C,), (2, C), (3, C), (2, C, 2)]))
    target_shape = () if len(shape) == 1 else shape[:1] + shape[2:]
    target = draw(hnp.arrays(np.int64, target_shape, elements=st.sampled_from([0, C - 1, -100, 1])))
    target.reshape(-1)[:1] = 0          # one target counts, so a mean is never 0/0
    kw = dict(label_smoothing=draw(st.sampled_from([0.0, 0.1])), reduction=draw(st.sampled_from(["mean", "sum", "none"])))
    return OpCase(lambda t: nf.cross_entropy(t, T(target), **kw), (draw(arrays(shape)),), (target,))


@st.composite
def _layer_norm(draw):
    shape = draw(shapes(1, 3, 2, 3))
    norm = shape[len(shape) - draw(st.integers(1, len(shape))):]
    ins = [draw(arrays(shape))] + [draw(arrays(norm)) for _ in range(draw(st.integers(0, 2)))]
    if len(ins) == 1:
        return OpCase(lambda a: nf.layer_norm(a, norm), tuple(ins))
    if len(ins) == 2 and draw(st.booleans()):   # bias without weight
        return OpCase(lambda a, b: nf.layer_norm(a, norm, bias=b), tuple(ins))
    return OpCase(lambda a, *wb: nf.layer_norm(a, norm, *wb), tuple(ins))


@st.composite
def _rms_norm(draw):
    """x with normalized_shape its last 1 or 2 axes, with or without a weight (an input with a gradient);
    eps=None (2e-16 in float64) only with every |x| >= 0.5, so that no row's mean square is near 0, where
    central differences fail."""
    shape = draw(shapes(1, 3, 2, 3))
    norm = shape[len(shape) - draw(st.integers(1, min(2, len(shape)))):]
    eps = draw(st.sampled_from([None, 1e-3]))
    x = draw(arrays(shape, "nonzero" if eps is None else "real"))
    if draw(st.booleans()):
        return OpCase(lambda a: nf.rms_norm(a, norm, eps=eps), (x,))
    return OpCase(lambda a, w: nf.rms_norm(a, norm, w, eps), (x, draw(arrays(norm))))


@st.composite
def _embedding(draw):
    V, D = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    idx = draw(hnp.arrays(np.int64, shapes(0, 2), elements=st.integers(0, V - 1)))
    return OpCase(lambda w: nf.embedding(w, T(idx)), (draw(arrays((V, D))),), (idx,))


@st.composite
def _dropout(draw):
    p, seed = draw(st.sampled_from([0.0, 0.3, 0.5, 1.0])), draw(st.integers(0, 3))
    return OpCase(lambda t: nf.dropout(t, p, generator=nf.random.Generator(seed, device=DEVICE)),
                  (draw(arrays(shapes())),))


@st.composite
def _attention(draw):
    """q, k, v with broadcast batch axes and no mask, a bool mask, causal, or an additive bias that is an
    input of its own (so it requires grad): a float `mask`, broadcast over some axes, or bias= with causal."""
    L, S, E, Ev = (draw(st.integers(1, 3)) for _ in range(4))
    bq, bk = draw(st.sampled_from([((), ()), ((2,), (2,)), ((2, 1), (3,)), ((1,), (2,))]))
    kind = draw(st.sampled_from(["none", "bool", "float", "causal", "causal+bias"]))
    if kind.startswith("causal"):
        S = L
    kw = dict(scale=draw(st.sampled_from([1.0, 0.7])), causal=kind.startswith("causal"))
    ins = (draw(arrays(bq + (L, E))), draw(arrays(bk + (S, E))), draw(arrays(bk + (S, Ev))))
    if kind == "bool":
        mask = draw(hnp.arrays(bool, (L, S)))
        return OpCase(lambda q, k, v: nf.attention(q, k, v, T(mask).data, **kw), ins, (mask,))
    if kind in ("float", "causal+bias"):
        shape = draw(st.sampled_from([(L, S), (1, S), (L, 1), (S,), (2, 1, L, S)]))
        if kind == "float":
            return OpCase(lambda q, k, v, m: nf.attention(q, k, v, m, **kw), ins + (draw(arrays(shape)),))
        return OpCase(lambda q, k, v, b: nf.attention(q, k, v, bias=b, **kw), ins + (draw(arrays(shape)),))
    return OpCase(lambda q, k, v: nf.attention(q, k, v, **kw), ins)


@st.composite
def _self_attention(draw):
    n_head, D, T_ = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    batch, causal = draw(st.sampled_from([(), (2,)])), draw(st.booleans())
    x = draw(arrays(batch + (T_, 3 * n_head * D)))
    return OpCase(lambda t: nf.self_attention(t, n_head, causal=causal), (x,))


def _astype_round_trip(t):
    # float64 -> float32 -> float64 (or float32 -> float64 -> float32): both casts are astype nodes
    other = np.float32 if t.dtype == np.float64 else np.float64
    return nf.ops.astype(nf.ops.astype(t, other), t.dtype)


# Values on a 1/8 grid and a step of 2^-10 are exact in float32, so the round trip's central
# differences are exact too.
_ASTYPE = st.builds(lambda x: OpCase(_astype_round_trip, (x,), eps=2.0 ** -10),
                    hnp.arrays(np.float64, shapes(), elements=st.integers(-24, 24).map(lambda k: k / 8)))

# op name -> strategy of OpCase. tests/test_grad_properties.py fails when an op in
# npformer.ops.OPS is missing here.
OP_CASES = {
    "abs": _one(nf.abs, "away_from_kink"), "exp": _one(nf.exp), "gelu": _one(nf.gelu),
    "log": _one(nf.log, "positive"), "neg": _one(nf.neg), "relu": _one(nf.relu, "away_from_kink"),
    "sigmoid": _one(nf.sigmoid, "wide"), "silu": _one(nf.ops.silu, "wide"), "sqrt": _one(nf.sqrt, "positive"),
    "tanh": _one(nf.tanh, "wide"),
    "add": _two(nf.add), "sub": _two(nf.sub), "mul": _two(nf.mul), "div": _two(nf.div, "real", "nonzero"),
    "pow": _two(nf.pow, "positive", "real"), "maximum": _extremum(nf.maximum), "minimum": _extremum(nf.minimum),
    "sum": _reduction(nf.sum), "mean": _reduction(nf.mean), "max": _reduction(nf.max), "var": _reduction(nf.var),
    "reshape": _shape_op("reshape"), "permute": _shape_op("permute"), "transpose": _shape_op("transpose"),
    "expand": _shape_op("expand"), "getitem": _shape_op("getitem"), "split": _shape_op("split"),
    "concatenate": _join(nf.concatenate), "stack": _join(nf.stack), "where": _where(), "masked_fill": _masked_fill(),
    "matmul": _matmul(), "linear": _linear(), "softmax": _softmax(nf.softmax), "log_softmax": _softmax(nf.log_softmax),
    "cross_entropy": _cross_entropy(), "layer_norm": _layer_norm(), "rms_norm": _rms_norm(),
    "embedding": _embedding(), "dropout": _dropout(),
    "attention": _attention(), "self_attention": _self_attention(), "astype": _ASTYPE,
}


# (op name, implementation): ops with a fast version (npformer/fast) are tested on both paths.
OP_PATHS = [pytest.param(name, path, id=f"{name}-{path}") for name in sorted(OP_CASES)
            for path in (("reference", "fast") if name in nf.ops.FAST else ("reference",))]
