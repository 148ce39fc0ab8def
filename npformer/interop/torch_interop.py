"""Twins between npformer and PyTorch: ``from_torch(m)`` builds the npformer module that computes
what the torch module m computes, with m's weights copied in; ``to_torch(m)`` does the reverse.

Supported (torch.nn <-> npformer.nn; parameter names are identical, weights copied unchanged):
    MultiheadAttention (add_bias_kv, add_zero_attn carried), TransformerEncoderLayer, TransformerDecoderLayer, TransformerEncoder,
    TransformerDecoder, Transformer, LayerNorm, RMSNorm (eps=None carried), Linear, Embedding (padding_idx
    carried), Dropout, ReLU, GELU (approximate carried), SiLU, Tanh, Identity, RNN, LSTM, GRU (every
    constructor argument carried; LSTM's proj_size is not supported),
    and the containers Sequential and ModuleList, whose children are converted recursively;
GPT models (see gpt2.py and gpt_like.py):
    transformers' GPT2LMHeadModel              <-> npformer.models.GPT (Conv1D weights transposed)
    transformers' GPT2ForSequenceClassification <-> SequenceClassifier(GPT, head_bias=False)
    nanoGPT- and minGPT-style GPTs (recognised by structure and parameter names, whatever their
        class) -> npformer.models.GPT; to_torch gives npformer's TorchGPT (torch_gpt.py) back.
BERT (see bert.py; HF's parameter names, weights copied by name):
    transformers' BertModel, BertForMaskedLM, BertForSequenceClassification, BertForQuestionAnswering
        <-> npformer.models' classes of the same names
LLaMA (see llama.py; HF's parameter names, weights copied by name):
    transformers' LlamaForCausalLM, LlamaModel <-> npformer.models' classes of the same names
BART (see bart.py; HF's parameter names, weights copied by name):
    transformers' BartForConditionalGeneration, BartModel <-> npformer.models' classes of the same names
T5 (see t5.py; HF's parameter names, weights copied by name):
    transformers' T5ForConditionalGeneration, T5Model <-> npformer.models' classes of the same names
to_torch of a GPT: layout="hf" (GPT2LMHeadModel; needs biases) or "nanogpt" (TorchGPT, any GPT);
by default the layout the GPT came from (from_torch), else "hf" when it has biases.

Every constructor argument is read off the source module (d_model, nhead, dim_feedforward,
dropout p, activation, layer_norm_eps, batch_first, norm_first, bias, the number of layers and
the final norms), so the twin behaves like its source. In particular batch_first is carried over:
torch defaults to False (time first), npformer to True. The train/eval mode is carried over too.

torch (and transformers) are imported inside the functions: npformer.interop imports without them.
"""

from __future__ import annotations

import numpy as np

from .. import backend, random
from .. import nn
from . import bart, bert, gpt2, gpt_like, llama, t5

SUPPORTED = ("MultiheadAttention", "TransformerEncoderLayer", "TransformerDecoderLayer", "TransformerEncoder",
             "TransformerDecoder", "Transformer", "LayerNorm", "RMSNorm", "Linear", "Embedding", "Dropout", "ReLU",
             "GELU", "SiLU", "Tanh", "Identity", "Sequential", "ModuleList", "RNN", "LSTM", "GRU")


def _import_torch():
    try:
        import torch
    except ImportError as exc:
        raise ImportError("npformer.interop needs PyTorch for from_torch/to_torch: "
                          "pip install torch (see the README for the CPU build)") from exc
    return torch


# ----------------------------------------------------------------------------- reading a module's arguments
# Both frameworks name these attributes alike, so one reader serves both directions;
# `ns` is the namespace of the module's own framework (torch.nn or npformer.nn).

def _kind(m, ns, where: str) -> str:
    """The name of m's class in SUPPORTED (its exact class, not a subclass), else TypeError."""
    for name in SUPPORTED:
        if type(m) is getattr(ns, name):
            return name
    cls = type(m)
    hf = gpt2.HF_CLASSES + bert.HF_CLASSES + llama.HF_CLASSES + bart.HF_CLASSES + t5.HF_CLASSES
    raise TypeError(f"{where}: {cls.__module__}.{cls.__qualname__} is not supported; supported: "
                    f"{', '.join(SUPPORTED)}, transformers' {', '.join(hf)}, and nanoGPT/minGPT-style GPTs")


def _uniform(where: str, option: str, values):
    """The one value all entries share, else ValueError: a twin is built from a single option value."""
    distinct = list(dict.fromkeys(values))
    if len(distinct) != 1:
        raise ValueError(f"{where}: {option} differs between its submodules ({distinct}); only one {option} "
                         f"per module is supported")
    return distinct[0]


def _activation_spec(a, ns, where: str):
    """"relu" / "gelu" for the functions, ("ReLU",) / ("GELU", approximate) for the modules."""
    if a is ns.functional.relu:
        return "relu"
    if a is ns.functional.gelu:
        return "gelu"
    if type(a) is ns.ReLU:
        return ("ReLU",)
    if type(a) is ns.GELU:
        return ("GELU", a.approximate)
    raise ValueError(f"{where}: activation {a!r} is not supported; use 'relu', 'gelu', ReLU() or "
                     f"GELU(approximate='none' | 'tanh')")


def _activation(spec, ns):
    """The activation argument for ns's layer constructors from an _activation_spec."""
    if isinstance(spec, str):
        return spec
    return ns.ReLU() if spec[0] == "ReLU" else ns.GELU(approximate=spec[1])


def _mha_args(m, where: str) -> dict:
    """MultiheadAttention constructor arguments, add_bias_kv / add_zero_attn / scale included
    (torch's module has no scale attribute: None, the default 1 / sqrt(d_head))."""
    add_bias_kv = _uniform(where, "add_bias_kv", [getattr(m, "bias_k", None) is not None,
                                                  getattr(m, "bias_v", None) is not None])
    bias = _uniform(where, "bias", [m.in_proj_bias is not None, m.out_proj.bias is not None])
    return dict(embed_dim=m.embed_dim, num_heads=m.num_heads, dropout=float(m.dropout), bias=bias, kdim=m.kdim,
                vdim=m.vdim, batch_first=bool(m.batch_first), add_bias_kv=add_bias_kv,
                add_zero_attn=bool(getattr(m, "add_zero_attn", False)), scale=getattr(m, "scale", None))


def _embedding_padding(m, where: str):
    """padding_idx of an Embedding; its other options (torch's max_norm, ...) are not supported."""
    for option, plain in (("max_norm", None), ("scale_grad_by_freq", False), ("sparse", False)):
        if getattr(m, option, plain) != plain:
            raise ValueError(f"{where}: Embedding({option}={getattr(m, option)!r}) is not supported")
    return m.padding_idx


def _norm_args(m) -> dict:
    return dict(normalized_shape=tuple(m.normalized_shape), eps=float(m.eps),
                elementwise_affine=bool(m.elementwise_affine), bias=m.bias is not None)


def _rnn_args(m, kind: str, where: str) -> dict:
    """RNN / LSTM / GRU constructor arguments (batch_first carried: torch defaults to False, npformer to
    True); torch's proj_size (an LSTM projection of h) has no npformer counterpart."""
    if getattr(m, "proj_size", 0):
        raise ValueError(f"{where}: proj_size={m.proj_size} is not supported (npformer's LSTM has no projection)")
    args = dict(input_size=m.input_size, hidden_size=m.hidden_size, num_layers=m.num_layers, bias=bool(m.bias),
                batch_first=bool(m.batch_first), dropout=float(m.dropout), bidirectional=bool(m.bidirectional))
    if kind == "RNN":
        args["nonlinearity"] = m.nonlinearity
    return args


def _layer_args(m, ns, where: str) -> dict:
    """Transformer{Encoder,Decoder}Layer constructor arguments (activation as an _activation_spec)."""
    decoder = type(m) is ns.TransformerDecoderLayer
    attns = [("self_attn", m.self_attn)] + ([("multihead_attn", m.multihead_attn)] if decoder else [])
    for name, a in attns:
        _kind(a, ns, f"{where}.{name}")
    specs = [_mha_args(a, f"{where}.{name}") for name, a in attns]
    for (name, _), spec in zip(attns, specs):
        for option, plain in (("add_bias_kv", False), ("add_zero_attn", False), ("scale", None)):
            if spec[option] != plain:
                raise ValueError(f"{where}.{name}: {option}={spec[option]!r} is not supported inside a "
                                 f"{type(m).__name__} (torch's layers build their attention without it)")
    norms = [m.norm1, m.norm2] + ([m.norm3] if decoder else [])
    drops = [m.dropout, m.dropout1, m.dropout2] + ([m.dropout3] if decoder else [])
    linears = [m.linear1, m.linear2]
    return dict(
        d_model=m.linear1.in_features,
        nhead=_uniform(where, "nhead", [s["num_heads"] for s in specs]),
        dim_feedforward=m.linear1.out_features,
        dropout=_uniform(where, "dropout", [float(d.p) for d in drops] + [s["dropout"] for s in specs]),
        activation=_activation_spec(m.activation, ns, where),
        layer_norm_eps=_uniform(where, "layer_norm_eps", [float(n.eps) for n in norms]),
        batch_first=_uniform(where, "batch_first", [s["batch_first"] for s in specs]),
        norm_first=bool(m.norm_first),
        bias=_uniform(where, "bias", [lin.bias is not None for lin in linears] + [s["bias"] for s in specs]
                      + [n.bias is not None for n in norms]))


# ----------------------------------------------------------------------------- building the twin

def _build(m, src, dst, fk: dict, gk: dict, where: str, expect=None):
    """The twin in framework `dst` (fresh weights) of module m of framework `src`.

    fk: dtype/device keywords for dst's constructors; gk: generator keywords (npformer only).
    expect: the kinds allowed at this place (None: any supported one).
    """
    if expect is not None and not any(type(m) is getattr(src, e) for e in expect):
        raise TypeError(f"{where}: {type(m).__module__}.{type(m).__qualname__} is not supported here; expected "
                        f"{' or '.join(expect)}")
    kind = _kind(m, src, where)
    if kind == "Linear":
        return dst.Linear(m.in_features, m.out_features, bias=m.bias is not None, **fk, **gk)
    if kind == "Embedding":
        return dst.Embedding(m.num_embeddings, m.embedding_dim, padding_idx=_embedding_padding(m, where), **fk, **gk)
    if kind == "Dropout":
        return dst.Dropout(m.p)
    if kind in ("RNN", "LSTM", "GRU"):
        return getattr(dst, kind)(**_rnn_args(m, kind, where), **fk, **gk)
    if kind == "GELU":
        return dst.GELU(approximate=m.approximate)
    if kind in ("ReLU", "SiLU", "Tanh", "Identity"):
        return getattr(dst, kind)()
    if kind in ("Sequential", "ModuleList"):
        names = list(m._modules)                     # both frameworks keep children in _modules, in order
        if names != [str(i) for i in range(len(names))]:
            raise ValueError(f"{where}: children named {names}; only 0, 1, 2, ... are supported")
        children = [_build(c, src, dst, fk, gk, f"{where}.{i}") for i, c in enumerate(m._modules.values())]
        return dst.Sequential(*children) if kind == "Sequential" else dst.ModuleList(children)
    if kind == "LayerNorm":
        return dst.LayerNorm(**_norm_args(m), **fk)
    if kind == "RMSNorm":
        return dst.RMSNorm(tuple(m.normalized_shape), eps=None if m.eps is None else float(m.eps),
                           elementwise_affine=bool(m.elementwise_affine), **fk)
    if kind == "MultiheadAttention":
        args = _mha_args(m, where)
        if dst is not nn and args.pop("scale") is not None:
            raise ValueError(f"{where}: scale={m.scale!r} is not supported by torch.nn.MultiheadAttention (it "
                             f"always scales by 1 / sqrt(head_dim))")
        return dst.MultiheadAttention(**args, **fk, **gk)
    if kind in ("TransformerEncoderLayer", "TransformerDecoderLayer"):
        args = _layer_args(m, src, where)
        args["activation"] = _activation(args["activation"], dst)
        return getattr(dst, kind)(**args, **fk, **gk)
    if kind in ("TransformerEncoder", "TransformerDecoder"):
        layer_kind = kind + "Layer"
        layers = list(m.layers)
        if not layers:
            raise ValueError(f"{where}: num_layers must be at least 1")
        for i, l in enumerate(layers):
            if type(l) is not getattr(src, layer_kind):
                raise TypeError(f"{where}: layers.{i} is a {type(l).__qualname__}; expected {layer_kind}")
        args = [_layer_args(l, src, f"{where}.layers.{i}") for i, l in enumerate(layers)]
        for i, a in enumerate(args):
            if a != args[0]:
                raise ValueError(f"{where}: layers.{i} is configured differently from layers.0 ({a} vs {args[0]}); "
                                 f"the layers of a stack must share one configuration")
        layer = _build(layers[0], src, dst, fk, gk, f"{where}.layers.0")
        norm = None if m.norm is None else _build(m.norm, src, dst, fk, gk, f"{where}.norm", ("LayerNorm",))
        extra = {}
        if kind == "TransformerEncoder" and dst is not nn:
            extra["enable_nested_tensor"] = False      # npformer has no nested-tensor fast path to mirror
        return getattr(dst, kind)(layer, len(layers), norm, **extra)
    # Transformer: its encoder and decoder become the twin's custom_encoder / custom_decoder.
    enc = _build(m.encoder, src, dst, fk, gk, f"{where}.encoder", ("TransformerEncoder",))
    dec = _build(m.decoder, src, dst, fk, gk, f"{where}.decoder", ("TransformerDecoder",))
    return dst.Transformer(m.d_model, m.nhead, custom_encoder=enc, custom_decoder=dec,
                           batch_first=bool(m.batch_first), **fk, **gk)


def _np_dtype(torch, module, dtype, where: str):
    """The npformer dtype for the twin: `dtype` when given, else the module's float32/float64."""
    if dtype is not None:
        d = np.dtype(dtype)
        if d not in (np.float32, np.float64):
            raise ValueError(f"{where}: dtype must be float32 or float64; got {d}")
        return d.type
    p = next(iter(module.parameters()), None)
    if p is None:
        return np.float32
    table = {torch.float32: np.float32, torch.float64: np.float64}
    if p.dtype not in table:
        raise ValueError(f"{where}: the module holds {p.dtype} weights; npformer computes in float32 or float64 "
                         f"(pass dtype=np.float32 or np.float64 to convert)")
    return table[p.dtype]


def _torch_dtype(torch, module, dtype):
    """The torch dtype for the twin: `dtype` when given, else the npformer module's own."""
    p = next(iter(module.parameters()), None)
    d = np.dtype(dtype if dtype is not None else (p.dtype if p is not None else np.float32))
    table = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}
    if d not in table:
        raise ValueError(f"to_torch: dtype must be float32 or float64; got {d}")
    return table[d]


def from_torch(module, dtype=None, device: str = None):
    """The npformer twin of a torch module, with its weights copied.

    module: one of SUPPORTED (torch.nn), a transformers GPT2LMHeadModel (-> npformer GPT) or
        GPT2ForSequenceClassification (-> SequenceClassifier), a nanoGPT/minGPT-style GPT (-> GPT), or
        a transformers BertModel, BertForMaskedLM, BertForSequenceClassification,
        BertForQuestionAnswering, LlamaForCausalLM or LlamaModel (-> the npformer.models class of the same name).
    dtype: np.float32 or np.float64; None keeps the module's own (float32 or float64).
    device: where the twin's weights live (NPFORMER_DEVICE when None).
    Raises TypeError for an unsupported module, ValueError for an unsupported option.
    """
    torch = _import_torch()
    where = type(module).__name__
    if bert.hf_bert_kind(module) is not None:
        return bert.bert_from_hf(module, _np_dtype(torch, module, dtype, where), device)
    if llama.hf_llama_kind(module) is not None:
        return llama.llama_from_hf(module, _np_dtype(torch, module, dtype, where), device)
    if bart.hf_bart_kind(module) is not None:
        return bart.bart_from_torch(module, _np_dtype(torch, module, dtype, where), device)
    if t5.hf_t5_kind(module) is not None:
        return t5.t5_from_torch(module, _np_dtype(torch, module, dtype, where), device)
    hf = gpt2.hf_gpt2_kind(module)
    if hf is not None or gpt_like.is_gpt_like(module):
        np_dtype = _np_dtype(torch, module, dtype, where)
        if hf == "GPT2LMHeadModel":
            return gpt2.gpt_from_hf(module, np_dtype, device)
        if hf == "GPT2ForSequenceClassification":
            return gpt2.classifier_from_hf(module, np_dtype, device)
        return gpt_like.gpt_from_torch(torch, module, np_dtype, device)
    np_dtype = _np_dtype(torch, module, dtype, where)
    dev = device or backend.default_device()
    twin = _build(module, torch.nn, nn, dict(dtype=np_dtype, device=dev),
                  dict(generator=random.Generator(0, dev)), where)   # private generator: global RNG untouched
    # cast=True: the twin's dtype is the caller's explicit choice, or the source's own
    twin.load_state_dict({k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}, cast=True)
    return twin.train(module.training)


def to_torch(module, dtype=None, layout: str = None):
    """The torch twin of an npformer module: one of SUPPORTED, a GPT, a SequenceClassifier over a GPT,
    or a BERT or LLaMA model (-> the transformers class of the same name).

    dtype: np.float32 or np.float64; None keeps the module's own. The twin is on torch's CPU.
    layout (a GPT only): "hf" -> transformers' GPT2LMHeadModel (needs biases), "nanogpt" -> npformer's
        TorchGPT (torch_gpt.py); None: the layout the GPT came from in from_torch, else "hf" when
        config.bias, "nanogpt" without biases. A SequenceClassifier goes to GPT2ForSequenceClassification.
    torch's global random state is left as it was (the fresh weights are drawn in a fork of it).
    """
    torch = _import_torch()
    from ..models.classifier import SequenceClassifier
    from ..models.gpt import GPT
    if isinstance(module, GPT):
        t_dtype = _torch_dtype(torch, module, dtype)
        layout = layout or getattr(module, "torch_layout", None) or ("hf" if module.config.bias else "nanogpt")
        if layout not in ("hf", "nanogpt"):
            raise ValueError(f"to_torch: layout must be 'hf' or 'nanogpt'; got {layout!r}")
        return gpt2.gpt_to_hf(module, t_dtype) if layout == "hf" else gpt_like.gpt_to_torch(module, t_dtype)
    if layout is not None:
        raise ValueError(f"to_torch: layout applies to a GPT only; got a {type(module).__name__}")
    if isinstance(module, SequenceClassifier):
        return gpt2.classifier_to_hf(module, _torch_dtype(torch, module, dtype))
    if bert.is_bert(module):
        return bert.bert_to_hf(module, _torch_dtype(torch, module, dtype))
    if llama.is_llama(module):
        return llama.llama_to_hf(module, _torch_dtype(torch, module, dtype))
    if bart.is_bart(module):
        return bart.bart_to_torch(module, dtype)
    if t5.is_t5(module):
        return t5.t5_to_torch(module, dtype)
    where = type(module).__name__
    t_dtype = _torch_dtype(torch, module, dtype)
    with torch.random.fork_rng(devices=[]):
        twin = _build(module, nn, torch.nn, dict(dtype=t_dtype), {}, where)
    twin.load_state_dict({k: torch.from_numpy(np.array(backend.to_numpy(v)))
                          for k, v in module.state_dict().items()})
    return twin.train(module.training)
