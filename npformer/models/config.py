"""Checks shared by the models' frozen config dataclasses; each error names the field."""

from __future__ import annotations

import numpy as np


def require_positive_ints(config, names) -> None:
    """Raise ValueError unless every field in `names` is an int >= 1 (bools refused)."""
    owner = type(config).__name__
    for name in names:
        v = getattr(config, name)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{owner}.{name} must be a positive integer; got {v!r}")


def require_divisible(config, width: str, heads: str) -> None:
    """Raise ValueError unless the model width splits evenly over the attention heads."""
    w, h = getattr(config, width), getattr(config, heads)
    if w % h:
        raise ValueError(f"{type(config).__name__}: {width} ({w}) must be divisible by {heads} ({h})")


def require_dropout(config, name: str = "dropout") -> None:
    """Raise ValueError unless the field is a probability in [0, 1)."""
    v = getattr(config, name)
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not 0.0 <= v < 1.0:
        raise ValueError(f"{type(config).__name__}.{name} must be in [0, 1); got {v!r}")


def require_bools(config, names) -> None:
    """Raise ValueError unless every field in `names` is True or False."""
    for name in names:
        v = getattr(config, name)
        if not isinstance(v, (bool, np.bool_)):
            raise ValueError(f"{type(config).__name__}.{name} must be True or False; got {v!r}")


def require_token_ids(config, names, lists=()) -> None:
    """Raise ValueError unless every field in `names` is None or a token id in [0, config.vocab_size);
    a field in `lists` may also be a tuple of them (HF allows a list of eos ids)."""
    V = config.vocab_size
    for name in names:
        value = getattr(config, name)
        ids = value if isinstance(value, tuple) and name in lists else (value,)
        if value is not None and not all(not isinstance(i, bool) and isinstance(i, (int, np.integer)) and 0 <= i < V
                                         for i in ids):
            raise ValueError(f"{type(config).__name__}.{name} must be None or an int in [0, vocab_size) = [0, {V})"
                             f"{' (or a list of them)' if name in lists else ''}; got {value!r}")
