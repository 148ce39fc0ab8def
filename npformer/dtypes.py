"""The default floating-point dtype: what factories, layers and models use when given no dtype.

float32 unless changed, as in torch. For a float64 reference model, build it under the context:

    with npformer.default_dtype(np.float64):
        model = npformer.models.GPT(config)          # every parameter and buffer float64

``set_default_dtype`` changes it for the rest of the process (process-wide, like torch's, not
per thread). Only floating dtypes are accepted.
"""

from __future__ import annotations

import contextlib

import numpy as np

_default = np.dtype(np.float32)


def _floating(dtype, where: str) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"{where}: {dtype!r} is not a dtype") from exc
    if dt.kind != "f":
        raise TypeError(f"{where}: the default dtype must be floating (float16, float32 or float64); got {dt}")
    return dt


def get_default_dtype() -> np.dtype:
    """The dtype used when a factory, layer or model is given dtype=None."""
    return _default


def set_default_dtype(dtype) -> None:
    """Make `dtype` (floating) the default for the rest of the process."""
    global _default
    _default = _floating(dtype, "set_default_dtype")


@contextlib.contextmanager
def default_dtype(dtype):
    """Context manager: `dtype` is the default inside, the previous one is restored after."""
    global _default
    previous, _default = _default, _floating(dtype, "default_dtype")
    try:
        yield _default
    finally:
        _default = previous


def resolve(dtype) -> np.dtype:
    """`dtype` itself, or the default dtype when it is None."""
    return _default if dtype is None else np.dtype(dtype)
