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


# GELU runs over its input in pieces of this many elements on the CPU (one piece on a GPU; see
# backend.elementwise_pieces): the scratch arrays of one piece stay in the core's L2 cache
# through all of its passes (on the large benchmark config, a (512, 1536) float32 activation:
# forward plus backward 3.9 -> 2.3 ms). Each element's arithmetic is unchanged, so the result
# is the same to the bit.
GELU_CHUNK = 65536


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
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh'; got {approximate!r}")
    if a.dtype.kind not in "fc":
        raise TypeError(f"gelu: the input must be floating point; got dtype {a.dtype}")
    xp, shape = a.xp, a.shape
    x = a.data.reshape(-1)          # 1-D, so in-place updates also work for 0-d inputs
    # Written with in-place updates of a few scratch arrays: on large activations the
    # temporaries of the plain formulas cost more than the arithmetic.
    pieces = backend.elementwise_pieces(x.size, a.device, GELU_CHUNK)
    kept = xp.empty_like(x)         # Phi(x) ("none") or h ("tanh"), for the backward
    out = xp.empty_like(x)
    forward_piece = _gelu_erf_forward if approximate == "none" else _gelu_tanh_forward
    for sl in pieces:
        forward_piece(xp, x[sl], kept[sl], out[sl])

    def backward(g):
        g = g.reshape(-1)
        d = xp.empty_like(x)
        work = xp.empty(pieces[0].stop if pieces else 0, dtype=x.dtype)     # the first piece is the longest
        backward_piece = _gelu_erf_backward if approximate == "none" else _gelu_tanh_backward
        for sl in pieces:
            backward_piece(xp, x[sl], kept[sl], g[sl], d[sl], work[:sl.stop - sl.start])
        return (d.reshape(shape),)
    return result(out.reshape(shape), (a,), backward, "gelu")


def _gelu_erf_forward(xp, x, cdf, out):
    cdf[...] = backend.erf(x * _INV_SQRT_2)
    cdf += 1
    cdf *= 0.5                                           # Phi(x)
    xp.multiply(x, cdf, out=out)


def _gelu_erf_backward(xp, x, cdf, g, d, work):    # work: unused (the tanh form needs one)
    xp.multiply(x, x, out=d)
    d *= -0.5
    xp.exp(d, out=d)
    d *= x
    d *= _INV_SQRT_2PI                                   # x phi(x)
    d += cdf                                             # Phi(x) + x phi(x)
    d *= g


def _gelu_tanh_forward(xp, x, h, out):
    # With h = (1 + tanh(u)) / 2 the output is x h, and since 1 - tanh(u)^2 = 4 h (1 - h),
    # the derivative is h + 2 h (1 - h) x du/dx: h is the only array saved.
    xp.multiply(x, x, out=h)
    h *= _SQRT_2_OVER_PI * 0.044715
    h += _SQRT_2_OVER_PI
    h *= x                                               # u = sqrt(2/pi) (x + 0.044715 x^3)
    xp.tanh(h, out=h)
    h += 1
    h *= 0.5                                             # h = (1 + tanh(u)) / 2
    xp.multiply(x, h, out=out)


def _gelu_tanh_backward(xp, x, h, g, d, w):
    xp.multiply(x, x, out=w)
    w *= 6 * 0.044715 * _SQRT_2_OVER_PI
    w += 2 * _SQRT_2_OVER_PI
    w *= x                                               # 2 x du/dx
    xp.subtract(1, h, out=d)
    d *= h
    d *= w
    d += h                                               # h + 2 h (1 - h) x du/dx
    d *= g
