"""The array backend (npformer/backend.py): devices, array modules, erf, scatter-add, generators,
device-mismatch errors, and the CuPy guard: a scan of npformer's source that checks every array
function, array method and keyword it uses exists in CuPy (runs on the CPU; needs cupy importable).
"""

import ast
import importlib
import inspect
import math
import pathlib
import re
import types
from typing import NamedTuple

import numpy as np
import pytest

import npformer as nf
from npformer import backend
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
#
# scan_source reads a module's syntax tree and records each use, with the keyword names passed:
#   module     NAME on an array module: xp.NAME, a.xp.NAME, _cupy.NAME, get_array_module(...).NAME,
#              or a name bound to one (dotted chains kept: "random.default_rng"); cupyx: cupyx.NAME
#   method     NAME on an expression that is surely an array: t.data, t.grad, a backward's gradient
#              g, the result of an array-module function or array method, arithmetic on arrays,
#              and names bound to any of these in the same or an enclosing function
#   generator  NAME on a device random generator (rng, generator, default_generator(...), ...)
# cupy_problems then asks CuPy whether each NAME exists and accepts each keyword.

_MODULE_NAMES = {"xp", "_cupy", "cupy"}          # always an array module
_MODULE_FACTORIES = {"get_array_module", "xp_for", "_xp", "_import_cupy"}
_ARRAY_NAMES = {"g", "grad", "pg"}              # gradients, by the engine's convention
_GENERATOR_NAMES = {"rng", "generator"}
_GENERATOR_FACTORIES = {"default_generator", "Generator", "default_rng"}   # not np.random.default_rng
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)


class Use(NamedTuple):
    where: str             # "file:line"
    kind: str              # "module", "cupyx", "method" or "generator"
    name: str
    keywords: frozenset


def _callee(func):
    return func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)


def _own_nodes(body):
    """The nodes of one scope; nested functions and classes are yielded but not entered."""
    stack = list(body)
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, _SCOPES):
            stack.extend(ast.iter_child_nodes(node))


class _Scanner:
    def __init__(self, filename):
        self.filename, self.uses = filename, set()

    # env maps a local name to "module", "array", "generator" or None (something else)
    def is_module(self, n, env):
        if isinstance(n, ast.Attribute):
            return n.attr in ("xp", "_cupy")
        if isinstance(n, ast.Call):
            return _callee(n.func) in _MODULE_FACTORIES
        return isinstance(n, ast.Name) and (n.id in _MODULE_NAMES or env.get(n.id) == "module")

    def is_generator(self, n, env):
        if isinstance(n, ast.Call):
            base = n.func
            while isinstance(base, ast.Attribute):
                base = base.value
            return _callee(n.func) in _GENERATOR_FACTORIES and getattr(base, "id", "") not in ("np", "numpy")
        if isinstance(n, ast.IfExp):
            return self.is_generator(n.body, env) or self.is_generator(n.orelse, env)
        return isinstance(n, ast.Name) and env.get(n.id, "generator" if n.id in _GENERATOR_NAMES else None) == "generator"

    def module_chain(self, n, env):
        """("module" or "cupyx", "a.b") for xp.a.b or cupyx.a.b; None otherwise."""
        attrs = []
        while isinstance(n, ast.Attribute):
            attrs.insert(0, n.attr)
            if self.is_module(n.value, env):
                return "module", ".".join(attrs)
            if getattr(n.value, "id", None) == "cupyx":
                return "cupyx", ".".join(attrs)
            n = n.value
        return None

    def is_array(self, n, env):
        if isinstance(n, ast.Name):
            return env.get(n.id, "array" if n.id in _ARRAY_NAMES else None) == "array"
        if isinstance(n, ast.Attribute):
            return n.attr in ("data", "grad") or (n.attr == "T" and self.is_array(n.value, env))
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute):
            chain = self.module_chain(n.func, env)
            if chain:
                return chain[0] == "module" and chain[1].split(".")[0] not in ("random", "cuda")
            return self.is_generator(n.func.value, env) or (
                self.is_array(n.func.value, env) and n.func.attr not in ("item", "tolist"))
        parts = {ast.Subscript: ["value"], ast.BinOp: ["left", "right"], ast.UnaryOp: ["operand"],
                 ast.Compare: ["left"], ast.IfExp: ["body", "orelse"]}.get(type(n), [])
        return any(self.is_array(getattr(n, p), env) for p in parts)

    def kind_of(self, n, env):
        return next((k for k, test in (("module", self.is_module), ("generator", self.is_generator),
                                       ("array", self.is_array)) if test(n, env)), None)

    def scope(self, body, env, params=(), host=()):
        env = dict(env)
        for p in params:           # a parameter hides an outer name; g, xp, rng keep their meaning
            env[p] = "module" if p in _MODULE_NAMES else "array" if p in _ARRAY_NAMES else \
                "generator" if p in _GENERATOR_NAMES and p not in host else None
        nodes = list(_own_nodes(body))
        pairs = []                 # (target name, assigned expression)
        for n in nodes:
            if isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and n.value is not None:
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target]):
                    if isinstance(t, ast.Tuple) and isinstance(n.value, ast.Tuple) and len(t.elts) == len(n.value.elts):
                        pairs += [(a.id, v) for a, v in zip(t.elts, n.value.elts) if isinstance(a, ast.Name)]
                    elif isinstance(t, ast.Name):
                        pairs.append((t.id, n.value))
        changed = True
        while changed:             # bind names until nothing changes; a known kind is never undone
            changed = False
            for name, value in pairs:
                kind = None if env.get(name) else self.kind_of(value, env)
                if not env.get(name) and (kind or name not in env):
                    env[name], changed = kind, True
        calls = set()
        for n in nodes:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                a = n.args
                args = [x for x in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg] if x]
                # a parameter annotated as np.random.Generator is a host generator: not checked
                host = {x.arg for x in args if x.annotation is not None
                        and ast.unparse(x.annotation).endswith("random.Generator")}
                self.scope(n.body if isinstance(n.body, list) else [n.body], env, [x.arg for x in args], host)
            elif isinstance(n, ast.ClassDef):
                self.scope(n.body, env)
            elif isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute):
                calls.add(id(n.func))
                self.record(n.func, env, frozenset(k.arg for k in n.keywords if k.arg))
        for n in nodes:
            if isinstance(n, ast.Attribute) and id(n) not in calls:
                self.record(n, env, frozenset())

    def record(self, attr, env, keywords):
        where = f"{self.filename}:{attr.lineno}"
        chain = self.module_chain(attr, env)
        if chain:
            self.uses.add(Use(where, chain[0], chain[1], keywords))
        elif self.is_array(attr.value, env):
            self.uses.add(Use(where, "method", attr.attr, keywords))
        elif self.is_generator(attr.value, env):
            self.uses.add(Use(where, "generator", attr.attr, keywords))


def scan_source(source, filename):
    """Every Use in one module's source text, in line order."""
    scanner = _Scanner(filename)
    scanner.scope(ast.parse(source).body, {})
    return sorted(scanner.uses, key=lambda u: (int(u.where.rsplit(":", 1)[1]), u.name, sorted(u.keywords)))


def scan_package():
    root = pathlib.Path(nf.__file__).parent
    return [u for path in sorted(root.rglob("*.py"))
            for u in scan_source(path.read_text(), str(path.relative_to(root.parent)))]


def parameters(obj):
    """(names that can be passed by keyword, accepts **kwargs) of a callable; None if unreadable.

    From inspect.signature, else from the signature Cython puts on the first
    docstring line of CuPy's array methods ("_ndarray_base.sum(self, axis=None, ...)").
    """
    try:
        ps = inspect.signature(obj).parameters.values()
        return ({p.name for p in ps if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)},
                any(p.kind == p.VAR_KEYWORD for p in ps))
    except (TypeError, ValueError):
        pass
    m = re.match(r"[\w.]+\((.*)\)", (getattr(obj, "__doc__", None) or "").lstrip().split("\n", 1)[0])
    if not m:
        return None
    parts = [p.split("=", 1)[0].split(":", 1)[0].strip() for p in m.group(1).split(",")]
    return ({p.split()[-1] for p in parts if p and p[0] != "*" and p not in ("/", "self")},
            any(p.startswith("**") for p in parts))


def _ufunc_rejects(ufunc, keyword):
    """Whether a CuPy ufunc refuses `keyword` (it checks keywords before it touches a GPU)."""
    try:
        ufunc(*([0.0] * ufunc.nin), **{keyword: None})
    except TypeError as exc:
        return "Wrong arguments" in str(exc)
    except Exception:          # the keyword was accepted; the call failed later (no CUDA device)
        pass
    return False


def _resolve(module, dotted):
    obj = module
    for i, part in enumerate(dotted.split(".")):
        if not hasattr(obj, part):                 # a submodule not imported yet (cupyx.scipy)
            try:
                importlib.import_module(".".join([module.__name__] + dotted.split(".")[:i + 1]))
            except ImportError:
                return None
        obj = getattr(obj, part, None)
    return obj


def cupy_problems(uses):
    """One line per use of a name CuPy lacks, or of a keyword its function or method refuses."""
    import cupy
    import cupyx
    found = []
    for u in uses:
        if u.kind in ("module", "cupyx"):
            label = "xp" if u.kind == "module" else "cupyx"
            obj, owner = _resolve(cupy if u.kind == "module" else cupyx, u.name), f"{label}.{u.name}"
        else:                                      # only NumPy's own array/generator names are ours to check
            np_cls, cp_cls = (np.ndarray, cupy.ndarray) if u.kind == "method" else \
                (np.random.Generator, cupy.random.Generator)
            if not hasattr(np_cls, u.name):
                continue
            obj, owner = getattr(cp_cls, u.name, None), f"{'array' if u.kind == 'method' else u.kind}.{u.name}"
        if obj is None:
            found.append(f"{u.where}: {owner}: not in CuPy")
            continue
        params = parameters(obj)
        for kw in sorted(u.keywords):
            if _ufunc_rejects(obj, kw) if isinstance(obj, cupy.ufunc) else \
                    params is not None and not params[1] and kw not in params[0]:
                found.append(f"{u.where}: {owner}({kw}=): CuPy's {u.name} takes no keyword {kw!r}")
    return found


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
