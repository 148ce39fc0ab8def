"""Rebuilding a trained model from a checkpoint directory."""

from __future__ import annotations

import numpy as np

from .. import backend
from ..models.gpt import GPT, GPTConfig
from ..models.llama import LlamaConfig, LlamaForCausalLM
from ..models.rnn_lm import RNNLM, RNNLMConfig
from .checkpoint import CheckpointError, load_checkpoint


LANGUAGE_MODELS = {"gpt": (GPT, GPTConfig), "llama": (LlamaForCausalLM, LlamaConfig),
                   "lstm": (RNNLM, RNNLMConfig), "gru": (RNNLM, RNNLMConfig)}
NAMES = {"gpt": "GPT", "llama": "LLaMA", "lstm": "LSTM", "gru": "GRU"}


def load_gpt(path: str, device: str = None, kinds=("gpt",)):
    """(model in eval mode, tokenizer) from a pretraining checkpoint or run directory.

    kinds: the models accepted, of LANGUAGE_MODELS ("gpt"; all of them for load_language_model).
    Raises CheckpointError when the checkpoint holds another model, or its weights do not
    fit its own config. A run whose latest checkpoint is damaged is not silently
    replaced by an older one: the one-line error names the newest intact checkpoint.
    """
    ckpt = load_checkpoint(path, fallback=False)
    kind = ckpt.meta.get("model")
    if kind not in kinds:
        raise CheckpointError(f"{ckpt.path} holds a {kind!r} model, not a {' or a '.join(NAMES[k] for k in kinds)}")
    cls, config_cls = LANGUAGE_MODELS[kind]
    try:
        config = config_cls(**ckpt.meta["model_config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{ckpt.path}: model_config is invalid ({exc})") from None
    if getattr(config, "cell", kind) != kind:
        raise CheckpointError(f"{ckpt.path}: the checkpoint says {kind!r} but its model_config has cell "
                              f"{config.cell!r}")
    if config.vocab_size != ckpt.tokenizer.vocab_size:
        raise CheckpointError(f"{ckpt.path}: the model has vocab_size {config.vocab_size} but its tokenizer "
                              f"has {ckpt.tokenizer.vocab_size} tokens")
    model = cls(config, device=device or backend.default_device(), dtype=np.float32)
    try:
        model.load_state_dict(ckpt.model_state)
    except ValueError as exc:
        raise CheckpointError(f"{ckpt.path}: weights do not fit the config ({exc})") from None
    return model.eval(), ckpt.tokenizer


def load_language_model(path: str, device: str = None):
    """load_gpt for a GPT, LLaMA, LSTM or GRU pretraining run (what ``npformer generate`` samples from)."""
    return load_gpt(path, device, kinds=tuple(LANGUAGE_MODELS))
