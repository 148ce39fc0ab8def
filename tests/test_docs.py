"""The documentation matches the code: every ``npformer ...`` command shown in a code block parses,
every ``npformer.x.y`` name written in backticks exists, every relative link reaches a file (and a
heading or anchor there), and the README's test command is the line that .ci/run runs.

The checks read README.md and docs/*.md as text; nothing is trained or run. Each helper below is
also exercised on a small broken example, so a check that silently stopped seeing anything would
fail too.
"""

import argparse
import contextlib
import importlib
import io
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from npformer.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARKER = "<!-- test-command"
FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")
SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}
NOT_SHELL = {"python", "py", "pycon", "json", "text", "console-output"}
MENTIONS_NPFORMER = re.compile(r"(?:^|[\s;&|$])npformer\s")          # `npformer:` starts a message


def doc_id(path: Path) -> str:
    return str(path.relative_to(REPO))


# ----------------------------------------------------------------------------- reading markdown

def split_fences(text: str):
    """(prose lines, [(info string, [code lines], first line number)]) of a markdown text."""
    prose, blocks, block = [], [], None
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if block is None and m:
            block = (m.group(2).lower(), [], number + 1, m.group(1))
        elif block is not None and line.strip().startswith(block[3]):
            blocks.append(block[:3])
            block = None
        elif block is not None:
            block[1].append(line)
        else:
            prose.append(line)
    assert block is None, f"a code block opened on line {block[2] - 1} is never closed"
    return prose, blocks


def shell_commands(lines: list) -> list:
    """The logical command lines of a shell code block that run `npformer`: continuations joined;
    when any line starts with a `$ ` prompt only those lines are commands (the others are their
    output); lines that do not mention the `npformer` command are left out."""
    prompted = any(line.lstrip().startswith("$ ") for line in lines)
    commands, pending = [], ""
    for line in lines:
        if not pending and not MENTIONS_NPFORMER.search(line):
            continue                                # a directory tree, a message, other programs
        stripped = line.strip()
        if prompted and not pending:
            if not stripped.startswith("$ "):
                continue                            # output
            stripped = stripped[2:]
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        commands.append(pending + stripped)
        pending = ""
    if pending:
        commands.append(pending)
    return commands


def npformer_invocations(command: str) -> list:
    """The argument lists (after `npformer`) of every `npformer` command in one shell line: the line
    is cut at &&, ||, ;, | and &; `# comments` and leading VAR=value assignments are dropped."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError as exc:
        raise AssertionError(f"cannot split {command!r} as a shell line: {exc}") from None
    found, segment = [], []
    for token in tokens + [";"]:
        if token not in SHELL_OPERATORS:
            segment.append(token)
            continue
        while segment and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", segment[0]):
            segment.pop(0)
        if segment and segment[0] == "npformer":
            found.append(segment[1:])
        segment = []
    return found


def subcommands(parser) -> dict:
    """{name: sub-parser} of the `npformer` parser."""
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def parse_error(argv: list):
    """None when `npformer argv` parses, else what argparse said (it exits 2 on a bad flag)."""
    parser = build_parser()
    for p in [parser, *subcommands(parser).values()]:
        p.allow_abbrev = False                      # the docs spell every flag in full
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code == 0 and ("-h" in argv or "--help" in argv):
            return None
        return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {exc.code}"
    return None


def inline_code(prose: list) -> list:
    """The text of every inline code span (`...`, ``...``) of the prose lines."""
    return [m.group(2) for m in re.finditer(r"(`+)(.+?)\1", "\n".join(prose))]


def dotted_names(spans: list) -> list:
    return sorted({m.group(0) for span in spans
                   for m in re.finditer(r"\bnpformer(?:\.[A-Za-z_][A-Za-z0-9_]*)+", span)})


def resolve(name: str):
    """Import the longest module prefix of a dotted name, then getattr the rest; raises if missing."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module_name.startswith(exc.name) and exc.name.startswith("npformer"):
                continue                            # not a module: an attribute of a shorter prefix
            raise
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(name)


LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(prose: list) -> list:
    """Every markdown link or image target in the prose, outside inline code."""
    text = re.sub(r"(`+)(.+?)\1", "", "\n".join(prose))
    return [m.group(1) for m in LINK.finditer(text)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    found, seen = set(), {}
    for line in prose:
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
        found.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", line))
    return found


def broken_link(doc: Path, target: str):
    """None when a relative link from `doc` reaches an existing file (and its anchor), else why not."""
    if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
        return None                                 # http:, https:, mailto:
    path, _, anchor = target.partition("#")
    dest = (doc.parent / path).resolve() if path else doc
    if not dest.exists():
        return f"{target}: no such file {dest.relative_to(REPO) if REPO in dest.parents else dest}"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        return f"{target}: {dest.name} has no heading or anchor '{anchor}'"
    return None


def readme_test_command(readme_text: str) -> str:
    """The README's test command by the rule .ci/run states: the first line of the first fenced
    block after the test-command marker."""
    lines = readme_text.splitlines()
    starts = [i for i, line in enumerate(lines) if MARKER in line]
    assert len(starts) == 1, f"README.md has {len(starts)} test-command markers; it needs exactly one"
    inside = False
    for line in lines[starts[0] + 1:]:
        if line.startswith("```"):
            if inside:
                return ""
            inside = True
        elif inside:
            return line
    return ""


def ci_command_line(readme: Path) -> str:
    """What .ci/run extracts from `readme`, by running its own awk program."""
    script = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    program = re.search(r"cmd=\$\(awk '([^']*)' README\.md\)", script)
    assert program, ".ci/run no longer extracts the command with `awk '...' README.md`; update test_docs.py"
    return subprocess.run(["awk", program.group(1), str(readme)], capture_output=True, text=True,
                          check=True).stdout.rstrip("\n")


# ----------------------------------------------------------------------------- the checks

@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_npformer_command_in_a_code_block_parses(doc):
    _, blocks = split_fences(doc.read_text(encoding="utf-8"))
    bad = []
    for info, lines, first in blocks:
        if info in NOT_SHELL:
            continue
        for command in shell_commands(lines):
            for argv in npformer_invocations(command):
                error = parse_error(argv)
                if error:
                    bad.append(f"{doc_id(doc)} (block at line {first}): npformer {shlex.join(argv)}\n    {error}")
    assert not bad, "commands the CLI refuses:\n" + "\n".join(bad)


def test_the_docs_show_every_command():
    """The README and the tutorials together show each subcommand at least once (so the parse check sees it)."""
    shown = set()
    for doc in DOCS:
        for info, lines, _ in split_fences(doc.read_text(encoding="utf-8"))[1]:
            if info not in NOT_SHELL:
                shown.update(argv[0] for c in shell_commands(lines) for argv in npformer_invocations(c) if argv)
    commands = set(subcommands(build_parser()))
    assert commands <= shown, f"never shown in a code block: {sorted(commands - shown)}"


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_dotted_npformer_name_resolves(doc):
    prose, _ = split_fences(doc.read_text(encoding="utf-8"))
    bad = []
    for name in dotted_names(inline_code(prose)):
        try:
            resolve(name)
        except (ImportError, AttributeError) as exc:
            bad.append(f"{name}: {type(exc).__name__}: {exc}")
    assert not bad, f"{doc_id(doc)} names what does not exist:\n" + "\n".join(bad)


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_relative_link_reaches_a_file(doc):
    prose, _ = split_fences(doc.read_text(encoding="utf-8"))
    bad = [why for why in (broken_link(doc, t) for t in links(prose)) if why]
    assert not bad, f"{doc_id(doc)} has broken links:\n" + "\n".join(bad)


def test_readme_test_command_is_what_ci_runs():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    line = readme_test_command(text)
    assert "pytest" in line, f"the line after the test-command marker does not run pytest: {line!r}"
    if shutil.which("awk"):
        assert ci_command_line(REPO / "README.md") == line


CODE_DIRS = ("npformer", "tests", "benchmarks", "scripts")
# a span of inline code that is one code name: snake_case with a last part of 3+ characters (so
# that math such as `a_j` or `scale_m` is left alone), or CamelCase; optionally called, `name()`
CODE_NAME = re.compile(r"^(_?[a-z][a-z0-9]*(?:_[a-z0-9]+)*_[a-z0-9]{3,}|[A-Z][a-z0-9]+(?:[A-Z][a-z0-9]*)+)(?:\(\))?$")
# a span that is a path in the repository, optionally with a test: `tests/test_cli.py::test_x`
REPO_PATH = re.compile(r"^((?:npformer|tests|benchmarks|scripts|docs|\.ci)/[\w./-]+)(?:::(\w+))?$")


def code_text() -> str:
    """The project's Python source, less this file (whose examples name what does not exist)."""
    return "\n".join(p.read_text(encoding="utf-8") for d in CODE_DIRS for p in (REPO / d).rglob("*.py")
                     if p.resolve() != Path(__file__).resolve())


def missing_names(spans: list, code: str) -> list:
    """The code names among `spans` that appear nowhere in the code (a renamed or deleted function)."""
    names = [m.group(1) for m in (CODE_NAME.match(s.strip()) for s in spans) if m]
    return sorted({n for n in names if not re.search(rf"\b{re.escape(n)}\b", code)})


def missing_paths(spans: list) -> list:
    """Repository paths (and `file::test` citations) among `spans` that do not exist."""
    bad = []
    for m in (REPO_PATH.match(s.strip()) for s in spans):
        if not m or "*" in m.group(1):
            continue
        path = REPO / m.group(1)
        if not path.exists():
            bad.append(m.group(0))
        elif m.group(2) and not re.search(rf"^def {m.group(2)}\b", path.read_text(encoding="utf-8"), re.M):
            bad.append(m.group(0))
    return bad


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_code_name_and_path_cited_exists(doc):
    prose, _ = split_fences(doc.read_text(encoding="utf-8"))
    spans = inline_code(prose)
    bad = missing_names(spans, code_text()) + missing_paths(spans)
    assert not bad, f"{doc_id(doc)} cites what does not exist: {bad}"


def test_the_readme_layout_lists_every_package():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    table = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`(npformer/[\w/]+?)/?`", table))
    packages = {str(p.parent.relative_to(REPO)) for p in (REPO / "npformer").rglob("__init__.py")} - {"npformer"}
    assert packages <= listed, f"packages missing from the README's layout table: {sorted(packages - listed)}"


def test_a_marker_the_readme_tells_to_select_selects_tests():
    """`pytest -m NAME` in the README must select at least one test (it once selected none)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    for marker in sorted(set(re.findall(r"pytest[^`\n]*?-m\s+(\w+)", text))):
        # collecting only the files that name the marker keeps this fast; a marker applied some other way
        # (a conftest hook, a variable) would select nothing here and fail the test, which says so
        files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                       if re.search(rf"mark\.{marker}\b", p.read_text(encoding="utf-8")))
        assert files, f"the README tells to run `-m {marker}` but no test file uses pytest.mark.{marker}"
        found = subprocess.run(["python", "-m", "pytest", "--collect-only", "-q", "-m", marker,
                                "-p", "no:cacheprovider", *files], cwd=REPO, capture_output=True, text=True)
        assert re.search(r"^\d+(/\d+)? tests? (collected|selected)", found.stdout, re.M) and found.returncode == 0, \
            f"the README tells to run `-m {marker}` but it selects no test"


# ----------------------------------------------------------------------------- the checks can fail

def test_the_helpers_catch_broken_examples(tmp_path):
    # (a) a bad flag, a bad value, a missing required flag; output lines and prompts are handled
    block = ["$ npformer pretrain --n-embd 64 \\", "    --resume   # continue", "npformer: error: x",
             "$ OMP_NUM_THREADS=1 npformer seq2seq --task dates && npformer translate --ckpt d 2026-1-5"]
    argvs = [a for c in shell_commands(block) for a in npformer_invocations(c)]
    assert argvs == [["pretrain", "--n-embd", "64", "--resume"], ["seq2seq", "--task", "dates"],
                     ["translate", "--ckpt", "d", "2026-1-5"]]
    assert all(parse_error(a) is None for a in argvs)
    assert "unrecognized arguments: --n-embed" in parse_error(["pretrain", "--n-embed", "64"])
    assert "unrecognized arguments: --max-new-token" in parse_error(["generate", "--ckpt", "d", "--max-new-token", "5"])
    assert "invalid int value" in parse_error(["pretrain", "--max-iters", "1e3"])
    assert "--ckpt" in parse_error(["generate", "--prompt", "x"])
    # (b) a misspelt name
    names = dotted_names(inline_code(["see `npformer.training.workers.ShardWorkers(model, n)` and",
                                      "`npformer.nn.Linaer`"]))
    assert names == ["npformer.nn.Linaer", "npformer.training.workers.ShardWorkers"]
    resolve(names[1])
    with pytest.raises(AttributeError):
        resolve(names[0])
    with pytest.raises((ImportError, AttributeError)):
        resolve("npformer.trainin.pretrain")
    # (c) a missing file, a missing anchor; an existing one and a web address pass
    doc = REPO / "docs" / "pretraining.md"
    assert broken_link(doc, "seq2seq.md") is None and broken_link(doc, "https://example.org/x") is None
    assert broken_link(doc, "performance.md#cpu-threads") is None
    assert "no such file" in broken_link(doc, "../npformer/training/pretrian.py")
    assert "no heading or anchor" in broken_link(doc, "performance.md#cpu-thread")
    assert links(["a [link](x.md#y) and ![img](p.png \"t\") but not `[code](z.md)`"]) == ["x.md#y", "p.png"]
    # (d) the marker rule: the first line of the first block after the marker
    readme = "intro\n```bash\nnot this\n```\n<!-- test-command: x -->\n```bash\npython -m pytest -q\n```\n"
    assert readme_test_command(readme) == "python -m pytest -q"
    broken = readme.replace("<!-- test-command: x -->\n", "")
    with pytest.raises(AssertionError, match="0 test-command markers"):
        readme_test_command(broken)
    if shutil.which("awk"):
        (tmp_path / "README.md").write_text(readme, encoding="utf-8")
        assert ci_command_line(tmp_path / "README.md") == "python -m pytest -q"


def test_the_name_and_path_checks_catch_broken_examples():
    code = "def collect_leaf_grads(sink=None):\nclass ShardWorkers:\n"
    spans = ["collect_leaf_grads", "_causal_blocks", "ShardWorkers", "ShardWorker", "a_j", "scale_m",
             "tests/test_cli.py", "tests/test_cli.py::test_no_such_test", "npformer/nope.py", "docs/*.png"]
    assert missing_names(spans, code) == ["ShardWorker", "_causal_blocks"]
    assert missing_paths(spans) == ["tests/test_cli.py::test_no_such_test", "npformer/nope.py"]
