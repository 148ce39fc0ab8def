"""Gradient clipping by the global norm of all gradients, as ``torch.nn.utils.clip_grad_norm_``."""

from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..tensor import Tensor
from .optimizer import as_float, nonnegative


def _vector_norm(xp, a, norm_type: float):
    """The p-norm of `a` flattened, as a 0-d array on a's device and in its dtype."""
    return xp.linalg.norm(a.reshape(-1), ord=norm_type)


def clip_grad_norm(params, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> float:
    """Scale all grads in place so that their joint norm is at most `max_norm`; return the norm before.

    total = ||(||g_1||_p, ..., ||g_n||_p)||_p over the parameters whose grad is not None
    (for p = 2: sqrt(sum of all squared entries)); when scale = max_norm / (total + 1e-6) < 1,
    every grad is multiplied by scale. A non-finite total leaves the grads unchanged, or raises a
    RuntimeError when error_if_nonfinite.

    params: a Tensor or an iterable of Tensors. norm_type: p > 0, or math.inf for the max-abs norm.
    Returns the total as a Python float (0.0 when no parameter has a grad).
    """
    max_norm = nonnegative("max_norm", max_norm)
    norm_type = as_float("norm_type", norm_type)
    if not norm_type > 0:
        raise ValueError(f"norm_type must be > 0 (or math.inf); got {norm_type!r}")
    params = [params] if isinstance(params, Tensor) else list(params)
    grads = [p.grad for p in params if p.grad is not None and p.grad.size > 0]
    if not grads:
        return 0.0

    # each grad's norm on its device, brought to the host in one transfer per device; then their norm
    per_device = {}
    for g in grads:
        xp = backend.get_array_module(g)
        per_device.setdefault(xp, []).append(_vector_norm(xp, g, norm_type))
    norms = np.concatenate([backend.to_numpy(xp.stack(n)) for xp, n in per_device.items()])
    total = float(_vector_norm(np, norms, norm_type))

    if not math.isfinite(total):
        if error_if_nonfinite:
            raise RuntimeError(f"the total {norm_type}-norm of the gradients is {total}; cannot clip")
        return total
    scale = max_norm / (total + 1e-6)
    if scale < 1.0:
        for g in grads:
            g *= scale
    return total
