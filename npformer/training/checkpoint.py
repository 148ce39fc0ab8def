"""Checkpoints: a directory of plain files, written atomically, read without pickle.

Layout of a run directory ``OUT``::

    OUT/latest.json            {"checkpoint": "ckpt-000500"}  (replaced atomically)
    OUT/ckpt-000500/meta.json  format, version, step, config, run state, file checksums
    OUT/ckpt-000500/model.npz  weights, by state_dict name
    OUT/ckpt-000500/optimizer.npz
    OUT/ckpt-000500/tokenizer.json

A checkpoint is first written to a temporary directory, fsynced, then renamed
into place, and only then does ``latest.json`` point at it; older checkpoints
are removed last. A process killed at any moment leaves the previous
checkpoint intact and ``latest.json`` pointing at a complete one. Every file's
SHA-256 is recorded in meta.json, and meta.json carries the SHA-256 of its own
canonical JSON (``meta_sha256``); both are verified on load, so corruption and
truncation are reported as such. Arrays are read with ``allow_pickle=False``
(object arrays are refused when saving).

Recovery: find_intact (checkpoint_search.py, with the verification) picks the newest
checkpoint that verifies, whatever latest.json says; load_checkpoint(fallback=True) loads
it, and set_aside_damaged renames the damaged ones to ``damaged-ckpt-NNNNNN``.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from .checkpoint_search import (  # noqa: F401  (reading and verifying; public names re-exported)
    _CKPT_NAME, FORMAT, VERSION, CheckpointError, NewerCheckpointError, _checkpoint_names, _find, _one_line,
    _read_latest, _sha256, _verify, find_intact, meta_digest)


def _host_arrays(what: str, state: dict) -> dict:
    """name -> NumPy array; refuses object arrays, which only pickle could store."""
    arrays = {k: np.asarray(v) for k, v in state.items()}
    for k, a in arrays.items():
        if a.dtype == object:
            raise CheckpointError(f"{what} entry {k!r} is an object array; checkpoints hold only "
                                  f"numbers and strings (no pickle)")
    return arrays


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: str, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` to `path` through a temporary file and os.replace."""
    d = os.path.dirname(os.path.abspath(path))
    # a per-process name (not mkstemp, whose files are private 0600): permissions follow the umask
    tmp = os.path.join(d, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        with open(tmp, "wb") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(d)


def _remove_stale_temporaries(out_dir: str) -> None:
    """Delete `.tmp-ckpt-*-PID` directories whose writing process no longer exists (killed mid-save)."""
    for entry in os.listdir(out_dir):
        if not (entry.startswith(".tmp-ckpt-") and os.path.isdir(os.path.join(out_dir, entry))):
            continue
        pid = entry.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)            # raises if no such process
        except ProcessLookupError:
            shutil.rmtree(os.path.join(out_dir, entry), ignore_errors=True)
        except PermissionError:
            pass                            # alive, owned by someone else


def save_checkpoint(out_dir: str, step: int, model_state: dict, optimizer_state: dict,
                    tokenizer, meta: dict, keep: int = 2) -> str:
    """Write checkpoint `ckpt-{step}` into run directory `out_dir`; return its path.

    model_state / optimizer_state: name -> NumPy array (or number); tokenizer: an object
    with save(path) (npformer.data tokenizers); meta: JSON-safe dict (config, run state, ...).

    keep: after writing, the `keep` newest `ckpt-NNNNNN` directories by step remain, plus always
    the one written now (even when it is older than those); keep <= 0 keeps every checkpoint.
    `damaged-ckpt-*` (see set_aside_damaged) and `.tmp-*` entries are never pruned.

    If ckpt-{step} is already the latest checkpoint and verifies, it is left as it is; an
    existing ckpt-{step} that is not the latest, or is damaged, is replaced.
    """
    model_arrays = _host_arrays("model state", model_state)
    optimizer_arrays = _host_arrays("optimizer state", optimizer_state)
    os.makedirs(out_dir, exist_ok=True)
    name = f"ckpt-{step:06d}"
    final = os.path.join(out_dir, name)
    if os.path.exists(final):
        try:
            if resolve_checkpoint(out_dir) == final:
                _verify(final)
                return final                # this step is already the latest checkpoint, intact
        except CheckpointError:
            pass
        shutil.rmtree(final)                # an orphan left by a run killed before latest.json moved, or damaged
    _remove_stale_temporaries(out_dir)
    tmp = os.path.join(out_dir, f".tmp-{name}-{os.getpid()}")    # not mkdtemp (0700): the umask decides
    shutil.rmtree(tmp, ignore_errors=True)                        # left by a killed process with this pid
    try:
        os.mkdir(tmp)
        files = {
            "model.npz": lambda f: np.savez(f, **model_arrays),
            "optimizer.npz": lambda f: np.savez(f, **optimizer_arrays),
        }
        for fname, write in files.items():
            _write_file(os.path.join(tmp, fname), write)
        tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        sums = {fname: _sha256(os.path.join(tmp, fname)) for fname in (*files, "tokenizer.json")}
        full_meta = {"format": FORMAT, "version": VERSION, "step": int(step), "sha256": sums, **meta}
        full_meta["meta_sha256"] = meta_digest(full_meta)
        _write_file(os.path.join(tmp, "meta.json"),
                    lambda f: f.write(json.dumps(full_meta, indent=1, sort_keys=True).encode("utf-8")))
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _point_latest(out_dir, name)
    for old in _checkpoint_names(out_dir)[:-keep] if keep > 0 else []:
        if old != name:
            shutil.rmtree(os.path.join(out_dir, old), ignore_errors=True)
    return final


def _point_latest(run_dir: str, name: str) -> None:
    atomic_write_text(os.path.join(run_dir, "latest.json"), json.dumps({"checkpoint": name}) + "\n")


def resolve_checkpoint(path: str) -> str:
    """The checkpoint directory for `path`: a run directory (via latest.json) or a checkpoint itself.
    Nothing is verified beyond meta.json being there (see find_intact for that)."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isfile(os.path.join(path, "meta.json")):
        return path
    if not os.path.isfile(os.path.join(path, "latest.json")):
        raise CheckpointError(f"{path} holds no checkpoint (no meta.json and no latest.json)")
    target = _read_latest(path)
    if not os.path.isfile(os.path.join(target, "meta.json")):
        raise CheckpointError(f"{os.path.join(path, 'latest.json')} points at {os.path.basename(target)}, "
                              f"which is missing or incomplete")
    return target


class Checkpoint:
    """A loaded checkpoint: meta (dict), model_state and optimizer_state (name -> array), tokenizer,
    and damaged: the (path, reason) pairs skipped to reach it (load_checkpoint(fallback=True)), else []."""

    def __init__(self, path, meta, model_state, optimizer_state, tokenizer, damaged=()):
        self.path, self.meta = path, meta
        self.model_state, self.optimizer_state = model_state, optimizer_state
        self.tokenizer = tokenizer
        self.damaged = list(damaged)

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def _load_npz(path: str) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as exc:
        raise CheckpointError(f"{path} cannot be read ({type(exc).__name__}: {_one_line(exc)})") from None


def _choose(path: str, fallback: bool) -> tuple:
    """(checkpoint dir, meta, tokenizer, damaged) for load_meta and load_checkpoint."""
    d, meta, tok, damaged = _find(path)
    if damaged and not fallback:
        raise CheckpointError(f"{damaged[0][1]}; the newest intact checkpoint is {d} (pass --ckpt {d})")
    return d, meta, tok, damaged


def load_meta(path: str, fallback: bool = False) -> tuple:
    """(checkpoint directory, meta dict) for a run or checkpoint directory, verified as completely as
    load_checkpoint verifies it (the arrays are hashed, not loaded).

    fallback: as in load_checkpoint, so that with fallback=True this is the meta of the checkpoint
    load_checkpoint(path, fallback=True) will load.
    """
    d, meta, _, _ = _choose(path, fallback)
    return d, meta


def load_checkpoint(path: str, fallback: bool = False) -> Checkpoint:
    """Read and verify a checkpoint (run directory or checkpoint directory).

    fallback=False: a run whose latest checkpoint (or latest.json) is damaged raises a one-line
    CheckpointError saying what is wrong and naming the newest intact checkpoint, if any.
    fallback=True: load find_intact's choice instead; ckpt.damaged lists what was skipped (pass it
    to set_aside_damaged before writing into the run again). A checkpoint directory given directly
    is never substituted.
    """
    d, meta, tok, damaged = _choose(path, fallback)
    return Checkpoint(d, meta, _load_npz(os.path.join(d, "model.npz")),
                      _load_npz(os.path.join(d, "optimizer.npz")), tok, damaged)


def set_aside_damaged(run_dir: str, damaged: list, intact_dir: str) -> list:
    """Point latest.json at `intact_dir` and rename each damaged checkpoint directory out of the way;
    return the new paths.

    damaged: (path, reason) pairs from find_intact. Each `ckpt-NNNNNN` directory of `run_dir` among
    them becomes `damaged-ckpt-NNNNNN` (or `damaged-ckpt-NNNNNN-2`, ... when taken): kept for
    inspection, but never listed, pruned or loaded again, so a later save at that step writes a
    fresh checkpoint. Other entries (latest.json itself) need only the repointing. latest.json is
    replaced atomically, first, so it names an intact checkpoint throughout.
    """
    run_dir, intact_dir = os.path.abspath(run_dir), os.path.abspath(intact_dir)
    if (os.path.dirname(intact_dir) != run_dir or not _CKPT_NAME.fullmatch(os.path.basename(intact_dir))
            or not os.path.isfile(os.path.join(intact_dir, "meta.json"))):
        raise CheckpointError(f"set_aside_damaged: {intact_dir} is not a checkpoint directory in {run_dir}; "
                              f"pass the checkpoint find_intact({run_dir!r}) chose")
    _point_latest(run_dir, os.path.basename(intact_dir))
    moved = []
    for path, _ in damaged:
        path = os.path.abspath(path)
        name = os.path.basename(path)
        if os.path.dirname(path) != run_dir or not _CKPT_NAME.fullmatch(name) or not os.path.isdir(path):
            continue
        target, n = os.path.join(run_dir, f"damaged-{name}"), 2
        while os.path.exists(target):
            target, n = os.path.join(run_dir, f"damaged-{name}-{n}"), n + 1
        os.rename(path, target)
        moved.append(target)
    if moved:
        _fsync_dir(run_dir)
    return moved
