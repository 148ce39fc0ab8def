"""CPU/GPU parity: every op in npformer.ops.OPS gives the same float64 outputs and gradients on
NumPy and on CuPy (rtol 1e-10).

The parity tests need a GPU and skip without one (set NPFORMER_REQUIRE_GPU=1 to
make that a failure, as scripts/gpu_check.sh does). Two checks run everywhere:
every op in OPS has a case here, and every case runs on the CPU and gives a
finite gradient to each of its inputs.
"""

import os

import numpy as np
import pytest

import npformer as nf
from npformer import backend
from npformer.ops import OPS
from tests.helpers import host

RTOL, ATOL = 1e-10, 1e-12
pytestmark = pytest.mark.usefixtures("ops_path")   # every comparison on the reference and the fast path


def _on(device, a):
    """A constant (indices, targets, masks) on `device`."""
    return backend.to_device(np.asarray(a), device)


class _FixedUniform:
    """A stand-in generator whose uniform draws are the same on every device (dropout's mask)."""

    def __init__(self, device):
        self.device = device

    def random(self, shape, dtype=np.float64):
        return _on(self.device, np.random.default_rng(2).random(shape).astype(dtype))


def _cases():
    """name -> (float64 host inputs that get gradients, fn(device, *tensors) -> Tensor or tuple)."""
    r = np.random.default_rng(0)
    n = lambda *s: r.standard_normal(s)          # noqa: E731
    pos = lambda *s: r.uniform(0.5, 2.0, s)      # noqa: E731
    mask, pick = r.random((3, 4)) > 0.5, r.random((5, 3)) > 0.5     # drawn once: same on every device
    return {
        "abs": ([n(3, 4)], lambda d, a: nf.abs(a)),
        "astype": ([n(3, 4)], lambda d, a: nf.astype(nf.astype(a, np.float32), np.float64)),
        "add": ([n(3, 4), n(4)], lambda d, a, b: a + b),
        "concatenate": ([n(2, 3), n(1, 3)], lambda d, a, b: nf.concatenate([a, b], axis=0)),
        "cross_entropy": ([n(4, 5), n(2, 3, 4)], lambda d, x, y: (
            nf.cross_entropy(x, _on(d, [0, 4, -100, 2]), label_smoothing=0.1),
            nf.cross_entropy(y, _on(d, [[0, 2, 1, 1], [2, 2, 0, 1]]), reduction="none"))),
        "div": ([n(3, 4), pos(3, 4)], lambda d, a, b: a / b),
        "dropout": ([n(4, 6)], lambda d, a: nf.dropout(a, 0.3, generator=_FixedUniform(d))),
        "embedding": ([n(6, 3)], lambda d, w: nf.embedding(w, _on(d, [[0, 5, 5], [2, 0, 1]]))),
        "exp": ([n(3, 4)], lambda d, a: nf.exp(a)),
        "expand": ([n(3, 1)], lambda d, a: nf.expand(a, (2, 3, 4))),
        "gelu": ([n(3, 4)], lambda d, a: (nf.gelu(a), nf.gelu(a, approximate="tanh"))),
        "silu": ([n(3, 4)], lambda d, a: nf.silu(a * 5)),
        "getitem": ([n(5, 3)], lambda d, a: (a[_on(d, [0, 3, 3, 1])], a[1:4, ::2], a[_on(d, pick)])),
        "layer_norm": ([n(2, 3, 4), n(4), n(4)], lambda d, a, w, b: nf.layer_norm(a, 4, weight=w, bias=b)),
        "rms_norm": ([n(2, 3, 4), n(4)], lambda d, a, w: (nf.rms_norm(a, 4, w), nf.rms_norm(a, (3, 4), eps=1e-3))),
        "log": ([pos(3, 4)], lambda d, a: nf.log(a)),
        "log_softmax": ([n(3, 5)], lambda d, a: (nf.log_softmax(a, axis=-1), nf.log_softmax(a, axis=0))),
        "masked_fill": ([n(3, 4)], lambda d, a: nf.masked_fill(a, _on(d, mask), -1.5)),
        "attention": ([n(2, 3, 4), n(2, 5, 4), n(2, 5, 3)],
                      lambda d, q, k, v: (nf.attention(q, k, v), nf.attention(q, k, v, _on(d, np.tri(3, 5, dtype=bool))),
                                                         nf.attention(q, k, v, causal=True))),
        # T = 130: the fast path takes its causal blocks (CAUSAL_BLOCK = 64) on both devices
        "self_attention": ([n(2, 130, 12)], lambda d, x: (nf.self_attention(x, 2, causal=True),
                                                          nf.self_attention(x[:, :5, :6], 2))),
        "linear": ([n(2, 3, 4), n(5, 4), n(5)], lambda d, x, w, b: (nf.linear(x, w, b), nf.linear(x, w))),
        "matmul": ([n(2, 3, 4), n(4, 5), n(4)], lambda d, a, b, v: (a @ b, a @ v, v @ b)),
        "max": ([n(3, 4)], lambda d, a: (a.max(axis=1), a.max())),
        "maximum": ([n(3, 4), n(4)], lambda d, a, b: nf.maximum(a, b)),
        "mean": ([n(3, 4)], lambda d, a: (a.mean(axis=0), a.mean(axis=1, keepdims=True))),
        "minimum": ([n(3, 4), n(4)], lambda d, a, b: nf.minimum(a, b)),
        "mul": ([n(3, 4), n(3, 1)], lambda d, a, b: a * b),
        "neg": ([n(3, 4)], lambda d, a: -a),
        "permute": ([n(2, 3, 4)], lambda d, a: nf.permute(a, (2, 0, 1))),
        "pow": ([pos(3, 4), n(3, 4)], lambda d, a, b: a ** b),
        "relu": ([n(3, 4)], lambda d, a: nf.relu(a)),
        "reshape": ([n(2, 6)], lambda d, a: nf.reshape(a, (3, -1))),
        "sigmoid": ([n(3, 4)], lambda d, a: nf.sigmoid(a)),
        "softmax": ([n(3, 5)], lambda d, a: (nf.softmax(a, axis=-1), nf.softmax(a, axis=0))),
        "split": ([n(5, 2)], lambda d, a: nf.split(a, [2, 3], axis=0)),
        "sqrt": ([pos(3, 4)], lambda d, a: nf.sqrt(a)),
        "stack": ([n(2, 3), n(2, 3)], lambda d, a, b: nf.stack([a, b], axis=1)),
        "sub": ([n(3, 4), n(4)], lambda d, a, b: a - b),
        "sum": ([n(2, 3, 4)], lambda d, a: (a.sum(axis=(0, 2), keepdims=True), a.sum())),
        "tanh": ([n(3, 4)], lambda d, a: nf.tanh(a)),
        "transpose": ([n(2, 3, 4)], lambda d, a: nf.transpose(a, 0, 2)),
        "var": ([n(3, 4)], lambda d, a: (a.var(axis=1), a.var(correction=0))),
        "where": ([n(3, 4), n(4)], lambda d, a, b: nf.where(_on(d, mask), a, b)),
    }


CASES = _cases()


def _run(name, device):
    """Outputs and input gradients (host float64 arrays) of one case on `device`.

    Each output o is back-propagated with a fixed random cotangent shaped like o.
    """
    inputs, fn = CASES[name]
    ts = [nf.Tensor(_on(device, x), requires_grad=True) for x in inputs]
    out = fn(device, *ts)
    outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    r = np.random.default_rng(1)
    for o in outs:
        o.backward(_on(device, r.standard_normal(o.shape)), retain_graph=True)
    return [host(o) for o in outs], [None if t.grad is None else host(t.grad) for t in ts]


def test_every_op_has_a_parity_case():
    missing = sorted(set(OPS) - set(CASES))
    assert not missing, f"ops without a CPU/GPU parity case in tests/test_gpu_parity.py: {missing}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_case_runs_on_cpu(name):
    outs, grads = _run(name, "cpu")
    for o in outs:
        assert o.dtype == np.float64 and np.isfinite(o).all()
    for x, g in zip(CASES[name][0], grads):
        assert g is not None and g.shape == x.shape and np.isfinite(g).all() and np.abs(g).max() > 0
    again_outs, again_grads = _run(name, "cpu")      # a case must not draw new data per run
    for a, b in zip(outs + grads, again_outs + again_grads):
        np.testing.assert_array_equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(OPS))
def test_cpu_gpu_parity(name):
    if not backend.gpu_available():
        reason = backend.gpu_unavailable_reason()
        if os.environ.get("NPFORMER_REQUIRE_GPU"):
            pytest.fail(f"NPFORMER_REQUIRE_GPU is set but {reason}")
        pytest.skip(f"CPU/GPU parity needs a GPU: {reason}")
    if name not in CASES:
        pytest.fail(f"op {name!r} has no parity case in tests/test_gpu_parity.py")
    cpu_outs, cpu_grads = _run(name, "cpu")
    gpu_outs, gpu_grads = _run(name, "gpu")
    for i, (c, g) in enumerate(zip(cpu_outs, gpu_outs)):
        assert g.dtype == c.dtype, f"{name}: output {i} is {g.dtype} on gpu, {c.dtype} on cpu"
        np.testing.assert_allclose(g, c, rtol=RTOL, atol=ATOL, err_msg=f"{name}: output {i}")
    for i, (c, g) in enumerate(zip(cpu_grads, gpu_grads)):
        np.testing.assert_allclose(g, c, rtol=RTOL, atol=ATOL, err_msg=f"{name}: gradient of input {i}")
