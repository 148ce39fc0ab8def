"""The Trainer's data: datasets as lists of example dicts, batches collated from them, outputs joined.

    examples(dataset, name)          a sequence of dicts, or a dict of equal-length columns -> list of dicts
    DataCollatorWithPadding(tok)     list of example dicts -> dict of (B, ...) arrays, padded on the right
    join(per-batch outputs)          one array per output field, batches concatenated along axis 0
    rank_rows(n, rank, size)         a rank's rows of a global batch of n examples (over mpiexec ranks)
"""

from __future__ import annotations

import numpy as np


class DataCollatorWithPadding:
    """HF's DataCollatorWithPadding: a list of example dicts -> a dict of arrays.

    A 1-D field whose lengths differ is padded on the right to the longest: input_ids with the
    tokenizer's pad_token_id (0 without a tokenizer), labels with -100 (ignored by the losses),
    the others with 0; an attention_mask (1 = token, 0 = padding) is added when there was none.
    Scalar fields (labels of a classifier, start_positions, ...) become (B,) arrays. "label" and
    "label_ids" are renamed "labels", as HF does."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    def __call__(self, features: list) -> dict:
        rows = [rename_labels(f) for f in features]
        pad_id = getattr(self.tokenizer, "pad_token_id", None) or 0
        batch, lengths = {}, None
        for key in rows[0]:
            values = [np.asarray(r[key]) for r in rows]
            if values[0].ndim == 0 or len({v.shape for v in values}) == 1:
                batch[key] = np.stack(values)                                       # (B,) or (B, T)
                continue
            if any(v.ndim != 1 for v in values):
                raise ValueError(f"DataCollatorWithPadding: {key!r} has shapes {sorted({v.shape for v in values})}; "
                                 f"only 1-D sequences are padded")
            T = max(len(v) for v in values)
            fill = {"input_ids": pad_id, "labels": -100}.get(key, 0)
            out = np.full((len(values), T), fill, dtype=values[0].dtype)               # (B, T)
            for i, v in enumerate(values):
                out[i, :len(v)] = v
            batch[key] = out
            lengths = [len(v) for v in values] if key == "input_ids" else lengths
        if lengths is not None and "attention_mask" not in batch:
            batch["attention_mask"] = (np.arange(batch["input_ids"].shape[1])[None] <
                                       np.array(lengths)[:, None]).astype(np.int64)    # (B, T)
        return batch


def rename_labels(row: dict) -> dict:
    return {("labels" if k in ("label", "label_ids") else k): v for k, v in row.items()}


def examples(dataset, name: str) -> list:
    """A dataset as a list of example dicts: a sequence of dicts, or a dict of equal-length columns."""
    if isinstance(dataset, dict):
        sizes = {k: len(v) for k, v in dataset.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"{name}: columns of different lengths {sizes}")
        n = next(iter(sizes.values()), 0)
        dataset = [{k: v[i] for k, v in dataset.items()} for i in range(n)]
    rows = [rename_labels(dataset[i]) for i in range(len(dataset))]
    if not rows:
        raise ValueError(f"{name} is empty")
    keys = set(rows[0])
    if "input_ids" not in keys:
        raise ValueError(f"{name}: example 0 has no 'input_ids' (keys: {sorted(keys)})")
    for i, r in enumerate(rows):
        if set(r) != keys:
            raise ValueError(f"{name}: example {i} has keys {sorted(r)} but example 0 has {sorted(keys)} "
                             f"(missing {sorted(keys - set(r))})")
    return rows


def join(batches: list):
    """Per-batch tuples of arrays -> one array per field (concat), the tuple unwrapped when one field."""
    fields = tuple(concat(list(field)) for field in zip(*batches))
    return fields[0] if len(fields) == 1 else fields


def concat(arrays: list) -> np.ndarray:
    """Batches' outputs joined along axis 0; trailing axes that differ are padded with -100, as HF does."""
    shape = tuple(max(s) for s in zip(*(a.shape[1:] for a in arrays)))
    padded = [np.pad(a, [(0, 0)] + [(0, m - s) for m, s in zip(shape, a.shape[1:])], constant_values=-100)
              for a in arrays]
    return np.concatenate(padded)


def rank_rows(n: int, rank: int, size: int) -> slice:
    """Rank `rank`'s rows of a global batch of n examples over `size` ranks: slice(rank * n // size,
    (rank + 1) * n // size), contiguous; n / size rows each when size divides n (distributed.share),
    else sizes that differ by one (the short last batch of an epoch; a rank may get none)."""
    return slice(rank * n // size, (rank + 1) * n // size)
