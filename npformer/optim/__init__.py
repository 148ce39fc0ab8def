"""Optimizers, gradient clipping and learning-rate schedules (PyTorch's update rules).

    from npformer.optim import AdamW, clip_grad_norm, set_lr, warmup_cosine, weight_decay_groups
    opt = AdamW(weight_decay_groups(model.named_parameters(), 0.1), lr=6e-4)
    loss.backward(); clip_grad_norm(model.parameters(), 1.0); opt.step(); opt.zero_grad()
"""

from .adam import Adam, AdamW
from .clip import clip_grad_norm
from .groups import weight_decay_groups
from .optimizer import Optimizer
from .schedules import constant, noam, set_lr, warmup_cosine
from .sgd import SGD

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "clip_grad_norm", "weight_decay_groups",
           "constant", "warmup_cosine", "noam", "set_lr"]
