"""Parameter initialisers. Each fills a tensor in place and returns it, like ``torch.nn.init``.

Every initialiser takes an optional ``generator`` (npformer.random.Generator);
None means the global generator of the tensor's device (npformer.manual_seed).
Samples are drawn in float64 and then cast, so a float32 and a float64 model
built from the same seed hold the same values up to rounding.
"""

from __future__ import annotations

import math

import numpy as np

from .. import backend, random
from ..tensor import Tensor


def _rng(tensor: Tensor, generator):
    return generator if generator is not None else random.default_generator(tensor.device)


def _fill(tensor: Tensor, values) -> Tensor:
    """Copy `values` (drawn on any device, float64) into tensor.data in place."""
    values = backend.to_device(values, tensor.device) if backend.is_array(values) else values
    tensor.data[...] = values.astype(tensor.dtype) if backend.is_array(values) else values
    return tensor


def fan_in_and_fan_out(tensor: Tensor):
    """(fan_in, fan_out) of a weight: (in, out) for a 2-D (out, in) weight, as torch computes them."""
    if tensor.ndim < 2:
        raise ValueError(f"fan in and fan out need a tensor with at least 2 dimensions; got shape {tensor.shape}")
    receptive = int(np.prod(tensor.shape[2:])) if tensor.ndim > 2 else 1
    return tensor.shape[1] * receptive, tensor.shape[0] * receptive


def uniform_(tensor: Tensor, a: float = 0.0, b: float = 1.0, generator=None) -> Tensor:
    """Fill with samples from U(a, b)."""
    u = _rng(tensor, generator).random(tensor.shape)
    return _fill(tensor, a + (b - a) * u)


def normal_(tensor: Tensor, mean: float = 0.0, std: float = 1.0, generator=None) -> Tensor:
    """Fill with samples from N(mean, std^2)."""
    z = _rng(tensor, generator).standard_normal(tensor.shape)
    return _fill(tensor, mean + std * z)


def zeros_(tensor: Tensor) -> Tensor:
    return _fill(tensor, 0)


def ones_(tensor: Tensor) -> Tensor:
    return _fill(tensor, 1)


def constant_(tensor: Tensor, value: float) -> Tensor:
    return _fill(tensor, value)


def xavier_uniform_(tensor: Tensor, gain: float = 1.0, generator=None) -> Tensor:
    """Glorot: U(-a, a) with a = gain * sqrt(6 / (fan_in + fan_out))."""
    fan_in, fan_out = fan_in_and_fan_out(tensor)
    a = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform_(tensor, -a, a, generator=generator)


def xavier_normal_(tensor: Tensor, gain: float = 1.0, generator=None) -> Tensor:
    """Glorot: N(0, std^2) with std = gain * sqrt(2 / (fan_in + fan_out))."""
    fan_in, fan_out = fan_in_and_fan_out(tensor)
    return normal_(tensor, 0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)), generator=generator)


def linear_default_(weight: Tensor, bias: Tensor | None = None, generator=None) -> None:
    """torch.nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in)) for weight (out, in) and bias.

    (torch spells the weight part kaiming_uniform_(a=sqrt(5)), which is the same bound.)
    """
    fan_in, _ = fan_in_and_fan_out(weight)
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    uniform_(weight, -bound, bound, generator=generator)
    if bias is not None:
        uniform_(bias, -bound, bound, generator=generator)
