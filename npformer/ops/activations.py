"""Activations: tanh, sigmoid, relu and gelu (exact and tanh forms, fused backward).

The GELU derivations are in docs/derivations.md#gelu.
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
def gelu(a, approximate: str = "none"):
    """GELU(a) = a * Phi(a), Phi the standard normal CDF.

    approximate="none": Phi(a) = (1 + erf(a / sqrt 2)) / 2, and
        d/da = Phi(a) + a * phi(a), phi(a) = exp(-a^2/2) / sqrt(2 pi).
    approximate="tanh" (GPT-2's "gelu_new"): Phi(a) ~ (1 + tanh(u)) / 2 with
        u = sqrt(2/pi) (a + 0.044715 a^3), and
        d/da = (1 + t)/2 + a (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 a^2) / 2, t = tanh(u).
    """
    (a,) = tensors("gelu", a)
    xp, shape = a.xp, a.shape
    x = a.data.reshape(-1)          # 1-D, so in-place updates also work for 0-d inputs
    # Written with in-place updates of a few scratch arrays: on large activations the
    # temporaries of the plain formulas cost more than the arithmetic.
    if approximate == "none":
        cdf = backend.erf(x * _INV_SQRT_2)
        cdf += 1
        cdf *= 0.5                                       # Phi(x)
        out = x * cdf

        def backward(g):
            d = x * x
            d *= -0.5
            xp.exp(d, out=d)
            d *= x
            d *= _INV_SQRT_2PI                           # x phi(x)
            d += cdf                                     # Phi(x) + x phi(x)
            d *= g.reshape(-1)
            return (d.reshape(shape),)
    elif approximate == "tanh":
        # With h = (1 + tanh(u)) / 2 the output is x h, and since 1 - tanh(u)^2 = 4 h (1 - h),
        # the derivative is h + 2 h (1 - h) x du/dx: h is the only array saved.
        h = x * x
        h *= _SQRT_2_OVER_PI * 0.044715
        h += _SQRT_2_OVER_PI
        h *= x                                           # u = sqrt(2/pi) (x + 0.044715 x^3)
        xp.tanh(h, out=h)
        h += 1
        h *= 0.5                                         # h = (1 + tanh(u)) / 2
        out = x * h

        def backward(g):
            w = x * x
            w *= 6 * 0.044715 * _SQRT_2_OVER_PI
            w += 2 * _SQRT_2_OVER_PI
            w *= x                                       # 2 x du/dx
            d = xp.subtract(1, h)
            d *= h
            d *= w
            d += h                                       # h + 2 h (1 - h) x du/dx
            d *= g.reshape(-1)
            return (d.reshape(shape),)
    else:
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh'; got {approximate!r}")
    return result(out.reshape(shape), (a,), backward, "gelu")
