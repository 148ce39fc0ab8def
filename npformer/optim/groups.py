"""Parameter groups with and without weight decay, split by rank as nanoGPT does."""

from __future__ import annotations

from .optimizer import nonnegative


def weight_decay_groups(named_parameters, weight_decay: float) -> list[dict]:
    """Two parameter groups: weights decayed, biases and norm gains not.

    named_parameters: an iterable of (name, Tensor) pairs, e.g. ``model.named_parameters()``.
    Tensors with ndim >= 2 (matmul and embedding weights) go to the first group with
    ``weight_decay``; those with ndim < 2 (biases, layer-norm weights) to the second with 0.0.
    Tensors that do not require grad are left out, and a tensor listed twice (tied weights) is kept
    once, under its first name. Each group carries ``param_names``. Either group may be empty.

        AdamW(weight_decay_groups(model.named_parameters(), 0.1), lr=6e-4, betas=(0.9, 0.95))
    """
    weight_decay = nonnegative("weight_decay", weight_decay)
    decay = {"params": [], "param_names": [], "weight_decay": weight_decay}
    no_decay = {"params": [], "param_names": [], "weight_decay": 0.0}
    seen = set()
    for name, p in named_parameters:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        group = decay if p.ndim >= 2 else no_decay
        group["params"].append(p)
        group["param_names"].append(name)
    return [decay, no_decay]
