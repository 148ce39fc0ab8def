"""GPT-2 twins: transformers' GPT2LMHeadModel <-> npformer.models.GPT.

Configuration (GPT2Config -> GPTConfig):
    vocab_size, n_layer, n_head, n_embd          -> the same fields
    n_positions                                  -> block_size
    layer_norm_epsilon                           -> layer_norm_eps
    activation_function "gelu_new" (GPT-2's) or
        "gelu_pytorch_tanh"                      -> gelu_approximate "tanh";  "gelu" -> "none"
    resid_pdrop = embd_pdrop = attn_pdrop        -> dropout (npformer's GPT has one)
Anything GPT's architecture lacks (scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn,
add_cross_attention, scale_attn_weights=False, n_inner != 4 n_embd, untied embeddings, another
activation) raises ValueError naming the option.

Weights keep their names (``transformer.h.0.attn.c_attn.weight``). GPT-2's Conv1D layers
(attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) store weight as (in, out); npformer's Linear
stores (out, in), so those weights are transposed on the way in and out. lm_head.weight is tied
to transformer.wte.weight on both sides. Exported models use the eager attention path
(attn_implementation="eager"), the plain softmax(q k^T / sqrt(hs)) v that npformer computes.
"""

from __future__ import annotations

import numpy as np

from .. import backend

_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
# config attribute -> the only value npformer's GPT can mirror
_FIXED = {"scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
          "add_cross_attention": False, "scale_attn_weights": True, "tie_word_embeddings": True}


def is_hf_gpt2(module) -> bool:
    """True for a transformers GPT2LMHeadModel (checked by class, without importing transformers)."""
    cls = type(module)
    return cls.__name__ == "GPT2LMHeadModel" and cls.__module__.startswith("transformers.")


def _conv1d_weights(model) -> set:
    """Names of the (in, out)-stored Conv1D weights of an HF model."""
    from transformers.pytorch_utils import Conv1D
    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, Conv1D)}


def config_from_hf(c):
    """GPTConfig equivalent to a GPT2Config c; ValueError naming any option GPT cannot mirror."""
    from ..models.gpt import GPTConfig
    for name, wanted in _FIXED.items():
        value = getattr(c, name, wanted)
        if bool(value) != wanted:
            raise ValueError(f"GPT2Config.{name}={value!r} is not supported (npformer's GPT needs {wanted})")
    if c.n_inner is not None and c.n_inner != 4 * c.n_embd:
        raise ValueError(f"GPT2Config.n_inner={c.n_inner} is not supported (npformer's GPT uses 4 * n_embd = "
                         f"{4 * c.n_embd})")
    if c.activation_function not in _GELU:
        raise ValueError(f"GPT2Config.activation_function={c.activation_function!r} is not supported; "
                         f"supported: {', '.join(map(repr, _GELU))}")
    drops = {name: float(getattr(c, name)) for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if len(set(drops.values())) != 1:
        raise ValueError(f"GPT2Config: resid_pdrop, embd_pdrop and attn_pdrop must be equal (npformer's GPT has "
                         f"one dropout); got {drops}")
    return GPTConfig(vocab_size=c.vocab_size, block_size=c.n_positions, n_layer=c.n_layer, n_head=c.n_head,
                     n_embd=c.n_embd, dropout=drops["resid_pdrop"], bias=True,
                     gelu_approximate=_GELU[c.activation_function], layer_norm_eps=float(c.layer_norm_epsilon))


def config_to_hf(config):
    """GPT2Config (eager attention) equivalent to a GPTConfig."""
    import transformers
    if not config.bias:
        raise ValueError("GPTConfig.bias=False is not supported by GPT2LMHeadModel (GPT-2 has biases)")
    return transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer,
        n_head=config.n_head, n_inner=None,
        activation_function="gelu_new" if config.gelu_approximate == "tanh" else "gelu",
        resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
        layer_norm_epsilon=config.layer_norm_eps, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
        attn_implementation="eager")


def gpt_from_hf(model, dtype, device=None):
    """npformer GPT (dtype, device) with the weights of the HF GPT2LMHeadModel `model`."""
    from ..models.gpt import GPT
    config = config_from_hf(model.config)
    if model.lm_head.weight is not model.transformer.wte.weight:
        raise ValueError("GPT2LMHeadModel: lm_head.weight is not tied to transformer.wte.weight; npformer's GPT "
                         "ties them (tie_word_embeddings=True)")
    gpt = GPT(config, dtype=dtype, device=device)
    conv = _conv1d_weights(model)
    state = {}
    for name, t in model.state_dict().items():
        a = t.detach().cpu().numpy()
        state[name] = a.T if name in conv else a                   # (in, out) -> (out, in)
    gpt.load_state_dict(state, cast=True)          # the dtype was chosen by the caller (or is the source's)
    return gpt.train(model.training)


def gpt_to_hf(gpt, torch_dtype):
    """HF GPT2LMHeadModel (eager attention, torch_dtype, CPU) with the weights of npformer's `gpt`."""
    import torch
    import transformers
    hf_config = config_to_hf(gpt.config)
    with torch.random.fork_rng(devices=[]):                        # its random init leaves torch's RNG alone
        model = transformers.GPT2LMHeadModel(hf_config)
    model = model.to(torch_dtype)
    conv = _conv1d_weights(model)
    state = {}
    for name, a in gpt.state_dict().items():
        a = backend.to_numpy(a)
        state[name] = torch.from_numpy(np.ascontiguousarray(a.T if name in conv else a))   # (out, in) -> (in, out)
    model.load_state_dict(state)
    return model.train(gpt.training)
