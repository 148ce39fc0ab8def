"""Every public op (npformer.ops.OPS) against torch autograd.

Each case builds the same float64 NumPy inputs for both frameworks, runs the
op, back-propagates the same random cotangent v (out.backward(v) in both) and
compares the outputs and the gradient of every input:
|npformer - torch| <= 1e-12 + 1e-10 |torch| elementwise. A subset also runs in
float32 against torch float32: |npformer - torch| <= 1e-7 + 1e-5 |torch| (gelu: 1e-6 + ...).

`python -m tests.verify_ops_report` prints the worst difference seen per op.
"""

from dataclasses import dataclass
from typing import Callable


import numpy as np
import pytest

import npformer as nf
from tests.helpers import DEVICE, T, host

pytestmark = pytest.mark.verify
torch = pytest.importorskip("torch")
F = torch.nn.functional

RTOL, ATOL = 1e-10, 1e-12            # float64
pytestmark = pytest.mark.usefixtures("ops_path")   # every comparison on the reference and the fast path
# float32: below ~1 ulp of 1.0 a relative comparison says nothing, hence the atol
RTOL32, ATOL32 = 1e-5, 1e-7

_rng = np.random.default_rng(20240611)


def randn(*shape):
    return _rng.standard_normal(shape)


def positive(*shape):
    return 0.5 + 1.5 * _rng.random(shape)


def ties(*shape):
    """Values from {-1, 0, 1, 2}: many exact ties and exact zeros."""
    return _rng.integers(-1, 3, size=shape).astype(np.float64)


def ints(high, *shape):
    return _rng.integers(0, high, size=shape)


def tt(a):
    """A constant (index, mask) array as a torch tensor."""
    return torch.as_tensor(np.asarray(a))


@dataclass
class Case:
    id: str
    inputs: list                 # float arrays; each becomes a tensor requiring grad
    nf_fn: Callable              # npformer tensors -> Tensor or tuple of Tensors
    th_fn: Callable              # torch tensors -> tensor or tuple of tensors
    f32: bool = False            # also compared in float32
    atol32: float = ATOL32


CASES: dict = {}  # op name -> list of Case


def case(op, label, inputs, nf_fn, th_fn, f32=False, atol32=ATOL32):
    CASES.setdefault(op, []).append(Case(f"{op}-{label}", inputs, nf_fn, th_fn, f32, atol32))


# ----------------------------------------------------------------------------- elementwise
BINARY_SHAPES = {"same": ((3, 4), (3, 4)), "rank": ((2, 3, 4), (4,)),
                 "size1": ((2, 1, 4), (3, 1)), "size1-swapped": ((3, 1), (2, 1, 4)),
                 "scalar0d": ((), (3, 2)), "rank-swapped": ((4,), (2, 3, 4))}
BINARY = {"add": (nf.add, torch.add), "sub": (nf.sub, torch.sub), "mul": (nf.mul, torch.mul),
          "div": (nf.div, torch.div), "maximum": (nf.maximum, torch.maximum),
          "minimum": (nf.minimum, torch.minimum), "pow": (nf.pow, torch.pow)}

for op, (f_nf, f_th) in BINARY.items():
    for label, (sa, sb) in BINARY_SHAPES.items():
        if op == "pow":                          # positive base, any exponent
            a, b = positive(*sa), randn(*sb)
        elif op == "div":                        # divisor away from zero
            a, b = randn(*sa), np.sign(randn(*sb)) * positive(*sb)
        else:
            a, b = randn(*sa), randn(*sb)
        case(op, label, [a, b], f_nf, f_th, f32=(label == "rank"))
    # one operand a Python number (no gradient to it)
    x = positive(3, 4)
    case(op, "pyscalar", [x], lambda a, f=f_nf: f(a, 1.5), lambda a, f=f_th: f(a, torch.tensor(1.5, dtype=a.dtype)))
for op in ("maximum", "minimum"):                # ties split the gradient evenly, as in torch
    f_nf, f_th = BINARY[op]
    case(op, "ties", [ties(4, 5), ties(4, 5)], f_nf, f_th)
    case(op, "ties-bcast", [ties(3, 4), ties(4)], f_nf, f_th)
case("pow", "int-exponent-negative-base", [randn(3, 4)], lambda a: a ** 3, lambda a: a ** 3)
case("pow", "sqrt-exponent", [positive(5)], lambda a: nf.pow(a, 0.5), lambda a: torch.pow(a, 0.5))

UNARY = {"neg": (nf.neg, torch.neg, randn), "exp": (nf.exp, torch.exp, randn),
         "log": (nf.log, torch.log, positive), "sqrt": (nf.sqrt, torch.sqrt, positive),
         "abs": (nf.abs, torch.abs, ties), "tanh": (nf.tanh, torch.tanh, randn),
         "sigmoid": (nf.sigmoid, torch.sigmoid, randn), "relu": (nf.relu, torch.relu, ties)}
for op, (f_nf, f_th, draw) in UNARY.items():
    case(op, "3d", [draw(2, 3, 4)], f_nf, f_th, f32=True)
    case(op, "0d", [draw()], f_nf, f_th)
case("abs", "randn", [randn(4, 5)], nf.abs, torch.abs)
case("astype", "float32-round-trip", [np.random.default_rng(99).standard_normal((3, 4))],     # its own draws
     lambda a: nf.astype(nf.astype(a, np.float32), np.float64),
     lambda a: a.float().double())
case("relu", "randn", [randn(4, 5)], nf.relu, torch.relu)
case("sigmoid", "large", [np.array([-745.0, -40.0, -5.0, 0.0, 5.0, 40.0, 745.0])], nf.sigmoid, torch.sigmoid)
case("tanh", "large", [np.array([-30.0, -3.0, 0.0, 3.0, 30.0])], nf.tanh, torch.tanh)
# In float32 the negative tail x (1 + erf(x / sqrt 2)) / 2 cancels to a few ulps of 1 in both
# frameworks (and npformer's float32 erf is good to ~5e-7), so gelu gets atol 1e-6 there.
for approx in ("none", "tanh"):
    x = np.concatenate([randn(20) * 3, [0.0, -8.0, 8.0]])
    case("gelu", approx, [x.reshape(23, 1)], lambda a, m=approx: nf.gelu(a, approximate=m),
         lambda a, m=approx: F.gelu(a, approximate=m), f32=True, atol32=1e-6)

x = np.concatenate([randn(20) * 3, [0.0, -40.0, 40.0]])
case("silu", "wide", [x.reshape(23, 1)], nf.silu, F.silu, f32=True)

# ----------------------------------------------------------------------------- matmul
MATMUL_SHAPES = {"2d": ((3, 4), (4, 5)), "1d-2d": ((4,), (4, 5)), "2d-1d": ((3, 4), (4,)),
                 "1d-1d": ((4,), (4,)), "1d-3d": ((4,), (2, 4, 3)), "3d-1d": ((2, 3, 4), (4,)),
                 "batch-bcast": ((2, 1, 3, 4), (5, 4, 2)), "batch-vs-2d": ((3, 2, 4), (4, 5))}
for label, (sa, sb) in MATMUL_SHAPES.items():
    case("matmul", label, [randn(*sa), randn(*sb)], nf.matmul, torch.matmul, f32=(label == "batch-bcast"))
for label, (sx, bias) in {"2d": ((3, 4), True), "3d": ((2, 3, 4), True), "1d": ((4,), True),
                          "nobias": ((2, 3, 4), False)}.items():
    inputs = [randn(*sx), randn(5, 4)] + ([randn(5)] if bias else [])
    case("linear", label, inputs, nf.linear, F.linear, f32=(label == "3d"))

# ----------------------------------------------------------------------------- attention
_causal = np.tri(4, 5, dtype=bool)
_pad = np.ones((4, 5), dtype=bool)
_pad[2] = False                                    # one query with no key: both give zeros
_addm = np.where(_rng.random((4, 5)) < 0.3, -np.inf, _rng.standard_normal((4, 5)))
_addm[:, 0] = 0.0
for label, mask in {"nomask": None, "causal": _causal, "deadrow": _pad, "float": _addm}.items():
    case("attention", label, [randn(2, 3, 4, 6), randn(2, 3, 5, 6), randn(2, 3, 5, 2)],
         lambda q, k, v, m=mask: nf.attention(q, k, v, None if m is None else m, scale=0.4),
         lambda q, k, v, m=mask: F.scaled_dot_product_attention(
             q, k, v, attn_mask=None if m is None else torch.as_tensor(m), scale=0.4),
         f32=(label == "causal"))
def _on_reference(op):
    """`op` called under npformer.ops.use("reference") (its backward runs what the forward recorded)."""
    def call(*args, **kwargs):
        with nf.ops.use("reference"):
            return op(*args, **kwargs)
    return call


# the causal=True path: the reference, and the fast version with the full scores and in blocks
_CAUSAL = {"causal-reference": _on_reference(nf.attention),
           "causal-full": lambda *a, **kw: nf.fast.attention(*a, causal_block=64, **kw),
           "causal-blocks": lambda *a, **kw: nf.fast.attention(*a, causal_block=2, **kw)}
for label, fn in _CAUSAL.items():
    case("attention", label, [randn(2, 3, 7, 6), randn(2, 3, 7, 6), randn(2, 3, 7, 2)],
         lambda q, k, v, f=fn: f(q, k, v, scale=0.4, causal=True),
         lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.4),
         f32=(label == "causal-blocks"))


def _th_self_attention(x, n_head, causal):
    """torch's spelling of npformer.self_attention: split, view heads, SDPA, merge (nanoGPT's)."""
    *batch, T, E3 = x.shape
    E = E3 // 3
    q, k, v = (t.reshape(*batch, T, n_head, E // n_head).transpose(-3, -2) for t in x.split(E, dim=-1))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return y.transpose(-3, -2).reshape(*batch, T, E)


_SELF = {"causal-reference": (_on_reference(nf.self_attention), True),
         "causal-full": (lambda *a, **kw: nf.fast.self_attention(*a, causal_block=64, **kw), True),
         "causal-blocks": (lambda *a, **kw: nf.fast.self_attention(*a, causal_block=2, **kw), True),
         "nomask": (nf.self_attention, False)}
for label, (fn, causal) in _SELF.items():
    case("self_attention", label, [randn(2, 7, 18)], lambda x, f=fn, c=causal: f(x, 3, causal=c),
         lambda x, c=causal: _th_self_attention(x, 3, c), f32=(label == "causal-blocks"))

# ----------------------------------------------------------------------------- reductions
def _dim(axis, ndim):
    return tuple(range(ndim)) if axis is None else axis


for axis, keep in [(None, False), (1, False), (-1, True), ((0, 2), False), ((0, 2), True), ((2, 0, 1), True)]:
    label = f"axis{axis}-keep{keep}".replace(" ", "")
    for op, th in (("sum", torch.sum), ("mean", torch.mean)):
        case(op, label, [randn(2, 3, 4)], lambda a, f=getattr(nf, op), ax=axis, k=keep: f(a, axis=ax, keepdims=k),
             lambda a, f=th, ax=axis, k=keep: f(a, dim=_dim(ax, 3), keepdim=k), f32=(axis == (0, 2) and keep))
    case("var", label, [randn(2, 3, 4)], lambda a, ax=axis, k=keep: nf.var(a, axis=ax, keepdims=k),
         lambda a, ax=axis, k=keep: torch.var(a, dim=_dim(ax, 3), keepdim=k), f32=(axis == (0, 2) and keep))
    # max on ties: torch.amax splits the gradient evenly among the maxima
    case("max", label, [ties(2, 3, 4)], lambda a, ax=axis, k=keep: nf.max(a, axis=ax, keepdims=k),
         lambda a, ax=axis, k=keep: torch.amax(a, dim=_dim(ax, 3), keepdim=k), f32=(axis == 1))
case("max", "no-ties", [randn(3, 5)], lambda a: nf.max(a, axis=0), lambda a: torch.amax(a, dim=0))
case("var", "correction0", [randn(3, 5)], lambda a: nf.var(a, axis=1, correction=0),
     lambda a: torch.var(a, dim=1, correction=0))
case("var", "correction2", [randn(3, 5)], lambda a: nf.var(a, axis=(0, 1), correction=2),
     lambda a: torch.var(a, dim=(0, 1), correction=2))
case("sum", "0d", [randn()], lambda a: nf.sum(a), lambda a: torch.sum(a))

# ----------------------------------------------------------------------------- shape ops
case("reshape", "infer", [randn(2, 3, 4)], lambda a: nf.reshape(a, (4, -1)), lambda a: a.reshape(4, -1))
case("reshape", "to-0d", [randn(1, 1)], lambda a: nf.reshape(a, ()), lambda a: a.reshape(()))
case("permute", "3d", [randn(2, 3, 4)], lambda a: nf.permute(a, (2, 0, 1)), lambda a: a.permute(2, 0, 1))
case("permute", "negative", [randn(2, 3, 4)], lambda a: nf.permute(a, (-1, 1, 0)), lambda a: a.permute(-1, 1, 0))
case("transpose", "default", [randn(2, 3, 4)], nf.transpose, lambda a: a.transpose(-2, -1))
case("transpose", "0-2", [randn(2, 3, 4)], lambda a: nf.transpose(a, 0, 2), lambda a: a.transpose(0, 2))
case("expand", "size1", [randn(3, 1)], lambda a: nf.expand(a, (3, 4)), lambda a: a.expand(3, 4))
case("expand", "new-axes", [randn(1, 4)], lambda a: nf.expand(a, (2, 3, -1)), lambda a: a.expand(2, 3, -1))

REP = np.array([0, 2, 0, 3, 2, 2])                         # integer index with repeats
MASK = _rng.random((4, 5)) > 0.4
GETITEM = {
    "slices": (lambda a: a[1:, ::2], lambda a: a[1:, ::2]),
    "int": (lambda a: a[2], lambda a: a[2]),
    "int-int-0d": (lambda a: a[1, -1], lambda a: a[1, -1]),
    "ellipsis-none": (lambda a: a[..., None, 1:3], lambda a: a[..., None, 1:3]),
    "intarray-repeats": (lambda a: a[T(REP)], lambda a: a[tt(REP)]),
    "intarray-middle": (lambda a: a[:, T(REP)], lambda a: a[:, tt(REP)]),
    "two-intarrays": (lambda a: a[T(REP[:4]), T(REP[2:])], lambda a: a[tt(REP[:4]), tt(REP[2:])]),
    "bool-mask": (lambda a: a[T(MASK)], lambda a: a[tt(MASK)]),
    "bool-rows": (lambda a: a[T(MASK[:, 0])], lambda a: a[tt(MASK[:, 0])]),
}
for label, (f_nf, f_th) in GETITEM.items():
    case("getitem", label, [randn(4, 5)], f_nf, f_th, f32=(label == "intarray-repeats"))

case("concatenate", "axis0", [randn(2, 3), randn(1, 3), randn(4, 3)],
     lambda *ts: nf.concatenate(ts, axis=0), lambda *ts: torch.cat(ts, dim=0))
case("concatenate", "axis-1", [randn(2, 3, 1), randn(2, 3, 4)],
     lambda *ts: nf.concatenate(ts, axis=-1), lambda *ts: torch.cat(ts, dim=-1))
for axis in (0, 1, -1):
    case("stack", f"axis{axis}", [randn(2, 3), randn(2, 3), randn(2, 3)],
         lambda *ts, ax=axis: nf.stack(ts, axis=ax), lambda *ts, ax=axis: torch.stack(ts, dim=ax))
case("split", "size", [randn(7, 2)], lambda a: nf.split(a, 3), lambda a: torch.split(a, 3))
case("split", "list-axis-1", [randn(2, 7)], lambda a: nf.split(a, [2, 4, 1], axis=-1),
     lambda a: torch.split(a, [2, 4, 1], dim=-1))
case("split", "size-axis1", [randn(2, 6, 3)], lambda a: nf.split(a, 2, axis=1), lambda a: torch.split(a, 2, dim=1))

COND = _rng.random((3, 1, 4)) > 0.5
case("where", "same", [randn(3, 2, 4), randn(3, 2, 4)], lambda a, b: nf.where(T(np.broadcast_to(COND, (3, 2, 4)).copy()), a, b),
     lambda a, b: torch.where(tt(np.broadcast_to(COND, (3, 2, 4)).copy()), a, b))
case("where", "bcast-all", [randn(2, 1), randn(4)], lambda a, b: nf.where(T(COND), a, b),
     lambda a, b: torch.where(tt(COND), a, b), f32=True)
FILL = _rng.random((1, 5)) > 0.5
for label, value in (("value", 0.25), ("neg-inf", -np.inf)):
    case("masked_fill", label, [randn(3, 5)], lambda a, v=value: nf.masked_fill(a, T(FILL), v),
         lambda a, v=value: a.masked_fill(tt(FILL), v))
case("masked_fill", "mask-bcast-last", [randn(2, 3, 5)], lambda a: nf.masked_fill(a, T(MASK[:2, :3, None]), 1e9),
     lambda a: a.masked_fill(tt(MASK[:2, :3, None]), 1e9))

# ----------------------------------------------------------------------------- fused ops
for axis in (-1, 0, 1):
    x = randn(2, 3, 4) * 3
    case("softmax", f"axis{axis}", [x], lambda a, ax=axis: nf.softmax(a, axis=ax),
         lambda a, ax=axis: torch.softmax(a, dim=ax), f32=(axis == -1))
    case("log_softmax", f"axis{axis}", [x], lambda a, ax=axis: nf.log_softmax(a, axis=ax),
         lambda a, ax=axis: torch.log_softmax(a, dim=ax), f32=(axis == -1))
case("softmax", "large", [np.array([[1000.0, 0.0, -1000.0], [5.0, 5.0, 5.0]])],
     lambda a: nf.softmax(a), lambda a: torch.softmax(a, -1))

TGT = np.array([0, 3, -100, 4, 3, 1])                      # one ignored entry (torch's default -100)
TGT2 = np.array([2, 2, 0, 4, 1, 2])                        # ignore_index=2 hides three
TGT3 = np.array([[0, 2, 2], [-100, 1, 3]])                 # (N, d1) for logits (N, C, d1)
CE = [
    ("mean", (6, 5), TGT, {}),
    ("sum", (6, 5), TGT, {"reduction": "sum"}),
    ("none", (6, 5), TGT, {"reduction": "none"}),
    ("ignore2-mean", (6, 5), TGT2, {"ignore_index": 2}),
    ("smooth-mean", (6, 5), TGT, {"label_smoothing": 0.1}),
    ("smooth-ignore-sum", (6, 5), TGT2, {"label_smoothing": 0.3, "ignore_index": 2, "reduction": "sum"}),
    ("smooth-none", (6, 5), TGT, {"label_smoothing": 0.2, "reduction": "none"}),
    ("NCd1-mean", (2, 5, 3), TGT3, {}),
    ("NCd1-smooth-none", (2, 5, 3), TGT3, {"label_smoothing": 0.1, "reduction": "none"}),
    ("NCd1-ignore-smooth-mean", (2, 5, 3), np.where(TGT3 < 0, 4, TGT3), {"ignore_index": 2, "label_smoothing": 0.05}),
    ("unbatched", (5,), np.array(3), {}),
]
for label, shape, tgt, kw in CE:
    case("cross_entropy", label, [randn(*shape) * 2], lambda x, t=tgt, kw=kw: nf.cross_entropy(x, T(t), **kw),
         lambda x, t=tgt, kw=kw: F.cross_entropy(x, tt(t), **kw), f32=(label == "smooth-mean"))

case("layer_norm", "affine", [randn(2, 3, 6), randn(6), randn(6)],
     lambda a, w, b: nf.layer_norm(a, 6, w, b), lambda a, w, b: F.layer_norm(a, (6,), w, b), f32=True)
case("layer_norm", "plain", [randn(4, 6) * 5 + 3], lambda a: nf.layer_norm(a, (6,)),
     lambda a: F.layer_norm(a, (6,)))
case("layer_norm", "weight-only", [randn(4, 6), randn(6)], lambda a, w: nf.layer_norm(a, (6,), weight=w),
     lambda a, w: F.layer_norm(a, (6,), weight=w))
case("rms_norm", "weight", [randn(2, 3, 6), randn(6)], lambda a, w: nf.rms_norm(a, 6, w),
     lambda a, w: F.rms_norm(a, (6,), w), f32=True)
case("rms_norm", "2-axes-eps", [randn(2, 3, 4) * 5 + 3], lambda a: nf.rms_norm(a, (3, 4), eps=1e-6),
     lambda a: F.rms_norm(a, (3, 4), eps=1e-6))
case("rms_norm", "default-eps", [randn(4, 6)], lambda a: nf.rms_norm(a, (6,)), lambda a: F.rms_norm(a, (6,)),
     f32=True)
case("layer_norm", "2-axes", [randn(2, 3, 4), randn(3, 4), randn(3, 4)],
     lambda a, w, b: nf.layer_norm(a, (3, 4), w, b, eps=1e-6), lambda a, w, b: F.layer_norm(a, (3, 4), w, b, eps=1e-6))

EMB_IDX = np.array([[1, 4, 1, 0, 6], [6, 6, 2, 1, 1]])
case("embedding", "repeats", [randn(7, 3)], lambda w: nf.embedding(w, T(EMB_IDX)),
     lambda w: F.embedding(tt(EMB_IDX), w), f32=True)
case("embedding", "1d", [randn(7, 3)], lambda w: nf.embedding(w, T(EMB_IDX[0])), lambda w: F.embedding(tt(EMB_IDX[0]), w))


def _dropout_case(label, shape, p, seed):
    """Torch cannot draw npformer's mask, so the torch side reuses the keep mask read off npformer's output."""
    seen = {}

    def run_nf(a):
        out = nf.dropout(a, p=p, generator=nf.random.Generator(seed, DEVICE))
        seen["keep"] = host(out) != 0          # the inputs are nonzero, so zeros are exactly the dropped
        return out

    case("dropout", label, [randn(*shape)], run_nf,
         lambda a: a * tt(seen["keep"]).to(a.dtype) * (1.0 / (1.0 - p)), f32=(label == "p0.3"))
    return seen


DROPOUT_SEEN = {"p0.3": _dropout_case("p0.3", (40, 50), 0.3, 7), "p0.9": _dropout_case("p0.9", (40, 50), 0.9, 8)}
case("dropout", "p0", [randn(3, 4)], lambda a: nf.dropout(a, p=0.0), lambda a: F.dropout(a, p=0.0))
case("dropout", "eval", [randn(3, 4)], lambda a: nf.dropout(a, p=0.5, training=False),
     lambda a: F.dropout(a, p=0.5, training=False))
case("dropout", "p1", [randn(3, 4)], lambda a: nf.dropout(a, p=1.0), lambda a: F.dropout(a, p=1.0))

ALL = [c for cs in CASES.values() for c in cs]


# ----------------------------------------------------------------------------- running a case
def _tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def run_case(c: Case, dtype=np.float64):
    """Run both frameworks on one case; return [(what, npformer array, torch array)]."""
    xs = [np.asarray(x, dtype=dtype) for x in c.inputs]
    ours = [T(x, requires_grad=True) for x in xs]
    theirs = [torch.tensor(x, requires_grad=True) for x in xs]
    out_nf, out_th = _tuple(c.nf_fn(*ours)), _tuple(c.th_fn(*theirs))
    assert len(out_nf) == len(out_th), f"{c.id}: {len(out_nf)} outputs vs torch's {len(out_th)}"
    vrng = np.random.default_rng(99)
    vs = [vrng.standard_normal(tuple(o.shape)).astype(dtype) for o in out_th]
    for o, v in zip(out_nf, vs):               # one backward per output; leaf grads accumulate
        o.backward(T(v))
    torch.autograd.backward(list(out_th), [torch.tensor(v) for v in vs])
    pairs = []
    for i, (a, b) in enumerate(zip(out_nf, out_th)):
        assert a.dtype == dtype, f"{c.id}: output {i} has dtype {a.dtype}, expected {np.dtype(dtype)}"
        pairs.append((f"output {i}", host(a), b.detach().numpy()))
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a.grad is not None, f"{c.id}: input {i} got no gradient"
        pairs.append((f"grad of input {i}", host(a.grad), b.grad.numpy()))
    return pairs


def _check(c, dtype, rtol, atol):
    for what, a, b in run_case(c, dtype):
        assert a.shape == b.shape, f"{c.id} {what}: shape {a.shape} vs torch {b.shape}"
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f"{c.id} {what}")


# ----------------------------------------------------------------------------- tests
def test_every_op_has_a_torch_comparison():
    missing = set(nf.ops.OPS) - set(CASES)
    assert not missing, f"ops with no torch comparison in {__name__}: {sorted(missing)}"


@pytest.mark.parametrize("c", ALL, ids=[c.id for c in ALL])
def test_matches_torch_float64(c):
    _check(c, np.float64, RTOL, ATOL)


F32 = [c for c in ALL if c.f32]


@pytest.mark.parametrize("c", F32, ids=[c.id for c in F32])
def test_matches_torch_float32(c):
    _check(c, np.float32, RTOL32, c.atol32)


def test_float32_subset_is_representative():
    ops = {op for op, cs in CASES.items() if any(c.f32 for c in cs)}
    assert len(ops) >= 25, sorted(set(CASES) - ops)


@pytest.mark.parametrize("label, p", [("p0.3", 0.3), ("p0.9", 0.9)])
def test_dropout_mask_and_gradient(label, p):
    """The mask read off npformer's output drops about p of the elements, and grad = v * mask / (1 - p)."""
    (c,) = [c for c in CASES["dropout"] if c.id == f"dropout-{label}"]
    x = T(c.inputs[0], requires_grad=True)
    out = c.nf_fn(x)
    keep = DROPOUT_SEEN[label]["keep"]
    assert np.all(c.inputs[0] != 0)
    assert abs((1 - keep.mean()) - p) < 0.05, f"dropped fraction {1 - keep.mean():.3f} for p={p}"
    np.testing.assert_allclose(host(out), np.where(keep, c.inputs[0] / (1 - p), 0.0), rtol=RTOL, atol=ATOL)
    v = np.random.default_rng(5).standard_normal(keep.shape)
    out.backward(T(v))
    np.testing.assert_allclose(host(x.grad), v * keep / (1 - p), rtol=RTOL, atol=ATOL)


def test_dropout_identity_when_off():
    x = T(randn(3, 4), requires_grad=True)
    for out in (nf.dropout(x, p=0.0), nf.dropout(x, p=0.7, training=False)):
        np.testing.assert_array_equal(host(out), host(x))

