"""Numerical gradient checking by central differences, in float64.

``gradcheck(fn, inputs)`` compares the gradients autograd computes for every
input that requires grad against (f(x + eps) - f(x - eps)) / (2 eps). Like
``torch.autograd.gradcheck`` it returns True or raises ``GradcheckError`` with a
report naming the input, the worst element and both values.

To keep the check to one backward pass per call, every output is contracted
with a fixed random cotangent v (L = sum_i <v_i, out_i>): the check then covers
the vector-Jacobian product for that v, which is what backward computes.
For large inputs, ``directions=k`` checks k random directional derivatives
per input instead of every element.
"""

from __future__ import annotations

import numpy as np

from . import autograd, backend
from .tensor import Tensor


class GradcheckError(AssertionError):
    """Analytical and numerical gradients disagree."""


def _outputs(fn, inputs):
    out = fn(*inputs)
    outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    for o in outs:
        if not isinstance(o, Tensor):
            raise TypeError(f"gradcheck: fn must return Tensors; got {type(o).__name__}")
    return outs


def _contract(outs, cotangents) -> float:
    """L = sum_i sum(v_i * out_i), accumulated in float64 on the host."""
    total = 0.0
    for o, v in zip(outs, cotangents):
        total += float(np.sum(backend.to_numpy(o.data).astype(np.float64) * v))
    return total


def gradcheck(fn, inputs, eps: float = 1e-6, atol: float = 1e-5, rtol: float = 1e-3,
              directions: int | None = None, seed: int = 0, raise_exception: bool = True) -> bool:
    """Check autograd's gradients of `fn` at `inputs` against central differences.

    fn: called as fn(*inputs); returns a Tensor or a tuple of Tensors.
    inputs: a sequence; every Tensor with requires_grad=True is checked and must
        be float64. Other entries (integer targets, masks, numbers) pass through.
    eps: the finite-difference step. atol, rtol: an element passes when
        |analytical - numerical| <= atol + rtol * |numerical|.
    directions: None checks every element; k checks k random unit directions
        per input (for large inputs).
    Returns True, or raises GradcheckError (returns False if raise_exception=False).
    """
    inputs = list(inputs)
    checked = [i for i, x in enumerate(inputs) if isinstance(x, Tensor) and x.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input has requires_grad=True")
    for i in checked:
        if inputs[i].dtype != np.float64:
            raise TypeError(f"gradcheck: input {i} has dtype {inputs[i].dtype}; gradcheck needs float64 inputs")
    rng = np.random.default_rng(seed)

    # Analytical: one backward of L = <v, out> per output into fresh leaves.
    leaves = [Tensor(x.data.copy(), requires_grad=True) if i in checked else x for i, x in enumerate(inputs)]
    outs = _outputs(fn, leaves)
    cotangents = [rng.standard_normal(o.shape) for o in outs]
    for o, v in zip(outs, cotangents):
        if o.requires_grad:
            xp = backend.get_array_module(o.data)
            o.backward(xp.asarray(v.astype(o.dtype)), retain_graph=True)
    analytical = {}
    for i in checked:
        g = leaves[i].grad
        if g is not None and (tuple(g.shape) != inputs[i].shape or g.dtype != inputs[i].dtype):
            raise GradcheckError(f"gradcheck: gradient of input {i} has shape {tuple(g.shape)} and dtype "
                                 f"{g.dtype}; expected {inputs[i].shape} and {inputs[i].dtype}")
        analytical[i] = np.zeros(inputs[i].shape) if g is None else backend.to_numpy(g).astype(np.float64)

    # Numerical: perturb a private copy of each input, element by element or along directions.
    def loss_at(i, data):
        trial = list(inputs)
        trial[i] = Tensor(data)
        with autograd.no_grad():
            return _contract(_outputs(fn, trial), cotangents)

    for i in checked:
        x0 = inputs[i].data
        xp = backend.get_array_module(x0)
        if directions is None:
            num = np.zeros(inputs[i].shape)
            flat = x0.copy().reshape(-1)
            for k in range(flat.size):
                orig = flat[k].item()
                flat[k] = orig + eps
                hi = loss_at(i, flat.reshape(x0.shape))
                flat[k] = orig - eps
                lo = loss_at(i, flat.reshape(x0.shape))
                flat[k] = orig
                num.reshape(-1)[k] = (hi - lo) / (2 * eps)
            ana = analytical[i]
            labels = None
        else:
            us = rng.standard_normal((directions,) + inputs[i].shape)
            us /= np.sqrt((us.reshape(directions, -1) ** 2).sum(1)).reshape((-1,) + (1,) * len(inputs[i].shape))
            num = np.empty(directions)
            ana = np.empty(directions)
            for d in range(directions):
                u = xp.asarray(us[d])
                num[d] = (loss_at(i, x0 + eps * u) - loss_at(i, x0 - eps * u)) / (2 * eps)
                ana[d] = float(np.sum(analytical[i] * us[d]))
            labels = "direction"
        err = np.abs(ana - num) - (atol + rtol * np.abs(num))
        err = np.where(np.isnan(err), np.inf, err)   # a NaN on either side is a failure
        if err.size and err.max() > 0:
            w = np.unravel_index(int(np.argmax(err)), err.shape)
            where = f"{labels} {w[0]}" if labels else f"element {tuple(int(j) for j in w)}"
            msg = (f"gradcheck: input {i} (shape {inputs[i].shape}) disagrees at {where}: "
                   f"analytical {ana[w]:.10g}, numerical {num[w]:.10g} "
                   f"(|diff| {abs(ana[w] - num[w]):.3g} > atol {atol:g} + rtol {rtol:g} * |numerical|)")
            if raise_exception:
                raise GradcheckError(msg)
            return False
    return True
