"""LLaMA twins: transformers' LlamaForCausalLM and LlamaModel <-> the npformer.models classes of the
same names, and the LLaMA part of from_pretrained / save_pretrained (pretrained.py calls it).

Configuration: HF's LlamaConfig fields carry over unchanged (npformer's LlamaConfig has HF's names):
    vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
    num_key_value_heads, head_dim, hidden_act, max_position_embeddings, initializer_range,
    rms_norm_eps, tie_word_embeddings, attention_bias, attention_dropout, mlp_bias, pad_token_id,
    bos_token_id, eos_token_id
    rope_parameters["rope_theta"] (transformers 5; config.json's top-level rope_theta before it) -> rope_theta
Only the default RoPE exists here: a rope_type other than "default" (llama3, linear, dynamic, yarn,
... in rope_parameters, or rope_scaling in older config.json files) raises ValueError naming it.
pretraining_tp and use_cache do not change what the model computes and are not carried.

Weights: the state-dict names are HF's (``model.layers.0.self_attn.q_proj.weight``) and so are the
layouts (Linear weights (out, in)), so they are copied by name and the twin needs no TorchMapping.
lm_head.weight is tied to model.embed_tokens.weight exactly when the HF model ties them.

Exported models use the sdpa attention path (attn_implementation="sdpa"): HF's eager path takes the
softmax in float32 even for float64 inputs. Two more float32 steps remain in HF's float64 forward
(transformers 5.25): LlamaRMSNorm normalises in float32, and LlamaRotaryEmbedding computes cos and
sin in float32 (npformer computes both in the model's dtype). In float64 the two agree to about 1e-7,
not 1e-10, unless those steps are made float64 on HF's side (tests/test_interop_llama.py does this).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from .. import backend

HF_CLASSES = ("LlamaForCausalLM", "LlamaModel")
FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
          "rms_norm_eps", "tie_word_embeddings", "attention_bias", "attention_dropout", "mlp_bias", "pad_token_id",
          "bos_token_id", "eos_token_id")
# transformers' LlamaConfig defaults, for the fields a config.json may leave out
DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
                max_position_embeddings=2048, initializer_range=0.02, rms_norm_eps=1e-6, tie_word_embeddings=False,
                attention_bias=False, attention_dropout=0.0, mlp_bias=False, pad_token_id=None, bos_token_id=1,
                eos_token_id=2, rope_parameters=None, rope_theta=None, rope_scaling=None)


def hf_llama_kind(module):
    """The class name for a transformers model in HF_CLASSES, else None (without importing transformers)."""
    cls = type(module)
    return cls.__name__ if cls.__name__ in HF_CLASSES and cls.__module__.startswith("transformers.") else None


def is_llama(module) -> bool:
    """True for an npformer LlamaModel or LlamaForCausalLM."""
    from ..models.llama import LlamaPreTrainedModel
    return isinstance(module, LlamaPreTrainedModel)


def _rope_theta(c) -> float:
    """RoPE's base from rope_parameters (transformers 5) or rope_theta / rope_scaling (config.json of
    older versions); ValueError for any rope type but the default."""
    params = dict(getattr(c, "rope_parameters", None) or {})
    scaling = dict(getattr(c, "rope_scaling", None) or {})
    for name, d in (("rope_parameters", params), ("rope_scaling", scaling)):
        kind = d.get("rope_type", d.get("type", "default"))
        if kind != "default":
            raise ValueError(f"LlamaConfig.{name} has rope_type {kind!r}, which is not supported (npformer's "
                             f"LLaMA has the default RoPE only)")
    theta = params.get("rope_theta", getattr(c, "rope_theta", None))
    return 10000.0 if theta is None else float(theta)


def config_from_hf(c):
    """npformer LlamaConfig equivalent to transformers' LlamaConfig c (or a namespace with its
    fields); ValueError naming any option npformer lacks or any bad value."""
    from ..models.llama import LlamaConfig
    values = {name: getattr(c, name, DEFAULTS[name]) for name in FIELDS}
    for name in ("initializer_range", "rms_norm_eps", "attention_dropout"):
        if isinstance(values[name], int) and not isinstance(values[name], bool):
            values[name] = float(values[name])
    return LlamaConfig(**values, rope_theta=_rope_theta(c))


def config_to_hf(config, **extra):
    """transformers' LlamaConfig (sdpa attention) equivalent to an npformer LlamaConfig."""
    import transformers
    values = {name: getattr(config, name) for name in FIELDS}
    if isinstance(values["eos_token_id"], tuple):
        values["eos_token_id"] = list(values["eos_token_id"])
    return transformers.LlamaConfig(**values, rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
                                    attn_implementation="sdpa", **extra)


def _tied(model) -> bool:
    """Whether an HF LlamaForCausalLM's lm_head is its embedding (its config says so, unless untied by hand)."""
    return model.lm_head.weight is model.model.embed_tokens.weight


def llama_from_hf(model, dtype, device=None):
    """The npformer twin (dtype, device) of an HF LlamaForCausalLM or LlamaModel, weights copied by name."""
    from ..models import llama
    kind = hf_llama_kind(model)
    config = config_from_hf(model.config)
    if kind == "LlamaForCausalLM":
        config = dataclasses.replace(config, tie_word_embeddings=_tied(model))
    twin = getattr(llama, kind)(config, dtype=dtype, device=device, init_weights=False)
    # cast=True: the dtype was chosen by the caller (or is the source's)
    twin.load_state_dict({k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}, cast=True)
    return twin.train(model.training)


def llama_to_hf(twin, torch_dtype):
    """The transformers model (sdpa attention, torch_dtype, CPU) of the class named like the npformer
    LLaMA `twin`, with its weights."""
    import torch
    import transformers
    kind = type(twin).__name__
    if kind not in HF_CLASSES:
        raise TypeError(f"to_torch: {kind} has no transformers twin; supported: {', '.join(HF_CLASSES)}")
    with torch.random.fork_rng(devices=[]):                # its random init leaves torch's RNG alone
        model = getattr(transformers, kind)(config_to_hf(twin.config))
    model = model.to(torch_dtype)
    model.load_state_dict({k: torch.from_numpy(np.array(backend.to_numpy(v))) for k, v in twin.state_dict().items()})
    return model.train(twin.training)


# ----------------------------------------------------------------------------- checkpoint directories

def load_pretrained(cfg: dict, arch: str, state: dict, file: str, dtype, device, init):
    """(model, report) for pretrained.from_pretrained: the config.json dict `cfg`, the weights `state`
    of `file`, init = (rng, ignore_mismatched_sizes) for a head drawn fresh. Handles a LlamaModel file
    (no ``model.`` prefix) as either class, a LlamaForCausalLM file as LlamaModel (lm_head left out,
    reported), a tied lm_head absent from the file (as HF writes it; the embedding is used even when
    the file has one) and an untied one absent (drawn fresh, reported). (pretrained._clean has already
    dropped old files' ``rotary_emb.inv_freq`` buffers: computed here.)"""
    from types import SimpleNamespace

    from ..models import llama
    from .pretrained import CONFIG, _fill
    values = dict(DEFAULTS)
    values.update({k: v for k, v in cfg.items() if k in DEFAULTS})
    try:
        config = config_from_hf(SimpleNamespace(**values))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{os.path.join(os.path.dirname(file), CONFIG)}: {exc}") from None
    if arch == "LlamaModel":
        state = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in state.items()}
    elif not any(k.startswith("model.") for k in state):         # saved from LlamaModel
        state = {(k if k.startswith("lm_head.") else "model." + k): v for k, v in state.items()}
    model = getattr(llama, arch)(config, dtype=dtype, device=device, init_weights=False)
    if arch == "LlamaForCausalLM" and config.tie_word_embeddings and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    init = (config.initializer_range,) + tuple(init)
    return model, _fill(model, state, file, f"{arch} in {CONFIG}", ("lm_head.",), init)


def export(model):
    """(config.json dict, {name: host array}) of an npformer LLaMA, as transformers' save_pretrained
    writes them (a tied lm_head.weight left out), or None for any other model."""
    if not is_llama(model):
        return None
    c = model.config
    cfg = {"model_type": "llama", "architectures": [type(model).__name__]}
    cfg.update({name: getattr(c, name) for name in FIELDS})
    if isinstance(cfg["eos_token_id"], tuple):
        cfg["eos_token_id"] = list(cfg["eos_token_id"])
    # transformers 5 reads rope_parameters; earlier versions read the top-level rope_theta
    cfg.update(rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, rope_theta=c.rope_theta)
    state = {k: np.ascontiguousarray(np.array(backend.to_numpy(v))) for k, v in model.state_dict().items()}
    if type(model).__name__ == "LlamaForCausalLM" and c.tie_word_embeddings:
        state.pop("lm_head.weight")
    return cfg, state
