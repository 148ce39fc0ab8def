"""BART twins: transformers' BartModel and BartForConditionalGeneration <-> npformer.models.bart's
classes of the same names, and HF checkpoint directories of them read and written without torch.

    twin = bart_from_torch(hf_model)               # weights copied by name; dtype None keeps hf_model's
    back = bart_to_torch(twin)                     # transformers model (eager attention), CPU
    model = bart_from_pretrained("dir")            # config.json + model.safetensors; torch never imported
    bart_save_pretrained(model, "out")             # transformers' from_pretrained reads it

Configuration: HF's BartConfig fields carry over unchanged (FIELDS). Fields that change nothing
npformer computes (use_cache, num_labels, classifier_dropout, is_encoder_decoder, old files'
normalize_before / add_final_layer_norm / add_bias_logits, which transformers 5 ignores too) are not
carried. What npformer's BART cannot mirror raises ValueError naming the field: LayerDrop
(encoder_layerdrop / decoder_layerdrop > 0), list-valued token ids, an activation_function that is
not one of bart_layers.ACT2FN's.

Weights: the state-dict names and layouts are HF's, so they are copied by name. With
tie_word_embeddings, transformers writes the shared embedding once, as ``model.shared.weight``
(``shared.weight`` for a BartModel), and leaves encoder/decoder ``embed_tokens`` and ``lm_head`` out;
so does bart_save_pretrained. Reading, any one of the four names serves (older files hold all of
them); copies that differ are an error, as npformer's tied model holds one. Also handled: a
BartModel file read as BartForConditionalGeneration (``model.`` prefix added, lm_head tied or drawn
fresh, final_logits_bias zero) and the reverse (lm_head and final_logits_bias left out, reported);
a missing final_logits_bias (zero, as HF); ``encoder.version`` / ``decoder.version`` entries (dropped).
Every problem raises ValueError (FileNotFoundError for a missing file) in one line naming the file and
the field or weight.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np

from .. import backend

HF_CLASSES = ("BartForConditionalGeneration", "BartModel")
FIELDS = ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
          "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "activation_function", "dropout",
          "attention_dropout", "activation_dropout", "max_position_embeddings", "init_std", "scale_embedding",
          "pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "forced_eos_token_id",
          "tie_word_embeddings")
# transformers' defaults for the fields read here (config.json may leave them out)
DEFAULTS = dict(vocab_size=50265, d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, activation_function="gelu",
                dropout=0.1, attention_dropout=0.0, activation_dropout=0.0, max_position_embeddings=1024,
                init_std=0.02, scale_embedding=False, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                decoder_start_token_id=2, forced_eos_token_id=2, tie_word_embeddings=True,
                encoder_layerdrop=0.0, decoder_layerdrop=0.0)
_TIED = ("model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
         "lm_head.weight")


def hf_bart_kind(module):
    """The class name for a transformers model in HF_CLASSES, else None (without importing transformers)."""
    cls = type(module)
    return cls.__name__ if cls.__name__ in HF_CLASSES and cls.__module__.startswith("transformers.") else None


def is_bart(module) -> bool:
    """True for an npformer BartModel or BartForConditionalGeneration."""
    from ..models.bart import BartPreTrainedModel
    return isinstance(module, BartPreTrainedModel)


def config_from_hf(c):
    """npformer BartConfig equivalent to transformers' BartConfig (or a namespace of its fields) c;
    ValueError naming any option it lacks."""
    from ..models.bart import BartConfig
    for name in ("encoder_layerdrop", "decoder_layerdrop"):
        if float(getattr(c, name, 0.0) or 0.0) != 0.0:
            raise ValueError(f"BartConfig.{name}={getattr(c, name)!r} is not supported (npformer's BART has no "
                             f"LayerDrop; set it to 0.0)")
    values = {name: getattr(c, name) for name in FIELDS}
    for name in ("dropout", "attention_dropout", "activation_dropout", "init_std"):
        if isinstance(values[name], int) and not isinstance(values[name], bool):
            values[name] = float(values[name])
    return BartConfig(**values)


def config_to_hf(config, **extra):
    """transformers' BartConfig (eager attention) equivalent to an npformer BartConfig."""
    import transformers
    return transformers.BartConfig(**{name: getattr(config, name) for name in FIELDS},
                                   attn_implementation="eager", **extra)


def _numpy_dtype(dtype, default):
    d = np.dtype(default if dtype is None else dtype)
    if d not in (np.float32, np.float64):
        raise ValueError(f"BART interop: dtype must be float32 or float64; got {d}")
    return d


def bart_from_torch(hf_model, dtype=None, device: str = None):
    """The npformer twin (dtype: None keeps hf_model's float32/float64; device) of a transformers
    BartModel or BartForConditionalGeneration, weights and train/eval mode copied."""
    from ..models import bart
    kind = hf_bart_kind(hf_model)
    if kind is None:
        raise TypeError(f"bart_from_torch: expected transformers' {' or '.join(HF_CLASSES)}; got "
                        f"{type(hf_model).__module__}.{type(hf_model).__qualname__}")
    state = {k: v.detach().cpu().numpy() for k, v in hf_model.state_dict().items()}
    dtype = _numpy_dtype(dtype, state["model.shared.weight" if kind != "BartModel" else "shared.weight"].dtype)
    twin = getattr(bart, kind)(config_from_hf(hf_model.config), dtype=dtype, device=device, init_weights=False)
    twin.load_state_dict(state, cast=True)               # cast: the dtype is the caller's choice or the source's
    return twin.train(hf_model.training)


def bart_to_torch(model, dtype=None):
    """The transformers model of the class named like the npformer BART `model` (eager attention, CPU,
    dtype: None keeps the model's), with its weights and train/eval mode. torch's global random
    state is left as it was."""
    import torch
    import transformers
    if not is_bart(model) or type(model).__name__ not in HF_CLASSES:
        raise TypeError(f"bart_to_torch: expected an npformer {' or '.join(HF_CLASSES)}; got {type(model).__name__}")
    state = {k: np.array(backend.to_numpy(v)) for k, v in model.state_dict().items()}
    dtype = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[
        _numpy_dtype(dtype, next(iter(model.parameters())).dtype)]
    with torch.random.fork_rng(devices=[]):
        hf = getattr(transformers, type(model).__name__)(config_to_hf(model.config))
    hf = hf.to(dtype)
    hf.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    return hf.train(model.training)


# ----------------------------------------------------------------------------- checkpoint directories

def load_pretrained(cfg: dict, arch: str, state: dict, file: str, dtype, device, init):
    """(model, report) for npformer.interop.pretrained.from_pretrained: the config.json dict `cfg`, the
    weights `state` of `file`, init = (rng, ignore_mismatched_sizes) for an untied lm_head the file
    lacks (drawn N(0, init_std^2) and reported, as HF). See the module docstring for what is handled."""
    from ..models import bart
    from .pretrained import CONFIG, _fill
    values = dict(DEFAULTS)
    values.update({k: v for k, v in cfg.items() if k in DEFAULTS})
    try:
        config = config_from_hf(SimpleNamespace(**values))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{os.path.join(os.path.dirname(file), CONFIG)}: {exc}") from None
    state = {k: v for k, v in state.items() if not k.endswith(("encoder.version", "decoder.version"))}
    if not any(k.startswith("model.") for k in state):                  # written from a BartModel
        state = {(k if k in ("lm_head.weight", "final_logits_bias") else "model." + k): v for k, v in state.items()}
    in_file = set(state)
    if config.tie_word_embeddings:
        state = _tie(state, file, with_head=arch != "BartModel")
    if arch == "BartModel":                            # the head's weights are left out, and reported
        unused = [k for k in ("lm_head.weight", "final_logits_bias") if k in in_file]
        state, heads = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}, ()
    else:
        unused, heads = [], ("lm_head.",)
        state.setdefault("final_logits_bias", np.zeros((1, config.vocab_size), dtype=np.float32))   # as HF
    model = getattr(bart, arch)(config, dtype=dtype, device=device, init_weights=False)
    fresh, mismatched, _ = _fill(model, state, file, f"{arch} in {CONFIG}", heads, (config.init_std,) + tuple(init))
    return model, (fresh, mismatched, unused)


def _tie(state: dict, file: str, with_head: bool) -> dict:
    """state with every name of the tied embedding (lm_head.weight too when with_head) filled from
    the one present, or from the first of those present after checking that they are equal."""
    names = _TIED if with_head else _TIED[:3]
    present = [k for k in names if k in state]
    if not present:
        return state                                    # _fill reports model.shared.weight missing
    first = state[present[0]]
    for k in present[1:]:
        if np.shape(state[k]) != np.shape(first) or not np.array_equal(state[k], first):
            raise ValueError(f"{file}: weight {k!r} differs from {present[0]!r}, but config.json has "
                             f"tie_word_embeddings=true (npformer ties them into one); set it to false")
    return {**state, **dict.fromkeys(names, first)}


def export(model):
    """(config.json dict, {name: host array}) of an npformer BART, as transformers' save_pretrained
    writes them (the tied embedding once, as model.shared.weight), or None for any other model."""
    if not is_bart(model) or type(model).__name__ not in HF_CLASSES:
        return None
    c = model.config
    cfg = {"model_type": "bart", "architectures": [type(model).__name__], "is_encoder_decoder": True}
    cfg.update({name: getattr(c, name) for name in FIELDS})
    state = {k: np.ascontiguousarray(np.array(backend.to_numpy(v))) for k, v in model.state_dict().items()}
    if c.tie_word_embeddings:                          # written once, as model.shared.weight
        prefix = "" if type(model).__name__ == "BartModel" else "model."
        for k in (prefix + "encoder.embed_tokens.weight", prefix + "decoder.embed_tokens.weight", "lm_head.weight"):
            state.pop(k, None)
    return cfg, state


def bart_from_pretrained(path, dtype=None, *, device: str = None, architecture: str = None, seed=0):
    """The npformer BART (eval mode) of an HF checkpoint directory (config.json + model.safetensors),
    without torch. dtype: None keeps the file's float32 / float64; architecture: BartModel or
    BartForConditionalGeneration, overriding config.json's architectures[0]; seed: an int or a
    numpy.random.Generator for an untied lm_head the file lacks."""
    from .pretrained import CONFIG, _dtype, _read_config, _read_weights, _report
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory (expected an HF checkpoint directory with {CONFIG})")
    cfg = _read_config(path)
    file = os.path.join(path, CONFIG)
    if cfg.get("model_type") != "bart":
        raise ValueError(f"{file}: model_type {cfg.get('model_type')!r} is not 'bart'")
    archs = [architecture] if architecture is not None else (cfg.get("architectures") or [HF_CLASSES[0]])
    if archs[0] not in HF_CLASSES:
        what = f"architecture={archs[0]!r}" if architecture is not None else f"architectures {archs!r}"
        raise ValueError(f"{file}: {what} is not supported; supported: {', '.join(HF_CLASSES)}")
    state, weights = _read_weights(path)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    model, report = load_pretrained(cfg, archs[0], state, weights, _dtype(dtype, state), device, (rng, False))
    _report(path, archs[0], *report)
    return model.train(False)


def bart_save_pretrained(model, path) -> None:
    """Write an npformer BART to the directory `path` (created if needed) as config.json +
    model.safetensors, as transformers' save_pretrained writes them."""
    from .pretrained import CONFIG, WEIGHTS, _dtype_name, _safetensors_numpy
    exported = export(model)
    if exported is None:
        raise TypeError(f"bart_save_pretrained: expected an npformer {' or '.join(HF_CLASSES)}; got "
                        f"{type(model).__name__}")
    cfg, state = exported
    cfg["dtype"] = _dtype_name(state)
    stn = _safetensors_numpy()
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    stn.save_file(state, os.path.join(path, WEIGHTS), metadata={"format": "pt"})
