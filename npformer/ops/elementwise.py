"""Elementwise arithmetic: add, sub, mul, div, neg, pow, exp, log, sqrt, abs, maximum, minimum.

Binary ops broadcast like NumPy; their backward reduces each gradient to its
input's shape with ``unbroadcast``.
"""

from __future__ import annotations

from ._core import needs, register, result, shape_error, tensors, unbroadcast


def _binary(name, a, b, fn):
    a, b = tensors(name, a, b)
    try:
        out = fn(a.data, b.data)
    except ValueError:
        raise shape_error(name, a.shape, b.shape) from None
    return a, b, out


@register
def add(a, b):
    """a + b, broadcasting. d/da = 1, d/db = 1."""
    a, b, out = _binary("add", a, b, lambda x, y: x + y)
    # the closure keeps shapes and flags, not the inputs: a residual stream that nothing else
    # needs for the backward is then freed as soon as the forward is done with it
    sa, sb, na, nb = a.shape, b.shape, needs(a), needs(b)
    return result(out, (a, b), lambda g: (unbroadcast(g, sa) if na else None,
                                          unbroadcast(g, sb) if nb else None), "add")


@register
def sub(a, b):
    """a - b, broadcasting. d/da = 1, d/db = -1."""
    a, b, out = _binary("sub", a, b, lambda x, y: x - y)
    sa, sb, na, nb = a.shape, b.shape, needs(a), needs(b)
    return result(out, (a, b), lambda g: (unbroadcast(g, sa) if na else None,
                                          unbroadcast(-g, sb) if nb else None), "sub")


@register
def mul(a, b):
    """a * b, broadcasting. d/da = b, d/db = a."""
    a, b, out = _binary("mul", a, b, lambda x, y: x * y)
    return result(out, (a, b), lambda g: (unbroadcast(g * b.data, a.shape) if needs(a) else None,
                                          unbroadcast(g * a.data, b.shape) if needs(b) else None), "mul")


@register
def div(a, b):
    """a / b, broadcasting. d/da = 1/b, d/db = -a/b^2 = -out/b."""
    a, b, out = _binary("div", a, b, lambda x, y: x / y)

    def backward(g):
        ga = g / b.data
        return (unbroadcast(ga, a.shape) if needs(a) else None,
                unbroadcast(-ga * out, b.shape) if needs(b) else None)
    return result(out, (a, b), backward, "div")


@register
def neg(a):
    """-a."""
    (a,) = tensors("neg", a)
    return result(-a.data, (a,), lambda g: (-g,), "neg")


@register
def pow(a, b):
    """a ** b, broadcasting. d/da = b a^(b-1); d/db = a^b log(a) (needs a > 0)."""
    a, b, out = _binary("pow", a, b, lambda x, y: x ** y)

    def backward(g):
        xp = a.xp
        ga = gb = None
        if needs(a):
            ga = unbroadcast(g * b.data * a.data ** (b.data - 1), a.shape)
        if needs(b):
            gb = unbroadcast(g * out * xp.log(a.data), b.shape)
        return ga, gb
    return result(out, (a, b), backward, "pow")


@register
def exp(a):
    """e^a. d/da = e^a."""
    (a,) = tensors("exp", a)
    out = a.xp.exp(a.data)
    return result(out, (a,), lambda g: (g * out,), "exp")


@register
def log(a):
    """Natural log. d/da = 1/a."""
    (a,) = tensors("log", a)
    return result(a.xp.log(a.data), (a,), lambda g: (g / a.data,), "log")


@register
def sqrt(a):
    """Square root. d/da = 1 / (2 sqrt(a))."""
    (a,) = tensors("sqrt", a)
    out = a.xp.sqrt(a.data)
    return result(out, (a,), lambda g: (g / (2 * out),), "sqrt")


@register
def abs(a):
    """|a|. d/da = sign(a) (0 at 0, as in torch)."""
    (a,) = tensors("abs", a)
    return result(a.xp.abs(a.data), (a,), lambda g: (g * a.xp.sign(a.data),), "abs")


def _extremum(name, a, b, pick_a):
    """maximum/minimum; where a == b each input gets half the gradient (torch's rule)."""
    a, b = tensors(name, a, b)
    a, b, out = _binary(name, a, b, a.xp.maximum if pick_a == "max" else a.xp.minimum)

    def backward(g):
        wins = (a.data > b.data) if pick_a == "max" else (a.data < b.data)
        share = wins + 0.5 * (a.data == b.data)            # weight on a: 1, 1/2 or 0
        share = share.astype(g.dtype, copy=False)
        return (unbroadcast(g * share, a.shape) if needs(a) else None,
                unbroadcast(g * (1 - share), b.shape) if needs(b) else None)
    return result(out, (a, b), backward, name)


@register
def maximum(a, b):
    """Elementwise max, broadcasting; ties split the gradient evenly."""
    return _extremum("maximum", a, b, "max")


@register
def minimum(a, b):
    """Elementwise min, broadcasting; ties split the gradient evenly."""
    return _extremum("minimum", a, b, "min")
