"""Run directories: the one place where ``pretrain``, ``seq2seq`` and ``finetune`` claim their ``--out``.

    with RunDir.claim("out-pretrain", "pretrain", resume=False) as run:
        ...                                 # only this process writes into run.path now

A run directory holds a marker ``run.json`` ({"format": "npformer-run", "command": ...}),
the checkpoints (checkpoint.py), and ``.lock``, a file held with an exclusive OS advisory lock
(``flock``) for as long as the run lives. The kernel drops the lock when the process ends, however
it ends, so a SIGKILLed run never leaves a stale lock behind; worker processes forked by the run
share its lock. A second process that claims the same directory is refused at once with the
holder's process id.

``claim`` refuses, before it creates or writes anything, every path that is not a run directory
of the command: a file, a checkpoint directory or any other path inside a run (whose pruning
would delete it), another command's run, a non-empty folder that holds no run. Without ``resume`` it also refuses a run that already has a checkpoint
(a new run never writes over an old one); the caller checks that a resumed run has one.
"""

from __future__ import annotations

import errno
import json
import os

from .checkpoint import CheckpointError, atomic_write_text, load_checkpoint, load_meta, set_aside_damaged

try:
    import fcntl
except ImportError:                         # not POSIX: runs are not locked (documented in pretraining.md)
    fcntl = None

MARKER = "run.json"
LOCK = ".lock"
FORMAT = "npformer-run"
# checkpoint meta["model"] -> the command that writes such runs (for runs made before run.json existed)
COMMAND_OF_MODEL = {"gpt": "pretrain", "seq2seq": "seq2seq", "sequence_classifier": "finetune"}


class RunDirError(CheckpointError):
    """--out cannot be used: not a run directory of this command, or in use by another process."""


def _has_checkpoint(path: str) -> bool:
    return os.path.exists(os.path.join(path, "latest.json")) or any(
        d.startswith("ckpt-") for d in os.listdir(path))


def _is_run(path: str) -> bool:
    """Whether `path` is a run directory (marked, or holding checkpoints as runs did before run.json)."""
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, MARKER)) or _has_checkpoint(path))


def _checkpoint_parent(path: str):
    """The run directory whose checkpoint (or set-aside or half-written one) `path` is, else None."""
    real = os.path.realpath(path)
    parent = os.path.dirname(real)
    if os.path.basename(real).startswith(("ckpt-", "damaged-ckpt-", ".tmp-ckpt-")) and _is_run(parent):
        return parent
    return None


def _enclosing_run(path: str):
    """The nearest run directory strictly above `path` (symbolic links resolved), else None."""
    real = os.path.realpath(path)
    parent = os.path.dirname(real)
    while parent != real:
        if _is_run(parent):
            return parent
        real, parent = parent, os.path.dirname(parent)
    return None


def command_of(path: str):
    """The command whose run directory `path` is ("pretrain", ...), None for an empty or new folder.

    Raises RunDirError for anything else (a file, a checkpoint inside a run, an unrelated folder)."""
    outer = _enclosing_run(path)
    if outer is not None:
        rel = os.path.relpath(outer)
        if _checkpoint_parent(path) == outer:
            raise RunDirError(f"{path} is a checkpoint directory inside the run {rel}, not a run directory; "
                              f"pass --out {rel}")
        raise RunDirError(f"{path} is inside the run directory {rel}, whose checkpoints it would mix with; "
                          f"choose a path outside it")
    if not os.path.exists(path):
        return None
    if not os.path.isdir(path):
        raise RunDirError(f"{path} is a file, not a run directory; pass a directory for --out")
    if os.path.isfile(os.path.join(path, "meta.json")):             # a checkpoint copied out of its run
        raise RunDirError(f"{path} is a checkpoint directory, not a run directory; choose another --out")
    marker = os.path.join(path, MARKER)
    if os.path.isfile(marker):
        try:
            with open(marker, encoding="utf-8") as f:
                info = json.load(f)
            if info.get("format") == FORMAT and isinstance(info.get("command"), str):
                return info["command"]
        except (ValueError, AttributeError, UnicodeDecodeError):
            pass
        raise RunDirError(f"{marker} is not an npformer run marker; choose another --out")
    if _has_checkpoint(path):                   # a run written before run.json existed
        try:
            model = load_meta(path, fallback=True)[1].get("model")
        except CheckpointError:
            model = None
        if model in COMMAND_OF_MODEL:
            return COMMAND_OF_MODEL[model]
        raise RunDirError(f"{path} holds checkpoints that npformer cannot attribute to a command; "
                          f"choose another --out")
    if [e for e in os.listdir(path) if e != LOCK and not (e.startswith(".tmp-") and e.endswith(MARKER))]:
        raise RunDirError(f"{path} is a folder that holds no npformer run and is not empty; "
                          f"choose a new or empty directory for --out")
    return None


def load_for_resume(out: str):
    """The checkpoint a resumed run continues from: the newest intact one in `out` (ckpt.damaged
    lists the newer ones skipped). Nothing is changed on disk; see set_aside."""
    return load_checkpoint(out, fallback=True)


def resume_check(cfg, settings_key: str, fields, log):
    """What rank 0 (or the one process) checks of the checkpoint a resume continues from, for
    distributed.resume_point: its settings (check_resumable), then set the damaged ones aside."""
    def check(ckpt):
        check_resumable(cfg, ckpt, settings_key, fields)
        set_aside(cfg.out, ckpt, log)
    return check


def set_aside(out: str, ckpt, log) -> None:
    """Once the resume is accepted: name the damaged checkpoints skipped to reach `ckpt`, and move
    them aside as damaged-ckpt-* (kept for inspection, never reused)."""
    if not ckpt.damaged:
        return
    for _, reason in ckpt.damaged:
        log(f"warning: {reason}")
    for moved in set_aside_damaged(out, ckpt.damaged, ckpt.path):
        log(f"warning: the damaged checkpoint is kept for inspection as {moved}")
    log(f"continuing from the newest intact checkpoint, {ckpt.path} (step {ckpt.step})")


def check_resumable(cfg, ckpt, settings_key: str, fields) -> None:
    """Refuse to resume from `ckpt` with settings (`fields` of cfg) other than those stored in its
    meta[settings_key], or with a cfg.max_iters below the checkpoint's step."""
    if not isinstance(ckpt.meta.get("run"), dict):
        raise CheckpointError(f"{ckpt.path} holds no training state to resume from (written by an older "
                              f"npformer, or not by a training run); start a new run with another --out")
    saved = ckpt.meta.get(settings_key, {})
    diffs = [f"{k} (checkpoint {saved.get(k)!r}, now {getattr(cfg, k)!r})"
             for k in fields if k in saved and saved[k] != getattr(cfg, k)]
    if diffs:
        raise CheckpointError(f"--resume: the checkpoint in {cfg.out} was made with other settings: "
                              + ", ".join(diffs))
    if ckpt.step > cfg.max_iters:
        raise ValueError(f"--max-iters {cfg.max_iters} is below the checkpoint's step {ckpt.step} "
                         f"in {cfg.out}; pass a larger --max-iters to continue")


def _describe_os_error(path: str, exc: OSError) -> str:
    reason = {errno.EACCES: "permission denied", errno.EROFS: "the file system is read-only",
              errno.ENOSPC: "no space left on the device", errno.ENOTDIR: "a part of the path is a file",
              errno.EPERM: "operation not permitted"}.get(exc.errno, exc.strerror or type(exc).__name__)
    return f"--out {path} cannot be written: {reason}"


def _in_use(path: str, pid: str) -> RunDirError:
    return RunDirError(f"{path} is in use by process {pid}; wait for it to finish or choose another --out")


def _read_pid(fd: int) -> str:
    return os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"


def _holder(path: str):
    """The process id (as text) of the live process that holds `path`'s lock, else None."""
    if fcntl is None or not os.path.isfile(os.path.join(path, LOCK)):
        return None
    fd = os.open(os.path.join(path, LOCK), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_pid(fd)
    finally:
        os.close(fd)                        # also releases the probe's lock
    return None


def refuse_if_in_use(path: str) -> None:
    """RunDirError naming the live process that holds `path`'s lock, if one does."""
    holder = _holder(path)
    if holder is not None:
        raise _in_use(path, holder)


def check_resume_target(out: str) -> None:
    """Refuse --resume at once into a run another process holds, or into nothing."""
    refuse_if_in_use(out)
    if not os.path.isdir(out):
        raise CheckpointError(f"nothing to resume: {out} does not exist; start the run without --resume")


class RunDir:
    """An exclusively locked run directory; `claim` it, use `.path`, `close` (or leave the `with`)."""

    def __init__(self, path: str, command: str, fd: int, created: bool = False):
        self.path, self.command, self._fd = path, command, fd
        self.created = created              # this claim made the directory

    @classmethod
    def claim(cls, path: str, command: str, resume: bool = False) -> "RunDir":
        """Check `path` is usable as `command`'s run directory, create it, lock it, mark it."""
        kind = command_of(path)
        if kind is not None and kind != command:
            raise RunDirError(f"{path} is a run directory of `npformer {kind}`, not of `npformer {command}`; "
                              f"choose another --out")
        check_resume_target(path) if resume else refuse_if_in_use(path)
        if not resume and os.path.isdir(path) and _has_checkpoint(path):
            raise RunDirError(f"{path} already holds a checkpoint; pass --resume to continue it or choose "
                              f"another --out")
        created = not os.path.exists(path)
        try:
            os.makedirs(path, exist_ok=True)
            fd = os.open(os.path.join(path, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunDirError(_describe_os_error(path, exc)) from None
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise _in_use(path, _read_pid(fd)) from None
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
            if kind is None:
                atomic_write_text(os.path.join(path, MARKER),
                                  json.dumps({"format": FORMAT, "command": command}) + "\n")
        except BaseException:
            os.close(fd)
            raise
        return cls(path, command, fd, created)

    def close(self) -> None:
        """Release the lock (the kernel also does when the process ends)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        # A run that failed before it wrote anything leaves no directory behind.
        if exc_type is not None and self.created and set(os.listdir(self.path)) <= {MARKER, LOCK}:
            for name in (MARKER, LOCK):
                if os.path.exists(os.path.join(self.path, name)):
                    os.remove(os.path.join(self.path, name))
            os.rmdir(self.path)
        self.close()
