"""Hugging Face checkpoint directories <-> npformer models, without torch.

    model = from_pretrained("path/to/dir")                        # the npformer model
    clf = from_pretrained("mlm/dir", architecture="BertForSequenceClassification", num_labels=3)
    model, tok = from_pretrained("path/to/dir", with_tokenizer=True)   # tok: WordPieceTokenizer or None
    save_pretrained(model, "out/dir", tokenizer=tok)              # transformers.AutoModel*.from_pretrained reads it

A directory holds ``config.json`` and ``model.safetensors`` (read and written with safetensors.numpy;
``pip install 'npformer[hf]'``). ``config.json``'s model_type picks the family and ``architectures[0]``
the head:
    bert: BertModel, BertForMaskedLM, BertForPreTraining (loaded as BertForMaskedLM),
          BertForSequenceClassification, BertForQuestionAnswering -> npformer.models of the same names
    gpt2: GPT2LMHeadModel, GPT2Model (-> npformer.models.GPT, lm_head tied to wte),
          GPT2ForSequenceClassification (-> SequenceClassifier(GPT, pooling="last", head_bias=False))
    llama: LlamaForCausalLM, LlamaModel -> npformer.models of the same names (llama.py: default RoPE
          only; a tied lm_head is not in the file, as transformers writes it)
    bart: BartForConditionalGeneration, BartModel -> npformer.models of the same names (bart.py)
    t5: T5ForConditionalGeneration, T5Model -> npformer.models of the same names (t5.py)
Fields absent from config.json take transformers' defaults (save_pretrained writes only the
non-default ones). dtype: the npformer dtype; None keeps the checkpoint's float32 / float64 (other
float dtypes get npformer's default dtype). The tokenizer (with_tokenizer=True) is
WordPieceTokenizer.from_file(dir) for BERT when vocab.txt is there, else None (GPT-2's BPE is not read).

Checkpoint quirks handled: a ``bert.`` prefix (BertForPreTraining files) is stripped for a BertModel
and added for a head when absent; ``cls.seq_relationship.*``, ``*.position_ids``,
``attn.bias`` / ``attn.masked_bias``, old LLaMA files' ``rotary_emb.inv_freq`` and a pooler the
model has no use for are dropped; old LayerNorm ``gamma`` / ``beta`` become ``weight`` / ``bias``;
GPT-2 files without the ``transformer.`` prefix (saved from GPT2Model) get it, and LLaMA files
without ``model.`` (saved from LlamaModel) too; tied weights absent from the file (``lm_head.weight``,
``cls.predictions.decoder.*``) are taken from the embedding. GPT-2's Conv1D weights are stored (in, out)
and transposed to npformer's (out, in) both ways. Every problem raises ValueError (FileNotFoundError for a
missing file) in one line naming the file and the field.

Heads, as HF's AutoModelFor*.from_pretrained(path, num_labels=...): `architecture` and num_labels
override config.json. Head weights (BERT_HEADS, GPT2_HEADS, LLaMA's untied lm_head) the head needs but
the file lacks are drawn as HF initialises them (2-D N(0, initializer_range^2) from `seed`, biases 0,
LayerNorm weights 1), the file's head weights it does not use are left out, and a UserWarning names both.
A misshapen head weight (num_labels=3 on a 2-label file) is an error unless ignore_mismatched_sizes=True
draws it fresh.
"""

from __future__ import annotations

import json
import os
import warnings
from types import SimpleNamespace

import numpy as np

from .. import backend
from . import bart, llama, t5

CONFIG, WEIGHTS, TORCH_WEIGHTS = "config.json", "model.safetensors", "pytorch_model.bin"
BERT_ARCHS = {"BertModel": "BertModel", "BertForMaskedLM": "BertForMaskedLM", "BertForPreTraining": "BertForMaskedLM",
              "BertForSequenceClassification": "BertForSequenceClassification",
              "BertForQuestionAnswering": "BertForQuestionAnswering"}
GPT2_ARCHS = ("GPT2LMHeadModel", "GPT2Model", "GPT2ForSequenceClassification")
LLAMA_ARCHS = llama.HF_CLASSES
# transformers' defaults for the fields npformer reads (config.json may leave them out)
_BERT_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                      attention_probs_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=2,
                      initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0, classifier_dropout=None,
                      problem_type=None, tie_word_embeddings=True, is_decoder=False, add_cross_attention=False,
                      position_embedding_type="absolute")
_GPT2_DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                      activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                      layer_norm_epsilon=1e-5, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                      reorder_and_upcast_attn=False, add_cross_attention=False, tie_word_embeddings=True,
                      pad_token_id=None, problem_type=None)
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_DROP_SUFFIXES = (".position_ids", ".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
# task-head weights: drawn fresh when the file lacks them, left out (and reported) when unused
BERT_HEADS = ("cls.", "classifier.", "qa_outputs.", "bert.pooler.")
GPT2_HEADS = ("head.", "score.")


def _safetensors_numpy():
    try:
        import safetensors.numpy as stn
    except ImportError:
        raise ImportError("npformer.interop.from_pretrained / save_pretrained need safetensors: "
                          "pip install 'npformer[hf]' (or pip install safetensors)") from None
    return stn


# ----------------------------------------------------------------------------- reading

def _read_config(path: str) -> dict:
    file = os.path.join(path, CONFIG)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: missing (an HF checkpoint directory needs config.json)")
    try:
        with open(file, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _architecture(cfg: dict, file: str, architecture: str = None) -> tuple:
    """(model_type, architecture) of a config dict, checked; `architecture` overrides architectures[0]."""
    model_type = cfg.get("model_type")
    archs = [architecture] if architecture is not None else (cfg.get("architectures") or [])
    if model_type == "bert":
        arch, known = (archs[0] if archs else "BertModel"), tuple(BERT_ARCHS)
    elif model_type == "gpt2":
        arch, known = (archs[0] if archs else "GPT2LMHeadModel"), GPT2_ARCHS
    elif model_type == "llama":
        arch, known = (archs[0] if archs else "LlamaForCausalLM"), LLAMA_ARCHS
    elif model_type == "bart":
        arch, known = (archs[0] if archs else "BartForConditionalGeneration"), bart.HF_CLASSES
    elif model_type == "t5":
        arch, known = (archs[0] if archs else "T5ForConditionalGeneration"), t5.HF_CLASSES
    else:
        raise ValueError(f"{file}: model_type {model_type!r} is not supported; supported: 'bert', 'gpt2', 'llama', "
                         f"'bart', 't5'")
    if arch not in known:
        what = f"architecture={arch!r}" if architecture is not None else f"architectures {archs!r}"
        raise ValueError(f"{file}: {what} is not supported for model_type {model_type!r}; "
                         f"supported: {', '.join(known)}")
    return model_type, arch


def _with_labels(cfg: dict, num_labels, id2label, label2id, file: str) -> dict:
    """cfg with the labels overridden as HF's keywords do (npformer keeps only their number)."""
    counts = {len(d) for d in (id2label, label2id) if d is not None} | ({num_labels} - {None})
    n = next(iter(counts)) if counts else None
    if counts and (len(counts) > 1 or isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1):
        raise ValueError(f"{file}: num_labels, id2label and label2id must give one positive number of labels; "
                         f"got num_labels={num_labels!r}, id2label={id2label!r}, label2id={label2id!r}")
    return cfg if n is None else {**cfg, "num_labels": int(n), "id2label": _labels(int(n))["id2label"]}


def _num_labels(cfg: dict) -> int:
    if "id2label" in cfg and cfg["id2label"]:
        return len(cfg["id2label"])
    return int(cfg.get("num_labels", 2))


def _namespace(cfg: dict, defaults: dict) -> SimpleNamespace:
    values = dict(defaults)
    values.update({k: v for k, v in cfg.items() if k in defaults})
    values["num_labels"] = _num_labels(cfg)
    return SimpleNamespace(**values)


def _read_weights(path: str) -> tuple:
    file = os.path.join(path, WEIGHTS)
    if not os.path.isfile(file):
        if os.path.isfile(os.path.join(path, TORCH_WEIGHTS)):
            raise FileNotFoundError(
                f"{file}: missing; only {TORCH_WEIGHTS} is there, which needs torch to read. Convert it once: "
                f"transformers.AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
        raise FileNotFoundError(f"{file}: missing (an HF checkpoint directory needs model.safetensors)")
    stn = _safetensors_numpy()
    try:
        return stn.load_file(file), file
    except Exception as exc:                # SafetensorError, or numpy's TypeError for an unknown dtype
        msg = " ".join(str(exc).split())
        raise ValueError(f"{file}: damaged or truncated safetensors file ({type(exc).__name__}: {msg})") from None


def _clean(state: dict) -> dict:
    """Drop buffers and pre-training-only heads; rename old LayerNorm gamma/beta."""
    out = {}
    for key, value in state.items():
        if key.endswith(_DROP_SUFFIXES) or key.startswith(("cls.seq_relationship.", "bert.cls.seq_relationship.")):
            continue
        if key.endswith(".gamma"):
            key = key[:-len("gamma")] + "weight"
        elif key.endswith(".beta"):
            key = key[:-len("beta")] + "bias"
        out[key] = value
    return out


def _dtype(dtype, state: dict):
    if dtype is not None:
        return np.dtype(dtype)
    kinds = {np.dtype(v.dtype) for v in state.values() if np.dtype(v.dtype).kind == "f"}
    return kinds.pop() if len(kinds) == 1 and kinds <= {np.dtype(np.float32), np.dtype(np.float64)} else None


def _fresh(key: str, shape: tuple, std: float, rng) -> np.ndarray:
    """HF's initialisation of one head weight: 2-D N(0, std^2), LayerNorm weight 1, bias 0."""
    if len(shape) == 2:
        return std * rng.standard_normal(size=shape)
    return np.full(shape, float(key.endswith("Norm.weight")))


def _fill(model, state: dict, file: str, where: str, heads=(), init=None) -> tuple:
    """Check every key of model against state (one-line errors naming the weight) and load it; keys
    under the `heads` prefixes missing (or misshapen, init = (std, rng, ignore_mismatched_sizes)) are
    drawn fresh, unused ones left out. Returns (fresh keys, "key: shapes" re-drawn, unused keys)."""
    (std, rng, ignore_mismatched), own, state, fresh, mismatched = init, model.state_dict(), dict(state), [], []
    for key, target in own.items():
        want = tuple(target.shape)
        got = tuple(np.shape(state[key])) if key in state else None
        head = key.startswith(heads)
        if got is None and not head:
            raise ValueError(f"{file}: weight {key!r} missing (needed by {where})")
        if got is not None and got != want:
            if not head:
                raise ValueError(f"{file}: weight {key!r} has shape {got}, but config.json gives {want} ({where})")
            if not ignore_mismatched:
                raise ValueError(f"{file}: weight {key!r} has shape {got}, but the model needs {want} ({where}, "
                                 f"its num_labels); pass ignore_mismatched_sizes=True to re-initialise the head")
            mismatched.append(f"{key}: {got} -> {want}")
        if got != want:
            state[key] = _fresh(key, want, std, rng)
            fresh += [key] if got is None else []
    unused = [k for k in state if k not in own and k.startswith(heads)]
    extra = [k for k in state if k not in own and not k.startswith(heads)]
    if extra:
        raise ValueError(f"{file}: {len(extra)} unexpected weights for {where}, e.g. {extra[0]!r}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, cast=True)
    return fresh, mismatched, unused


def _load_bert(cfg, arch, state, file, dtype, device, init):
    from ..models import bert, bert_heads
    from .bert import config_from_hf
    try:
        config = config_from_hf(_namespace(cfg, _BERT_DEFAULTS))
        init = (config.initializer_range or 0.02,) + init
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{os.path.join(os.path.dirname(file), CONFIG)}: {exc}") from None
    kind = BERT_ARCHS[arch]
    prefixed = any(k.startswith("bert.") for k in state)
    if kind == "BertModel":
        state = {(k[len("bert."):] if k.startswith("bert.") else k): v for k, v in state.items()}
        model = bert.BertModel(config, add_pooling_layer="pooler.dense.weight" in state, dtype=dtype,
                               device=device, init_weights=False)
    else:
        if not prefixed:
            state = {(k if k.startswith(BERT_HEADS) else "bert." + k): v for k, v in state.items()}
        if kind == "BertForMaskedLM" and config.tie_word_embeddings:
            state.setdefault("cls.predictions.decoder.weight", state.get("bert.embeddings.word_embeddings.weight"))
            state.setdefault("cls.predictions.decoder.bias", state.get("cls.predictions.bias"))
            state.setdefault("cls.predictions.bias", state.get("cls.predictions.decoder.bias"))
            state = {k: v for k, v in state.items() if v is not None}
        try:
            model = getattr(bert_heads, kind)(config, dtype=dtype, device=device, init_weights=False)
        except ValueError as exc:              # BertForQuestionAnswering with num_labels != 2
            raise ValueError(f"{file}: {exc}") from None
    heads = BERT_HEADS[:3] if kind == "BertModel" else BERT_HEADS        # a BertModel's pooler: as in the file
    return model, _fill(model, state, file, f"{arch} in {CONFIG}", heads, init)


def _load_gpt2(cfg, arch, state, file, dtype, device, init):
    from ..models.classifier import SequenceClassifier
    from ..models.gpt import GPT
    from .gpt2 import _classes, config_from_hf
    ns = _namespace(cfg, _GPT2_DEFAULTS)
    init = (float(cfg.get("initializer_range", 0.02)),) + init
    tied = bool(ns.tie_word_embeddings) or arch != "GPT2LMHeadModel"
    try:
        config = config_from_hf(ns, tie_embeddings=tied)
        classes = _classes(ns) if arch == "GPT2ForSequenceClassification" else None
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{os.path.join(os.path.dirname(file), CONFIG)}: {exc}") from None
    if not any(k.startswith("transformer.") for k in state):     # saved from GPT2Model
        state = {(k if k in ("lm_head.weight", "score.weight") else "transformer." + k): v for k, v in state.items()}
    state = {k: (np.ascontiguousarray(v.T) if k.endswith(_CONV1D) and v.ndim == 2 else v) for k, v in state.items()}
    gpt = GPT(config, dtype=dtype, device=device)
    if arch == "GPT2ForSequenceClassification":
        model = SequenceClassifier(gpt, classes, pooling="last", pad_id=ns.pad_token_id, head_bias=False)
        state = {("head" + k[len("score"):] if k.startswith("score.") else "backbone." + k): v
                 for k, v in state.items()}
        if "backbone.transformer.wte.weight" in state:
            state["backbone.lm_head.weight"] = state["backbone.transformer.wte.weight"]
    else:
        model = gpt
        if tied and "transformer.wte.weight" in state:
            state["lm_head.weight"] = state["transformer.wte.weight"]
    return model, _fill(model, state, file, f"{arch} in {CONFIG}", GPT2_HEADS, init)


def _report(path: str, arch: str, fresh: list, mismatched: list, unused: list) -> None:
    """HF's two warnings: the weights drawn fresh, and the file's weights left out."""
    if fresh or mismatched:
        parts = [f"newly initialized{why}: {keys}" for why, keys in (("", fresh), (
            " because the shapes did not match", mismatched)) if keys]
        warnings.warn(f"Some weights of {arch} were not initialized from the model checkpoint at {path} and are "
                      f"{'; '.join(parts)}. You should probably TRAIN this model on a down-stream task to be able "
                      f"to use it for predictions and inference.", UserWarning, stacklevel=3)
    if unused:
        warnings.warn(f"Some weights of the model checkpoint at {path} were not used when initializing {arch}: "
                      f"{unused}", UserWarning, stacklevel=3)


def from_pretrained(path, dtype=None, *, with_tokenizer: bool = False, device: str = None, architecture: str = None,
                    num_labels: int = None, id2label: dict = None, label2id: dict = None,
                    ignore_mismatched_sizes: bool = False, seed=0):
    """The npformer model (in eval mode) of an HF checkpoint directory; with with_tokenizer=True,
    (model, tokenizer) where tokenizer is a WordPieceTokenizer (BERT with vocab.txt) or None.
    torch is not imported.

    architecture: a name of BERT_ARCHS / GPT2_ARCHS / LLAMA_ARCHS overriding config.json's architectures[0];
    num_labels, id2label, label2id: override the config's labels (only their number is kept);
    ignore_mismatched_sizes: re-draw a misshapen head weight instead of raising; seed: an int or a
    numpy.random.Generator for the head weights drawn fresh (see the module docstring)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory (expected an HF checkpoint directory with {CONFIG})")
    file = os.path.join(path, CONFIG)
    cfg = _with_labels(_read_config(path), num_labels, id2label, label2id, file)
    model_type, arch = _architecture(cfg, file, architecture)
    state, file = _read_weights(path)
    state = _clean(state)
    dtype = _dtype(dtype, state)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    load = {"bert": _load_bert, "gpt2": _load_gpt2, "llama": llama.load_pretrained,
            "bart": bart.load_pretrained, "t5": t5.load_pretrained}[model_type]
    model, report = load(cfg, arch, state, file, dtype, device, (rng, bool(ignore_mismatched_sizes)))
    _report(path, arch, *report)
    model.train(False)
    if not with_tokenizer:
        return model
    tokenizer = None
    if model_type == "bert" and os.path.isfile(os.path.join(path, "vocab.txt")):
        from ..data import WordPieceTokenizer
        tokenizer = WordPieceTokenizer.from_file(path)
    return model, tokenizer


# ----------------------------------------------------------------------------- writing

def _host(v) -> np.ndarray:
    return np.ascontiguousarray(np.array(backend.to_numpy(v)))


def _labels(n: int) -> dict:
    return {"id2label": {str(i): f"LABEL_{i}" for i in range(n)}, "label2id": {f"LABEL_{i}": i for i in range(n)}}


def _dtype_name(state: dict) -> str:
    kinds = {np.dtype(v.dtype).name for v in state.values() if np.dtype(v.dtype).kind == "f"}
    return kinds.pop() if len(kinds) == 1 else "float32"


def _bert_export(model):
    from .bert import FIELDS, HF_CLASSES, is_bert
    if not is_bert(model) or type(model).__name__ not in HF_CLASSES:
        return None
    c = model.config
    cfg = {"model_type": "bert", "architectures": [type(model).__name__]}
    cfg.update({name: getattr(c, name) for name in FIELDS if name != "num_labels"})
    cfg.update(_labels(c.num_labels))
    return cfg, {k: _host(v) for k, v in model.state_dict().items()}


def _gpt2_cfg(c, arch: str) -> dict:
    if not c.bias:
        raise ValueError("save_pretrained: GPTConfig.bias=False has no GPT-2 checkpoint form (GPT-2 has biases)")
    return {"model_type": "gpt2", "architectures": [arch], "vocab_size": c.vocab_size, "n_positions": c.block_size,
            "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": None,
            "activation_function": "gelu_new" if c.gelu_approximate == "tanh" else "gelu",
            "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
            "layer_norm_epsilon": c.layer_norm_eps, "tie_word_embeddings": c.tie_embeddings,
            "bos_token_id": None, "eos_token_id": None}


def _conv1d_out(state: dict) -> dict:
    return {k: (np.ascontiguousarray(v.T) if k.endswith(_CONV1D) else v) for k, v in state.items()}


def _gpt2_export(model):
    from ..models.classifier import SequenceClassifier
    from ..models.gpt import GPT
    if isinstance(model, GPT):
        state = {k: _host(v) for k, v in model.state_dict().items()}
        if model.config.tie_embeddings:
            state.pop("lm_head.weight")
        return _gpt2_cfg(model.config, "GPT2LMHeadModel"), _conv1d_out(state)
    if isinstance(model, SequenceClassifier) and model.kind == "gpt":
        if model.pooling != "last" or model.head.bias is not None or model.dropout.p != 0.0:
            raise ValueError("save_pretrained: GPT2ForSequenceClassification needs a SequenceClassifier with "
                             "pooling='last', head_bias=False and dropout=0.0")
        cfg = _gpt2_cfg(model.backbone.config, "GPT2ForSequenceClassification")
        cfg.update(_labels(model.num_classes), pad_token_id=model.pad_id, problem_type="single_label_classification")
        state = {}
        for k, v in model.state_dict().items():
            if k.startswith("backbone.transformer."):
                state[k[len("backbone."):]] = _host(v)
            elif k.startswith("head."):
                state["score." + k[len("head."):]] = _host(v)
        return cfg, _conv1d_out(state)
    return None


def save_pretrained(model, path, *, tokenizer=None) -> None:
    """Write `model` to the directory `path` (created if needed) as config.json + model.safetensors,
    which transformers' from_pretrained (and from_pretrained here) load; tokenizer: a WordPieceTokenizer
    written alongside (vocab.txt, tokenizer_config.json). Supported: the npformer BERT models of
    bert.HF_CLASSES, GPT (as GPT2LMHeadModel), SequenceClassifier over a GPT (GPT2ForSequenceClassification),
    LlamaForCausalLM and LlamaModel, BartForConditionalGeneration and BartModel, T5ForConditionalGeneration
    and T5Model."""
    exported = (_bert_export(model) or _gpt2_export(model) or llama.export(model) or bart.export(model)
                or t5.export(model))
    if exported is None:
        raise TypeError(f"save_pretrained: {type(model).__name__} has no HF checkpoint form; supported: BertModel, "
                        f"BertForMaskedLM, BertForSequenceClassification, BertForQuestionAnswering, GPT, "
                        f"SequenceClassifier over a GPT, LlamaForCausalLM, LlamaModel, BartForConditionalGeneration, "
                        f"BartModel, T5ForConditionalGeneration, T5Model")
    cfg, state = exported
    cfg["dtype"] = _dtype_name(state)
    stn = _safetensors_numpy()
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    stn.save_file(state, os.path.join(path, WEIGHTS), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(path)
