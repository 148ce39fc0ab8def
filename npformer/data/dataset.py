"""Text files, train/val splits and random (x, y) windows for next-token training.

BatchSampler draws batches like nanoGPT's get_batch: B random start offsets i, x = ids[i : i+T],
y = ids[i+1 : i+T+1] (y is x shifted left by one). Its random state exports as plain JSON data, so
a resumed run draws exactly the batches the interrupted one would have drawn.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np


class DataError(ValueError):
    """Bad training data: a missing, empty or undecodable file, or a corpus too short to sample."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """The data file does not exist (both a DataError and a FileNotFoundError)."""


def load_text(path) -> str:
    """The contents of a UTF-8 text file; DataError (one line) if missing, empty or not UTF-8."""
    if not os.path.exists(path):
        raise DataFileNotFoundError(f"data file not found: {path}")
    if os.path.isdir(path):
        raise DataError(f"data path is a directory, not a text file: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    if not raw:
        raise DataError(f"data file is empty: {path}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"data file is not valid UTF-8: {path}: byte 0x{raw[exc.start]:02x} at byte "
                        f"offset {exc.start} ({exc.reason})") from None


def data_fingerprint(path, text: str) -> dict:
    """{"source", "bytes", "sha256"} of the training data: the file's bytes (what `sha256sum` prints),
    or the built-in corpus's UTF-8 text."""
    raw = text.encode("utf-8")
    if path is not None:
        with open(path, "rb") as f:
            raw = f.read()
    return {"source": "built-in toy language" if path is None else os.path.abspath(path),
            "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}


def split_train_val(ids, val_fraction: float = 0.1):
    """(train, val) = (first n - n_val items, last n_val items), n_val = n - int(n * (1 - val_fraction)).

    ids: any sliceable sequence (token array or text). Both parts must be non-empty.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = len(ids)
    n_train = int(n * (1.0 - val_fraction))
    if n_train == 0 or n_train == n:
        raise DataError(f"cannot split {n} tokens with val_fraction={val_fraction}: "
                        f"one part would be empty")
    return ids[:n_train], ids[n_train:]


class BatchSampler:
    """Random training windows from one long token sequence.

    ids: (N,) integer token ids (host NumPy array); block_size T; batch_size B; seed for the
    NumPy generator. sample() -> (x, y), both (B, T) int64 host arrays with y[b, t] = x[b, t+1]
    for t < T-1. Start offsets are uniform over the N - T windows that have a next token.
    """

    def __init__(self, ids, block_size: int, batch_size: int, seed: int = 0):
        if not (isinstance(block_size, (int, np.integer)) and block_size >= 1):
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        ids = np.asarray(ids)
        if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
            raise DataError(f"ids must be a 1-D integer array, got shape {ids.shape} and dtype "
                            f"{ids.dtype}")
        if len(ids) < block_size + 1:
            raise DataError(f"corpus has {len(ids)} tokens, but block_size {block_size} needs at "
                            f"least {block_size + 1} (block_size + 1)")
        self.ids = ids.astype(np.int64, copy=False)
        self.block_size, self.batch_size = int(block_size), int(batch_size)
        self.seed = int(seed)
        self.rng = np.random.default_rng(self.seed)
        self.batches_drawn = 0

    @property
    def n_windows(self) -> int:
        """How many distinct start offsets there are: N - T."""
        return len(self.ids) - self.block_size

    def sample(self):
        """One batch (x, y), each (B, T) int64."""
        start = self.rng.integers(0, self.n_windows, size=self.batch_size)   # (B,)
        idx = start[:, None] + np.arange(self.block_size)[None, :]           # (B, T)
        self.batches_drawn += 1
        return self.ids[idx], self.ids[idx + 1]

    def state_dict(self) -> dict:
        """The sampler's position as JSON-safe plain data (seed, batches drawn, generator state)."""
        return {"seed": self.seed, "batches_drawn": self.batches_drawn,
                "bit_generator": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict(): the next sample() equals the one the saved sampler drew next."""
        try:
            gen = state["bit_generator"]
            seed, drawn = int(state["seed"]), int(state["batches_drawn"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a BatchSampler state (needs seed, batches_drawn, bit_generator): "
                             f"{exc!r}") from None
        name = type(self.rng.bit_generator).__name__
        kind = gen.get("bit_generator") if isinstance(gen, dict) else type(gen).__name__
        if kind != name:
            raise ValueError(f"BatchSampler state holds a {kind!r} generator state; expected {name!r}")
        try:
            self.rng.bit_generator.state = gen
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"BatchSampler state has a malformed generator state: {exc!r}") from None
        self.seed, self.batches_drawn = seed, drawn
