"""Ranks that fail together: one message for the whole run, never a rank left waiting.

A rank that raises while the others wait in a collective call would leave them waiting forever.
Two rules prevent it:

- ``together(comm)``: a block that every rank runs (the start-up: flags, data, checkpoint,
  memory). Each rank catches its own error, the errors are gathered, and every rank raises the
  same ``RankError``, e.g. ``rank 1: the training data changed: ...``, or the bare message when
  every rank met the same error. Rank 0 reports it; the others leave quietly.
- ``fail_together(comm)``: wraps a rank's whole run. An error that only this rank met (in the
  middle of training: out of memory, a bug, a failed write) prints one line,
  ``npformer: error: rank 1: <error>``, and calls ``comm.abort``, which ends every rank (the
  launcher adds a line of its own). Errors that every rank raises at the same point (a
  ``RankError``, a loss that became NaN after the allreduce, a Ctrl-C or SIGTERM agreed at a
  step) are reported by rank 0 alone; the others exit with the same status and no message.

A rank that dies (SIGKILL, a crash) cannot say anything: the launcher sees it exit and ends
the others. Either way the checkpoints already written stay intact (rank 0 writes them
atomically, checkpoint.py).
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback

ON_ALL_RANKS = "npformer_on_all_ranks"     # attribute marking an exception every rank raises


class RankError(RuntimeError):
    """An error agreed by every rank (``together``): each raises it with the same message."""


def on_all_ranks(exc: BaseException) -> BaseException:
    """Mark `exc` as raised by every rank at the same point (rank 0 alone reports it); return it."""
    setattr(exc, ON_ALL_RANKS, True)
    return exc


def describe(exc: BaseException) -> str:
    """One line for `exc`, as the command line prints errors (the type added for unexpected ones)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f": {exc.filename}" if exc.filename else "")
    text = str(exc).splitlines()[0] if str(exc) else ""
    expected = (ValueError, OSError, RuntimeError, FloatingPointError, MemoryError, IndexError)
    if isinstance(exc, expected) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def agree(comm, exc=None) -> None:
    """Collective: raise the same RankError on every rank if any rank passes an exception."""
    mine = None if exc is None else describe(exc)
    gathered = comm.gather_json(mine)
    verdict = None
    if comm.rank == 0:
        failed = [(r, e) for r, e in enumerate(gathered) if e is not None]
        if failed and len(failed) == comm.size and len({e for _, e in failed}) == 1:
            verdict = failed[0][1]                         # every rank: the same error
        elif failed:
            r, e = failed[0]
            others = [str(q) for q, _ in failed[1:]]
            verdict = f"rank {r}: {e}" + (f" (rank {', '.join(others)} failed too)" if others else "")
    verdict = comm.broadcast_json(verdict)
    if verdict is not None:
        raise on_all_ranks(RankError(verdict)) from exc


@contextlib.contextmanager
def together(comm):
    """Run the block on every rank; if it raised anywhere, raise one RankError on every rank.

    The block must not make collective calls (a rank that raised would not reach them)."""
    try:
        yield
    except Exception as exc:
        agree(comm, exc)
        raise                                              # agree raised; kept for clarity
    agree(comm, None)


def exit_status(exc: BaseException) -> int:
    """The exit status the command line gives `exc`: 130/143 after a signal, else 2."""
    code = getattr(exc, "exit_code", None)
    if isinstance(code, int):
        return code
    if isinstance(exc, KeyboardInterrupt):
        return 128 + getattr(exc, "signum", 2)
    return 2


@contextlib.contextmanager
def fail_together(comm, stream=None):
    """Wrap one rank's whole run (see the module docstring): abort all ranks on this rank's own error."""
    try:
        yield
    except SystemExit:
        raise
    except BaseException as exc:
        if comm.size == 1:
            raise
        from ..training.stopping import Interrupted
        if getattr(exc, ON_ALL_RANKS, False) or isinstance(exc, (Interrupted, KeyboardInterrupt)):
            if comm.rank == 0:
                raise
            raise SystemExit(exit_status(exc)) from None
        stream = stream or sys.stderr
        if os.environ.get("NPFORMER_DEBUG"):
            traceback.print_exc(file=stream)
        print(f"npformer: error: rank {comm.rank}: {describe(exc)}", file=stream, flush=True)
        comm.abort(exit_status(exc))
        raise                                              # a SingleProcess-like abort that returned


def _differences(a, b, prefix: str = "") -> list:
    """[(dotted key, a's value, b's value)] where the JSON-like values a and b differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in list(a) + [k for k in b if k not in a]:
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [(prefix[:-1], a, b)]


def check_same(comm, facts: dict) -> None:
    """Collective: raise one RankError on every rank unless every rank passed equal `facts`.

    facts: a small JSON-serialisable dict (settings, data fingerprint, version). Rank 0 gathers
    them, compares each rank's with its own and broadcasts the verdict, which names the first rank
    that differs and up to three of the differences."""
    gathered = comm.gather_json(facts)
    verdict = None
    if comm.rank == 0:
        for r, theirs in enumerate(gathered):
            diffs = _differences(gathered[0], theirs)
            if diffs:
                shown = "; ".join(f"{k} (rank 0: {a!r}, rank {r}: {b!r})" for k, a, b in diffs[:3])
                verdict = (f"the ranks disagree at start-up: rank {r} differs from rank 0 in {shown}"
                           + (f" and {len(diffs) - 3} more" if len(diffs) > 3 else "")
                           + "; start every rank with the same command, data and npformer")
                break
    verdict = comm.broadcast_json(verdict)
    if verdict is not None:
        raise on_all_ranks(RankError(verdict))
