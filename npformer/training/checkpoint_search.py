"""Reading and verifying checkpoint directories, and finding the newest intact one in a run.

The reading half of npformer/training/checkpoint.py, which writes and loads checkpoints and
re-exports the public names here (FORMAT, VERSION, CheckpointError, NewerCheckpointError,
meta_digest, find_intact). A checkpoint verifies when its meta.json has this format, a version
this npformer reads and its own checksum, and every file it lists is there with its SHA-256.

find_intact tries the checkpoint latest.json names, then every `ckpt-NNNNNN` from the newest
step down, and says what it skipped and why; a checkpoint of a newer format version stops it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

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
