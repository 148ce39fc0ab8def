"""Activations: tanh, sigmoid, relu, silu and gelu (exact and tanh forms); silu and gelu have fused backwards.

The derivations are in docs/derivations.md#silu and #gelu; GELU's fast version (in pieces that
stay in the cache, updated in place) is in npformer/fast/activations.py.
"""

from __future__ import annotations

import math

from .. import backend
from ._core import register, result, tensors

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@register
def tanh(a):
    """tanh(a). d/da = 1 - tanh(a)^2."""
    (a,) = tensors("tanh", a)
    out = a.xp.tanh(a.data)
    return result(out, (a,), lambda g: (g * (1 - out * out),), "tanh")


@register
def sigmoid(a):
    """1 / (1 + e^-a), computed without overflow. d/da = s (1 - s)."""
    (a,) = tensors("sigmoid", a)
    # 0.5 (1 + tanh(a/2)) equals the logistic function and never overflows.
    out = 0.5 * (1 + a.xp.tanh(0.5 * a.data))
    return result(out, (a,), lambda g: (g * out * (1 - out),), "sigmoid")


@register
def relu(a):
    """max(a, 0). d/da = 1 where a > 0, else 0."""
    (a,) = tensors("relu", a)
    out = a.xp.maximum(a.data, 0)
    return result(out, (a,), lambda g: (g * (a.data > 0),), "relu")


@register
def silu(a):
    """SiLU (swish, LLaMA's activation): y = a * s with s = sigmoid(a).  (docs/derivations.md#silu)

    Backward: da = g * s (1 + a (1 - s)). The backward keeps a and s.
    """
    (a,) = tensors("silu", a)
    xp, x = a.xp, a.data
    e = xp.exp(-xp.abs(x))                        # exp(-|a|) in (0, 1]: never overflows
    s = xp.where(x >= 0, 1.0, e) / (1.0 + e)      # 1/(1 + e^-a) for a >= 0, e^a/(1 + e^a) below
    y = x * s
    return result(y, (a,), lambda g: (g * s * (1 + x * (1 - s)),), "silu")


@register
def gelu(a, approximate: str = "none"):
    """GELU(a) = a * Phi(a), Phi the standard normal CDF (docs/derivations.md#gelu).

    approximate="none":  Phi = (1 + erf(a / sqrt 2)) / 2, phi = exp(-a^2 / 2) / sqrt(2 pi),
        y = a Phi;  da = g * (Phi + a phi).
    approximate="tanh" (GPT-2's "gelu_new"):  u = sqrt(2/pi) (a + 0.044715 a^3), t = tanh(u),
        y = a (1 + t) / 2;  da = g * ((1 + t) / 2 + a (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 a^2) / 2).
    The backward keeps a and Phi (or t).
    """
    (a,) = tensors("gelu", a)
    check_gelu(a, approximate)
    xp, x = a.xp, a.data
    if approximate == "none":
        Phi = 0.5 * (1 + backend.erf(x * _INV_SQRT_2))
        y = x * Phi

        def backward(g):
            phi = xp.exp(-0.5 * x * x) * _INV_SQRT_2PI
            return (g * (Phi + x * phi),)
    else:
        u = _SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)
        t = xp.tanh(u)
        y = 0.5 * x * (1 + t)

        def backward(g):
            return (g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)),)
    return result(y, (a,), backward, "gelu")


def check_gelu(a, approximate) -> None:
    """Raise unless `approximate` is "none" or "tanh" and `a` is floating point (shared with npformer/fast)."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh'; got {approximate!r}")
    if a.dtype.kind not in "fc":
        raise TypeError(f"gelu: the input must be floating point; got dtype {a.dtype}")
