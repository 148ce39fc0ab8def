"""T5 twins and checkpoints: transformers' T5Model and T5ForConditionalGeneration <-> npformer.models.t5's
classes of the same names, and HF checkpoint directories (config.json + model.safetensors).

    twin = t5_from_torch(hf_model)            # weights copied by name (the names are HF's)
    hf_model = t5_to_torch(twin)
    model = t5_from_pretrained("dir")         # no torch: safetensors.numpy
    t5_save_pretrained(model, "dir")          # transformers.T5ForConditionalGeneration.from_pretrained reads it

Configuration: HF's T5Config fields carry over by name (FIELDS). feed_forward_proj must be "relu" or
"gated-gelu"; is_decoder must be False and is_encoder_decoder True (a T5EncoderModel is not supported).
initializer_factor and dropout_rate are carried; use_cache and classifier_dropout are not model options here.

Tied embeddings. transformers 5 reads a config's tie_word_embeddings only as "scale the decoder's
output by d_model^-0.5" (its scale_decoder_outputs) and ties lm_head to shared anyway, unless a
checkpoint holds an lm_head.weight that differs from shared.weight (T5 v1.1, Flan-T5). So:
    from a torch model   tie_word_embeddings = (lm_head.weight is shared.weight), scale_decoder_outputs
                         as the model's config says;
    from a directory     tied unless model.safetensors holds an lm_head.weight unequal to shared.weight,
                         as transformers 5 loads it; scaled as config.json's scale_decoder_outputs, else
                         its tie_word_embeddings (default true);
    to a directory       shared.weight, plus lm_head.weight when untied (the stacks' embed_tokens and a
                         tied lm_head are not written, as transformers 5 writes them); config.json with
                         tie_word_embeddings (false when untied, which transformers 4 reads right too) and
                         scale_decoder_outputs.
Checkpoint quirks: encoder/decoder.embed_tokens.weight in the file must equal shared.weight (then
dropped); shared.weight may be missing if encoder.embed_tokens.weight is there; an old checkpoint's
decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight (unused, as in HF) is dropped.
Every problem raises ValueError (FileNotFoundError for a missing file) in one line naming the file and
the field or weight.
"""

from __future__ import annotations

import json
import os

import numpy as np

from .. import backend

HF_CLASSES = ("T5Model", "T5ForConditionalGeneration")
FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
          "relative_attention_num_buckets", "relative_attention_max_distance", "dropout_rate", "layer_norm_epsilon",
          "initializer_factor", "feed_forward_proj", "tie_word_embeddings", "scale_decoder_outputs", "pad_token_id",
          "eos_token_id", "decoder_start_token_id")
# transformers' T5Config defaults for what config.json may leave out (decoder_start_token_id: none)
DEFAULTS = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=None, num_heads=8,
                relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
                layer_norm_epsilon=1e-6, initializer_factor=1.0, feed_forward_proj="relu", tie_word_embeddings=True,
                scale_decoder_outputs=None, pad_token_id=0, eos_token_id=1, decoder_start_token_id=None)
_FIXED = {"is_decoder": False, "is_encoder_decoder": True}
_EMBEDS = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_UNUSED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


def hf_t5_kind(module):
    """The class name of a transformers T5Model / T5ForConditionalGeneration, else None (no import)."""
    cls = type(module)
    return cls.__name__ if cls.__name__ in HF_CLASSES and cls.__module__.startswith("transformers.") else None


def is_t5(model) -> bool:
    """True for an npformer T5Model or T5ForConditionalGeneration."""
    from ..models.t5 import T5PreTrainedModel
    return isinstance(model, T5PreTrainedModel)


def config_from_hf(values: dict, tie_word_embeddings: bool = None):
    """npformer T5Config from HF's T5Config fields (a dict: config.json's, or a T5Config's attributes);
    ValueError naming any option npformer's T5 lacks. tie_word_embeddings overrides the dict's."""
    from ..models.t5 import T5Config
    for name, wanted in _FIXED.items():
        if values.get(name, wanted) != wanted:
            raise ValueError(f"T5Config.{name}={values[name]!r} is not supported (npformer's T5 needs {wanted!r})")
    kw = {name: values.get(name, DEFAULTS[name]) for name in FIELDS}
    if isinstance(kw["eos_token_id"], (list, tuple)) and len(kw["eos_token_id"]) == 1:
        kw["eos_token_id"] = kw["eos_token_id"][0]
    if kw["scale_decoder_outputs"] is None:                  # transformers 5: a false tie_word_embeddings
        kw["scale_decoder_outputs"] = kw["tie_word_embeddings"] is not False
    if tie_word_embeddings is not None:
        kw["tie_word_embeddings"] = tie_word_embeddings
    for name in ("dropout_rate", "layer_norm_epsilon", "initializer_factor"):
        if isinstance(kw[name], int) and not isinstance(kw[name], bool):
            kw[name] = float(kw[name])
    return T5Config(**kw)


def config_to_hf(config):
    """transformers' T5Config (eager attention) equivalent to an npformer T5Config."""
    import transformers
    return transformers.T5Config(**{name: getattr(config, name) for name in FIELDS}, attn_implementation="eager")


def _classes(kind: str):
    from ..models import t5
    return getattr(t5, kind)


# ----------------------------------------------------------------------------- torch

def t5_from_torch(hf_model, dtype=None, device: str = None):
    """The npformer twin (same class name, train/eval mode kept) of a transformers T5Model or
    T5ForConditionalGeneration, its weights copied by name. dtype: np.float32 or np.float64; None
    keeps the module's own. The twin is tied exactly when hf_model's lm_head.weight is its shared.weight."""
    import torch
    kind = hf_t5_kind(hf_model)
    if kind is None:
        raise TypeError(f"t5_from_torch: {type(hf_model).__name__} is not one of transformers' {', '.join(HF_CLASSES)}")
    p = hf_model.shared.weight
    if dtype is None:
        table = {torch.float32: np.float32, torch.float64: np.float64}
        if p.dtype not in table:
            raise ValueError(f"t5_from_torch: the module holds {p.dtype} weights; pass dtype=np.float32 or np.float64")
        dtype = table[p.dtype]
    elif np.dtype(dtype) not in (np.float32, np.float64):
        raise ValueError(f"t5_from_torch: dtype must be float32 or float64; got {np.dtype(dtype)}")
    tied = kind == "T5Model" or hf_model.lm_head.weight is p
    values = hf_model.config.to_dict()
    values["scale_decoder_outputs"] = getattr(hf_model.config, "scale_decoder_outputs", None)
    values["decoder_start_token_id"] = getattr(hf_model.config, "decoder_start_token_id", None)
    twin = _classes(kind)(config_from_hf(values, tie_word_embeddings=tied), dtype=dtype, device=device,
                          init_weights=False)
    twin.load_state_dict({k: v.detach().cpu().numpy() for k, v in hf_model.state_dict().items()}, cast=True)
    return twin.train(hf_model.training)


def t5_to_torch(model, dtype=None):
    """The transformers model (eager attention, CPU) of the class named like the npformer T5 `model`, with
    its weights; dtype: np.float32 / np.float64, None keeps the model's. An untied model gets its own lm_head
    (transformers 5 would tie it); torch's global random state is left as it was."""
    import torch
    import transformers
    kind = type(model).__name__
    if not is_t5(model) or kind not in HF_CLASSES:
        raise TypeError(f"t5_to_torch: {kind} is not one of npformer's {', '.join(HF_CLASSES)}")
    d = np.dtype(dtype if dtype is not None else model.shared.weight.dtype)
    if d not in (np.float32, np.float64):
        raise ValueError(f"t5_to_torch: dtype must be float32 or float64; got {d}")
    with torch.random.fork_rng(devices=[]):
        hf = getattr(transformers, kind)(config_to_hf(model.config))
    hf = hf.to(torch.float64 if d == np.float64 else torch.float32)
    if kind == "T5ForConditionalGeneration" and not model.config.tie_word_embeddings:
        hf.lm_head.weight = torch.nn.Parameter(hf.lm_head.weight.detach().clone())
    hf.load_state_dict({k: torch.from_numpy(np.array(backend.to_numpy(v))) for k, v in model.state_dict().items()})
    return hf.train(model.training)


# ----------------------------------------------------------------------------- checkpoint directories

def _checkpoint_state(state: dict, file: str) -> tuple:
    """(state with shared.weight and without the stacks' copies or unused weights, tied?)."""
    state = {k: v for k, v in state.items() if k not in _UNUSED}
    if "shared.weight" not in state and _EMBEDS[0] in state:
        state["shared.weight"] = state[_EMBEDS[0]]
    shared = state.get("shared.weight")
    if shared is None:
        raise ValueError(f"{file}: weight 'shared.weight' missing (nor encoder.embed_tokens.weight)")
    for key in _EMBEDS:
        v = state.pop(key, None)
        if v is not None and (v.shape != shared.shape or not np.array_equal(v, shared)):
            raise ValueError(f"{file}: weight {key!r} differs from shared.weight; npformer's T5 (as HF's) has one "
                             f"embedding")
    head = state.get("lm_head.weight")
    tied = head is None or (head.shape == shared.shape and np.array_equal(head, shared))
    if tied:
        state.pop("lm_head.weight", None)
    return state, tied


def load_pretrained(cfg: dict, arch: str, state: dict, file: str, dtype, device, init=None):
    """(model, report) for npformer.interop.pretrained.from_pretrained, as the other families': the
    config.json dict `cfg`, architecture `arch` (one of HF_CLASSES), the weights `state` of `file`.
    Nothing is drawn fresh (init is unused): report = ([], [], unused), unused the head a T5Model leaves out."""
    from ..models import t5
    from .pretrained import CONFIG
    cfg_file = os.path.join(os.path.dirname(file), CONFIG)
    state, tied = _checkpoint_state(state, file)
    unused = [k for k in ("lm_head.weight",) if k in state and arch == "T5Model"]
    state = {k: v for k, v in state.items() if k not in unused}
    try:
        config = config_from_hf(cfg, tie_word_embeddings=tied)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{cfg_file}: {' '.join(str(exc).split())}") from None
    model = getattr(t5, arch)(config, dtype=dtype, device=device, init_weights=False)
    tied_names = _EMBEDS + (("lm_head.weight",) if arch == "T5ForConditionalGeneration" and tied else ())
    own = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied_names}
    for key, want in own.items():
        if key not in state:
            raise ValueError(f"{file}: weight {key!r} missing (needed by {arch} in {CONFIG})")
        if tuple(np.shape(state[key])) != want:
            raise ValueError(f"{file}: weight {key!r} has shape {tuple(np.shape(state[key]))}, but {CONFIG} gives "
                             f"{want} ({arch})")
    extra = [k for k in state if k not in own]
    if extra:
        raise ValueError(f"{file}: {len(extra)} unexpected weights for {arch} in {CONFIG}, e.g. {extra[0]!r}")
    model.load_state_dict({**state, **dict.fromkeys(tied_names, state["shared.weight"])}, cast=True)
    return model, ([], [], unused)


def t5_from_pretrained(path, dtype=None, *, device: str = None, architecture: str = None):
    """The npformer T5 (eval mode) of an HF checkpoint directory; torch is not imported.

    config.json's model_type must be "t5"; architectures[0] (or `architecture`) picks T5ForConditionalGeneration
    (the default) or T5Model. dtype: the weights' dtype; None keeps the file's float32 / float64.
    """
    from .pretrained import CONFIG, _dtype, _read_config, _read_weights, _report
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory (expected an HF checkpoint directory with {CONFIG})")
    cfg = _read_config(path)
    cfg_file = os.path.join(path, CONFIG)
    if cfg.get("model_type") != "t5":
        raise ValueError(f"{cfg_file}: model_type {cfg.get('model_type')!r} is not 't5'")
    arch = architecture if architecture is not None else (cfg.get("architectures") or [HF_CLASSES[1]])[0]
    if arch not in HF_CLASSES:
        raise ValueError(f"{cfg_file}: architecture {arch!r} is not supported; supported: {', '.join(HF_CLASSES)}")
    state, file = _read_weights(path)
    model, report = load_pretrained(cfg, arch, state, file, _dtype(dtype, state), device)
    _report(path, arch, *report)
    return model.train(False)


def export(model):
    """(config.json dict, {name: host array}) of an npformer T5 as transformers writes them (see the module
    docstring), or None for any other model."""
    kind = type(model).__name__
    if not is_t5(model) or kind not in HF_CLASSES:
        return None
    c = model.config
    state = {k: np.ascontiguousarray(np.array(backend.to_numpy(v))) for k, v in model.state_dict().items()
             if k not in _EMBEDS and not (k == "lm_head.weight" and c.tie_word_embeddings)}
    cfg = {"model_type": "t5", "architectures": [kind], "is_encoder_decoder": True}
    cfg.update({name: getattr(c, name) for name in FIELDS})
    return cfg, state


def t5_save_pretrained(model, path) -> None:
    """Write an npformer T5Model / T5ForConditionalGeneration to the directory `path` (created if needed)
    as config.json + model.safetensors, as transformers writes them (see the module docstring)."""
    from .pretrained import CONFIG, WEIGHTS, _dtype_name, _safetensors_numpy
    exported = export(model)
    if exported is None:
        raise TypeError(f"t5_save_pretrained: {type(model).__name__} is not one of npformer's {', '.join(HF_CLASSES)}")
    cfg, state = exported
    cfg["dtype"] = _dtype_name(state)
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    _safetensors_numpy().save_file(state, os.path.join(path, WEIGHTS), metadata={"format": "pt"})
