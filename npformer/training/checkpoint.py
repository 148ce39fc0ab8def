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
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np

from ..data.tokenizers import load_tokenizer

FORMAT = "npformer-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, truncated, of another format or version, or does not fit."""


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


def _step_of(name: str) -> int:
    """The step of a "ckpt-{step}" directory name (-1 when it has none), for numeric ordering."""
    suffix = name[len("ckpt-"):]
    return int(suffix) if suffix.isdigit() else -1


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
    Keeps the newest `keep` checkpoints by step (all when keep <= 0), and always the one
    written now. If ckpt-{step} is already the latest checkpoint it is left as it is.
    """
    model_arrays = _host_arrays("model state", model_state)
    optimizer_arrays = _host_arrays("optimizer state", optimizer_state)
    os.makedirs(out_dir, exist_ok=True)
    name = f"ckpt-{step:06d}"
    final = os.path.join(out_dir, name)
    if os.path.exists(final):
        try:
            if resolve_checkpoint(out_dir) == final:
                return final                # this step is already the latest checkpoint
        except CheckpointError:
            pass
        shutil.rmtree(final)                # an orphan left by a run killed before latest.json moved
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
    atomic_write_text(os.path.join(out_dir, "latest.json"), json.dumps({"checkpoint": name}) + "\n")
    ckpts = sorted((d for d in os.listdir(out_dir) if d.startswith("ckpt-") and os.path.isdir(os.path.join(out_dir, d))),
                   key=_step_of)
    for old in ckpts[:-keep] if keep > 0 else []:
        if old != name:
            shutil.rmtree(os.path.join(out_dir, old), ignore_errors=True)
    return final


def resolve_checkpoint(path: str) -> str:
    """The checkpoint directory for `path`: a run directory (via latest.json) or a checkpoint itself."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isfile(os.path.join(path, "meta.json")):
        return path
    latest = os.path.join(path, "latest.json")
    if not os.path.isfile(latest):
        raise CheckpointError(f"{path} holds no checkpoint (no meta.json and no latest.json)")
    try:
        with open(latest, encoding="utf-8") as f:
            name = json.load(f)["checkpoint"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{latest} is corrupt ({exc})") from None
    target = os.path.join(path, str(name))
    if not os.path.isfile(os.path.join(target, "meta.json")):
        raise CheckpointError(f"{latest} points at {name}, which is missing or incomplete")
    return target


class Checkpoint:
    """A loaded checkpoint: meta (dict), model_state and optimizer_state (name -> array), tokenizer."""

    def __init__(self, path, meta, model_state, optimizer_state, tokenizer):
        self.path, self.meta = path, meta
        self.model_state, self.optimizer_state = model_state, optimizer_state
        self.tokenizer = tokenizer

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def _load_npz(path: str) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as exc:
        raise CheckpointError(f"{path} cannot be read ({type(exc).__name__}: {exc})") from None


def load_meta(path: str) -> tuple:
    """(checkpoint directory, meta dict) for a run or checkpoint directory, with its format, version
    and meta checksum verified (the other files are verified by load_checkpoint)."""
    d = resolve_checkpoint(path)
    meta_path = os.path.join(d, "meta.json")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{meta_path} is corrupt ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{d} is not an npformer checkpoint (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{meta_path} has an invalid format version {version!r}")
    if version > VERSION:
        raise CheckpointError(f"{d} has checkpoint format version {version}, newer than this npformer "
                              f"reads ({VERSION}); upgrade npformer")
    if "meta_sha256" in meta and meta["meta_sha256"] != meta_digest(meta):
        raise CheckpointError(f"{meta_path} is corrupt (checksum mismatch)")
    return d, meta


def load_checkpoint(path: str) -> Checkpoint:
    """Read and verify a checkpoint (run directory or checkpoint directory)."""
    d, meta = load_meta(path)
    meta_path = os.path.join(d, "meta.json")
    sums = meta.get("sha256")
    for fname in ("model.npz", "optimizer.npz", "tokenizer.json"):
        if not isinstance(sums, dict) or fname not in sums:
            raise CheckpointError(f"{meta_path} has no checksum for {fname}; the checkpoint cannot be verified")
    for fname, digest in sums.items():
        fpath = os.path.join(d, fname)
        if not os.path.isfile(fpath):
            raise CheckpointError(f"{d} is incomplete: {fname} is missing")
        if _sha256(fpath) != digest:
            raise CheckpointError(f"{fpath} is corrupt or truncated (checksum mismatch)")
    try:
        tok = load_tokenizer(os.path.join(d, "tokenizer.json"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{d}: tokenizer cannot be read ({exc})") from None
    return Checkpoint(d, meta, _load_npz(os.path.join(d, "model.npz")),
                      _load_npz(os.path.join(d, "optimizer.npz")), tok)
