"""Tensor factories: zeros, ones, full, arange, rand, randn, and their *_like forms.

Floating-point factories default to the default dtype (float32 unless changed with
npformer.set_default_dtype or npformer.default_dtype, as in torch); pass ``dtype=np.float64``
for reference computations. Random factories take a
``generator`` (npformer.random.Generator) for reproducibility.
"""

from __future__ import annotations

import numpy as np

from . import backend, random
from .dtypes import get_default_dtype, resolve
from .tensor import Tensor


def _shape(shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        return tuple(shape[0])
    return tuple(shape)


def _xp(device):
    return backend.xp_for(device or backend.default_device())


def zeros(*shape, dtype=None, device=None, requires_grad=False) -> Tensor:
    return Tensor(_xp(device).zeros(_shape(shape), dtype=resolve(dtype)), requires_grad=requires_grad)


def ones(*shape, dtype=None, device=None, requires_grad=False) -> Tensor:
    return Tensor(_xp(device).ones(_shape(shape), dtype=resolve(dtype)), requires_grad=requires_grad)


def full(shape, fill_value, dtype=None, device=None, requires_grad=False) -> Tensor:
    return Tensor(_xp(device).full(tuple(shape), fill_value, dtype=resolve(dtype)), requires_grad=requires_grad)


def arange(start, stop=None, step=1, dtype=None, device=None) -> Tensor:
    """Like numpy.arange; integer arguments give int64."""
    if stop is None:
        start, stop = 0, start
    if dtype is None:
        dtype = np.int64 if all(isinstance(v, (int, np.integer)) for v in (start, stop, step)) else get_default_dtype()
    return Tensor(_xp(device).arange(start, stop, step, dtype=dtype))


def _generator(generator, device):
    device = device or backend.default_device()
    if generator is None:
        return random.default_generator(device), device
    return generator, backend.rng_device(generator)


def randn(*shape, dtype=None, device=None, generator=None, requires_grad=False) -> Tensor:
    """Standard normal samples."""
    rng, _ = _generator(generator, device)
    return Tensor(rng.standard_normal(_shape(shape), dtype=resolve(dtype)), requires_grad=requires_grad)


def rand(*shape, dtype=None, device=None, generator=None, requires_grad=False) -> Tensor:
    """Uniform samples in [0, 1)."""
    rng, _ = _generator(generator, device)
    return Tensor(rng.random(_shape(shape), dtype=resolve(dtype)), requires_grad=requires_grad)


def zeros_like(t: Tensor, dtype=None, requires_grad=False) -> Tensor:
    return Tensor(t.xp.zeros(t.shape, dtype=dtype or t.dtype), requires_grad=requires_grad)


def ones_like(t: Tensor, dtype=None, requires_grad=False) -> Tensor:
    return Tensor(t.xp.ones(t.shape, dtype=dtype or t.dtype), requires_grad=requires_grad)
