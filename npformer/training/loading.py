"""Rebuilding a trained model from a checkpoint directory."""

from __future__ import annotations

import numpy as np

from .. import backend
from ..models.gpt import GPT, GPTConfig
from .checkpoint import CheckpointError, load_checkpoint


def load_gpt(path: str, device: str = None):
    """(model in eval mode, tokenizer) from a pretraining checkpoint or run directory.

    Raises CheckpointError when the checkpoint is not a GPT, or its weights do not
    fit its own config. A run whose latest checkpoint is damaged is not silently
    replaced by an older one: the one-line error names the newest intact checkpoint.
    """
    ckpt = load_checkpoint(path, fallback=False)
    if ckpt.meta.get("model") != "gpt":
        raise CheckpointError(f"{ckpt.path} holds a {ckpt.meta.get('model')!r} model, not a GPT")
    try:
        config = GPTConfig(**ckpt.meta["model_config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{ckpt.path}: model_config is invalid ({exc})") from None
    if config.vocab_size != ckpt.tokenizer.vocab_size:
        raise CheckpointError(f"{ckpt.path}: the model has vocab_size {config.vocab_size} but its tokenizer "
                              f"has {ckpt.tokenizer.vocab_size} tokens")
    model = GPT(config, device=device or backend.default_device(), dtype=np.float32)
    try:
        model.load_state_dict(ckpt.model_state)
    except ValueError as exc:
        raise CheckpointError(f"{ckpt.path}: weights do not fit the config ({exc})") from None
    return model.eval(), ckpt.tokenizer
