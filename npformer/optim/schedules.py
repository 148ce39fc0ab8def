"""Learning-rate schedules: plain functions step -> lr, and `set_lr` to apply one.

    for it in range(max_iters):
        set_lr(optimizer, warmup_cosine(it, lr=6e-4, min_lr=6e-5, warmup_iters=200, lr_decay_iters=5000))
        ...
        optimizer.step()

Fix the hyperparameters with functools.partial to get a one-argument schedule.
"""

from __future__ import annotations

import math
import numbers

from .optimizer import nonnegative


def _step(it) -> int:
    if isinstance(it, bool) or not isinstance(it, numbers.Integral) or it < 0:
        raise ValueError(f"step must be an integer >= 0; got {it!r}")
    return int(it)


def constant(step: int, lr: float) -> float:
    """lr at every step."""
    _step(step)
    return nonnegative("lr", lr)


def warmup_cosine(step: int, lr: float, min_lr: float, warmup_iters: int, lr_decay_iters: int) -> float:
    """nanoGPT's schedule: linear warmup, cosine decay from lr to min_lr, then min_lr.

        step < warmup_iters:      lr * (step + 1) / (warmup_iters + 1)
        step > lr_decay_iters:    min_lr
        otherwise:                min_lr + 0.5 * (1 + cos(pi * r)) * (lr - min_lr),
                                  r = (step - warmup_iters) / (lr_decay_iters - warmup_iters)

    Needs 0 <= warmup_iters < lr_decay_iters (so that r is defined).
    """
    it = _step(step)
    lr, min_lr = nonnegative("lr", lr), nonnegative("min_lr", min_lr)
    warmup_iters, lr_decay_iters = _step(warmup_iters), _step(lr_decay_iters)
    if lr_decay_iters <= warmup_iters:
        raise ValueError(f"lr_decay_iters must be > warmup_iters; got lr_decay_iters={lr_decay_iters}, "
                         f"warmup_iters={warmup_iters}")
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return min_lr + coeff * (lr - min_lr)


def noam(step: int, d_model: int, warmup: int, factor: float = 1.0) -> float:
    """The Transformer paper's schedule (the "Noam" schedule of The Annotated Transformer).

        lr = factor * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)

    Steps are counted from 1; step 0 is treated as step 1 (so the first update gets a nonzero lr).
    It rises linearly for `warmup` steps, peaks at step == warmup, then decays as step^-0.5.
    """
    s = max(_step(step), 1)
    if isinstance(d_model, bool) or not isinstance(d_model, numbers.Integral) or d_model <= 0:
        raise ValueError(f"d_model must be a positive integer; got {d_model!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, numbers.Integral) or warmup <= 0:
        raise ValueError(f"warmup must be a positive integer; got {warmup!r}")
    factor = nonnegative("factor", factor)
    return factor * d_model ** -0.5 * min(s ** -0.5, s * warmup ** -1.5)


def set_lr(optimizer, lr) -> None:
    """Set the lr of every parameter group: one value for all, or a sequence with one per group."""
    groups = optimizer.param_groups
    if isinstance(lr, numbers.Real):
        lrs = [lr] * len(groups)
    else:
        lrs = list(lr)
        if len(lrs) != len(groups):
            raise ValueError(f"set_lr got {len(lrs)} learning rates for {len(groups)} parameter groups")
    for group, value in zip(groups, lrs):
        group["lr"] = nonnegative("lr", value)  # a Python float, never a NumPy scalar
