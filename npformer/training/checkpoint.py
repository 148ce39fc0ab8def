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

Recovery: find_intact picks the newest checkpoint that verifies, whatever
latest.json says; load_checkpoint(fallback=True) loads it, and
set_aside_damaged renames the damaged ones to ``damaged-ckpt-NNNNNN``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import numpy as np

from ..data.tokenizers import load_tokenizer

FORMAT = "npformer-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, truncated, of another format or version, or does not fit."""


class NewerCheckpointError(CheckpointError):
    """A checkpoint written by a newer npformer: not damage, so the fallback stops at it."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def meta_digest(meta: dict) -> str:
    """SHA-256 of meta's canonical JSON (sorted keys), leaving out the "meta_sha256" entry itself."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


_CKPT_NAME = re.compile(r"ckpt-[0-9]+")


def _step_of(name: str) -> int:
    """The step of a "ckpt-{step}" directory name (-1 when it has none), for numeric ordering."""
    suffix = name[len("ckpt-"):]
    return int(suffix) if suffix.isdigit() else -1


def _checkpoint_names(run_dir: str) -> list:
    """The `ckpt-NNNNNN` directories of a run, oldest step first. `damaged-ckpt-*`, `.tmp-*` and
    anything else are not checkpoints: never listed, pruned or loaded."""
    return sorted((n for n in os.listdir(run_dir)
                   if _CKPT_NAME.fullmatch(n) and os.path.isdir(os.path.join(run_dir, n))), key=_step_of)


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


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


def _read_latest(run_dir: str) -> str:
    """The checkpoint directory `run_dir/latest.json` names; CheckpointError when latest.json is
    missing, corrupt, or names no directory."""
    latest = os.path.join(run_dir, "latest.json")
    if not os.path.isfile(latest):
        raise CheckpointError(f"{latest} is missing")
    try:
        with open(latest, encoding="utf-8") as f:
            name = json.load(f)["checkpoint"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{latest} is corrupt ({_one_line(exc)})") from None
    target = os.path.join(run_dir, str(name))
    if not os.path.isdir(target):
        raise CheckpointError(f"{latest} points at {name}, which is missing")
    return target


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


def _read_meta(d: str) -> dict:
    """meta.json of checkpoint directory `d`, with its format, version and own checksum checked."""
    meta_path = os.path.join(d, "meta.json")
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{d} is incomplete: meta.json is missing")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{meta_path} is corrupt ({_one_line(exc)})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{d} is not an npformer checkpoint (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{meta_path} has an invalid format version {version!r}")
    if version > VERSION:
        raise NewerCheckpointError(f"{d} has checkpoint format version {version}, newer than this npformer "
                              f"reads ({VERSION}); upgrade npformer")
    if "meta_sha256" in meta and meta["meta_sha256"] != meta_digest(meta):
        raise CheckpointError(f"{meta_path} is corrupt (checksum mismatch)")
    return meta


def _verify(d: str) -> tuple:
    """(meta, tokenizer) of checkpoint directory `d` once it verifies completely: meta.json (format,
    version, checksum), every file present with its recorded SHA-256, the tokenizer readable.

    The .npz files are hashed, not loaded, so a caller that goes on to load them reads the arrays
    once. Raises a one-line CheckpointError naming the first problem found.
    """
    meta = _read_meta(d)
    sums = meta.get("sha256")
    for fname in ("model.npz", "optimizer.npz", "tokenizer.json"):
        if not isinstance(sums, dict) or fname not in sums:
            raise CheckpointError(f"{os.path.join(d, 'meta.json')} has no checksum for {fname}; "
                                  f"the checkpoint cannot be verified")
    for fname, digest in sums.items():
        fpath = os.path.join(d, fname)
        if not os.path.isfile(fpath):
            raise CheckpointError(f"{d} is incomplete: {fname} is missing")
        if _sha256(fpath) != digest:
            raise CheckpointError(f"{fpath} is corrupt or truncated (checksum mismatch)")
    try:
        tok = load_tokenizer(os.path.join(d, "tokenizer.json"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{d}: tokenizer cannot be read ({_one_line(exc)})") from None
    return meta, tok


def _find(path: str) -> tuple:
    """(checkpoint dir, meta, tokenizer, damaged) for find_intact; see there."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isfile(os.path.join(path, "meta.json")):
        return (path, *_verify(path), [])           # a checkpoint directory: alone, no fallback
    if not os.path.isdir(path) or not (os.path.exists(os.path.join(path, "latest.json"))
                                       or _checkpoint_names(path)):
        raise CheckpointError(f"{path} holds no checkpoint (no meta.json and no latest.json)")
    damaged, order = [], []
    try:
        order.append(_read_latest(path))
    except CheckpointError as exc:
        damaged.append((os.path.join(path, "latest.json"), str(exc)))
    first = [os.path.normpath(d) for d in order]
    order += [d for d in (os.path.join(path, n) for n in reversed(_checkpoint_names(path)))
              if os.path.normpath(d) not in first]
    for d in order:
        try:
            return (d, *_verify(d), damaged)
        except NewerCheckpointError:
            raise                                   # skipping it would throw away a newer run's work
        except CheckpointError as exc:
            damaged.append((d, str(exc)))
    if not order:
        raise CheckpointError(f"{path} holds no checkpoint: {damaged[0][1]}")
    raise CheckpointError(f"{dict(damaged)[order[0]]}; no intact checkpoint in {path} ({len(order)} tried)")


def find_intact(run_dir: str) -> tuple:
    """(checkpoint_dir, damaged): the newest checkpoint of a run directory that verifies completely.

    Tried in order: the checkpoint latest.json names, then every other `ckpt-NNNNNN` directory from
    the newest step down (so a missing, corrupt or dangling latest.json, as a crash may leave, is
    survived). damaged: a (path, reason) pair per thing skipped, in the order tried: latest.json
    itself when it is unusable, then each checkpoint directory that failed; reason is the one-line
    CheckpointError text. A checkpoint directory (one with meta.json) is verified alone, with no
    fallback. Raises CheckpointError, with how many were tried and the newest one's reason, when
    none is intact, and NewerCheckpointError at once on a checkpoint of a newer format version.
    """
    d, _, _, damaged = _find(run_dir)
    return d, damaged


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
