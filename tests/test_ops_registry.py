"""Every public op (npformer.ops.OPS) has a gradient test.

Each tests/test_ops_*.py module declares COVERED_OPS, the set of op names it
gradient-checks. This test fails, listing the names, when an op in OPS is
declared nowhere, when a declared name is not an op, or when two modules
claim the same op (an op is declared only where it is gradient-checked).
"""

import importlib
import pathlib
import re

from npformer.ops import OPS

HERE = pathlib.Path(__file__).parent
MODULES = sorted(p.stem for p in HERE.glob("test_ops_*.py") if p.stem != "test_ops_registry")


def _declared():
    """{module name: COVERED_OPS} for every op test module."""
    out = {}
    for name in MODULES:
        module = importlib.import_module(f"tests.{name}")
        assert isinstance(getattr(module, "COVERED_OPS", None), set), f"tests/{name}.py has no COVERED_OPS set"
        out[name] = module.COVERED_OPS
    return out


def test_every_op_has_a_gradient_test():
    covered = set().union(*_declared().values())
    missing = sorted(set(OPS) - covered)
    assert not missing, f"ops with no gradient test (add them to a COVERED_OPS after gradchecking them): {missing}"


def test_declared_names_are_ops_and_declared_once():
    seen = {}
    for module, names in _declared().items():
        unknown = sorted(names - set(OPS))
        assert not unknown, f"tests/{module}.py declares names that are not ops: {unknown}"
        for n in names:
            assert n not in seen, f"{n!r} is declared by both tests/{seen[n]}.py and tests/{module}.py"
            seen[n] = module


def test_declaring_modules_gradcheck_what_they_declare():
    """A module that declares an op calls gradcheck and calls that op (as nf.<op>). A module that
    checks no op's gradient (errors only, or the shared machinery) declares COVERED_OPS = set()."""
    for module, names in _declared().items():
        if not names:
            continue
        source = (HERE / f"{module}.py").read_text()
        assert "gradcheck" in source, f"tests/{module}.py declares ops but never runs gradcheck"
        uncalled = sorted(n for n in names if not re.search(rf"\bnf\.{n}\b", source))
        assert not uncalled, f"tests/{module}.py declares {uncalled} but never calls them as nf.<op>"


def test_modules_are_found():
    """The glob finds the op test modules (a renamed directory would make the checks above vacuous)."""
    assert len(MODULES) >= 6 and "test_ops_fused" in MODULES
