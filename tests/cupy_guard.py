"""The CuPy guard: which array API npformer's source uses, and whether CuPy has it.

CuPy installs and imports without a GPU, so tests/test_backend.py runs this on the CPU:
every array-module function, array method and generator method that npformer calls must
exist in CuPy and accept the keywords npformer passes.
"""

import ast
import importlib
import inspect
import pathlib
import re
from typing import NamedTuple

import numpy as np

import npformer as nf

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
