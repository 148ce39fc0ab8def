"""Mutation testing: plant one-line bugs in the engine, the ops and the optimizers; count what the tests kill.

Runs mutmut (``pip install -e '.[mutation]'``) on a copy of the tree, so the working tree is never
touched and edits made meanwhile do not disturb a run. Writes the kill rate and every surviving
mutant (its diff) to a Markdown report. A full run over the defaults takes hours; pass the
files to mutate and a time limit:

    python scripts/mutation.py npformer/ops/reduction.py --time-limit 900
    python scripts/mutation.py npformer/optim/adamw.py --tests tests/test_optim.py
    python scripts/mutation.py                      # npformer/ops, npformer/autograd.py, npformer/optim

A mutant is "killed" when a test fails, "survived" when the selected tests all pass, "timeout"
when the tests ran past mutmut's limit (counted as killed: the bug is seen), and "no tests" when
no selected test runs the mutated function. See docs/testing.md for the last recorded results.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PATHS = ["npformer/ops/*.py", "npformer/autograd.py", "npformer/optim/*.py"]
# The fast subset that guards those files (about a minute for the whole suite; this is seconds).
DEFAULT_TESTS = ["tests/test_ops_activations.py", "tests/test_ops_attention.py", "tests/test_ops_dtype.py",
                 "tests/test_ops_elementwise.py", "tests/test_ops_fused.py", "tests/test_ops_linalg.py",
                 "tests/test_ops_reduction.py", "tests/test_ops_shape.py", "tests/test_ops_registry.py",
                 "tests/test_fast.py", "tests/test_ops_core.py", "tests/test_ops_fused_errors.py",
                 "tests/test_ops_attention_errors.py", "tests/test_attention_bias.py", "tests/test_backend.py",
                 "tests/test_grad_properties.py", "tests/test_autograd.py",
                 "tests/test_autograd_inputs.py", "tests/test_tensor.py", "tests/test_gradcheck.py",
                 "tests/test_optim.py", "tests/test_optim_errors.py", "tests/test_optim_formulas.py",
                 "tests/test_optim_state.py"]
KILLED = {"killed", "timeout", "segfault"}       # the tests saw the bug (mutmut's statuses)


def mutmut_version() -> str:
    from importlib.metadata import version
    return version("mutmut")


def undecorate(source: str) -> str:
    """The same module with each top-level ``@name`` decorator applied after its function instead
    (``def f ... ; f = register(f)``): mutmut 3 leaves decorated functions unmutated, and every op
    is registered by a decorator. Decorators with arguments are left as they are."""
    lines = source.splitlines(keepends=True)
    edits = []                                   # (first decorator line, def line, last line, name, decorators)
    for node in ast.parse(source).body:
        decs = getattr(node, "decorator_list", None)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and decs and \
                all(isinstance(d, (ast.Name, ast.Attribute)) for d in decs):
            edits.append((decs[0].lineno, node.lineno, node.end_lineno, node.name,
                          [ast.get_source_segment(source, d) for d in decs]))
    for first, def_line, last, name, decs in reversed(edits):
        applied = "".join(f"{name} = {d}({name})\n" for d in reversed(decs))
        lines[last:last] = [applied]
        del lines[first - 1:def_line - 1]
    return "".join(lines)


def prepare(workdir: Path, paths: list[str], tests: list[str]) -> None:
    """Copy the package and the tests into `workdir` and write mutmut's configuration there."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis")
    shutil.copytree(ROOT / "npformer", workdir / "npformer", ignore=ignore)
    for path in (workdir / "npformer").rglob("*.py"):
        path.write_text(undecorate(path.read_text()))
    shutil.copytree(ROOT / "tests", workdir / "tests", ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", workdir / "pyproject.toml")
    lines = ["[mutmut]", "source_paths = npformer", "only_mutate ="] + [f"    {p}" for p in paths]
    lines += ["pytest_add_cli_args_test_selection ="] + [f"    {t}" for t in tests]
    lines += ["pytest_add_cli_args =", "    -p", "    no:cacheprovider", ""]
    (workdir / "setup.cfg").write_text("\n".join(lines))


def run_mutmut(workdir: Path, time_limit: float, children: int) -> tuple[bool, float]:
    """`mutmut run` in `workdir`, stopped after `time_limit` seconds. Returns (finished, seconds)."""
    env = dict(os.environ, NPFORMER_DEVICE="cpu")        # mutmut puts its mutated copy first on sys.path
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "mutmut", "run", "--max-children", str(children)],
                            cwd=workdir, env=env, start_new_session=True)
    try:
        proc.wait(timeout=time_limit)
        finished = proc.returncode == 0
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)      # the run's own process group (its workers too)
        proc.wait()
        finished = False
    return finished, time.monotonic() - start


def results(workdir: Path) -> dict[str, str]:
    """{mutant name: status} from `mutmut results --all true`."""
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=workdir,
                         capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\S+): (.+)$", line)
        if m:
            found[m.group(1)] = m.group(2).strip()
    return found


def show(workdir: Path, name: str) -> str:
    return subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=workdir,
                          capture_output=True, text=True).stdout.strip()


def report(workdir, paths, tests, status, finished, seconds) -> str:
    counts = {}
    for s in status.values():
        counts[s] = counts.get(s, 0) + 1
    checked = {n: s for n, s in status.items() if s in KILLED or s == "survived"}
    killed = sum(s in KILLED for s in checked.values())
    rate = f"{100 * killed / len(checked):.1f}%" if checked else "n/a"
    survivors = sorted(n for n, s in status.items() if s == "survived")
    out = [f"# Mutation run: mutmut {mutmut_version()}", "",
           f"- mutated: {' '.join(paths)}", f"- tests: {' '.join(tests)}",
           f"- {'finished' if finished else 'stopped at the time limit'} after {seconds:.0f} s",
           f"- mutants: {len(status)}; " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())),
           f"- kill rate: {killed}/{len(checked)} = {rate} (killed or timed out, of those checked)", ""]
    if survivors:
        out += ["## Surviving mutants", ""]
        for name in survivors:
            out += [f"### {name}", "", "```diff", show(workdir, name), "```", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", default=DEFAULT_PATHS,
                        help="files (globs) to mutate, relative to the repository root")
    parser.add_argument("--tests", nargs="+", default=DEFAULT_TESTS, help="the test files to run on each mutant")
    parser.add_argument("--time-limit", type=float, default=900.0, help="seconds before the run is stopped")
    parser.add_argument("--children", type=int, default=os.cpu_count() or 1, help="mutants tested at once")
    parser.add_argument("--out", default="mutation-report.md", help="where to write the report")
    parser.add_argument("--workdir", help="run here (kept) instead of in a temporary folder (removed)")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("mutmut") is None:
        parser.error("mutmut is not installed: pip install -e '.[mutation]'")

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="npformer-mutation-"))
    try:
        if args.workdir and workdir.exists():
            shutil.rmtree(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        prepare(workdir, args.paths, args.tests)
        finished, seconds = run_mutmut(workdir, args.time_limit, args.children)
        text = report(workdir, args.paths, args.tests, results(workdir), finished, seconds)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    Path(args.out).write_text(text + "\n")
    print(text.split("\n## ")[0])
    print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
