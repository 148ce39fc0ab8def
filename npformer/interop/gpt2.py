"""GPT-2 twins: transformers' GPT2LMHeadModel <-> npformer.models.GPT, and
GPT2ForSequenceClassification <-> npformer.models.SequenceClassifier over a GPT.

Configuration (GPT2Config -> GPTConfig):
    vocab_size, n_layer, n_head, n_embd          -> the same fields
    n_positions                                  -> block_size
    layer_norm_epsilon                           -> layer_norm_eps
    activation_function "gelu_new" (GPT-2's) or
        "gelu_pytorch_tanh"                      -> gelu_approximate "tanh";  "gelu" -> "none"
    resid_pdrop = embd_pdrop = attn_pdrop        -> dropout (npformer's GPT has one)
    lm_head.weight is transformer.wte.weight     -> tie_embeddings (tie_word_embeddings on export)
Anything GPT's architecture lacks (scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn,
add_cross_attention, scale_attn_weights=False, n_inner != 4 n_embd, another activation) raises
ValueError naming the option.

Weights keep their names (``transformer.h.0.attn.c_attn.weight``). GPT-2's Conv1D layers
(attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) store weight as (in, out); npformer's Linear
stores (out, in), so those weights are transposed on the way in and out; the twin keeps that
TorchMapping as ``torch_mapping``, so npformer.interop.compare reports in HF's names and layouts
out of the box. Exported models use the
eager attention path (attn_implementation="eager"), the plain softmax(q k^T / sqrt(hs)) v that
npformer computes.

GPT2ForSequenceClassification (single-label, num_labels classes) becomes
SequenceClassifier(GPT, num_labels, pooling="last", pad_id=config.pad_token_id, head_bias=False):
HF's ``transformer.*`` is the twin's ``backbone.transformer.*`` and ``score`` its ``head``. Both pool
the rightmost token that is not pad_token_id (the last one when pad_token_id is None); npformer's
GPT backbone needs right padding, where the two agree exactly (causal attention: the pads after a
token do not reach it). Regression (num_labels=1) and multi-label problem types raise.
"""

from __future__ import annotations

from .mapping import TorchMapping

_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
# config attribute -> the only value npformer's GPT can mirror
_FIXED = {"scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
          "add_cross_attention": False, "scale_attn_weights": True}
HF_CLASSES = ("GPT2LMHeadModel", "GPT2ForSequenceClassification")


def hf_gpt2_kind(module):
    """The class name for a transformers model in HF_CLASSES, else None (without importing transformers)."""
    cls = type(module)
    return cls.__name__ if cls.__name__ in HF_CLASSES and cls.__module__.startswith("transformers.") else None


def _conv1d_weights(model) -> set:
    """Names of the (in, out)-stored Conv1D weights of an HF model."""
    from transformers.pytorch_utils import Conv1D
    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, Conv1D)}


def config_from_hf(c, tie_embeddings: bool = True):
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
                     gelu_approximate=_GELU[c.activation_function], layer_norm_eps=float(c.layer_norm_epsilon),
                     tie_embeddings=tie_embeddings)


def config_to_hf(config, **extra):
    """GPT2Config (eager attention) equivalent to a GPTConfig; extra: more GPT2Config fields."""
    import transformers
    if not config.bias:
        raise ValueError("GPTConfig.bias=False is not supported by GPT2LMHeadModel (GPT-2 has biases); "
                         "to_torch(..., layout='nanogpt') exports it in npformer's TorchGPT")
    return transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer,
        n_head=config.n_head, n_inner=None,
        activation_function="gelu_new" if config.gelu_approximate == "tanh" else "gelu",
        resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
        layer_norm_epsilon=config.layer_norm_eps, tie_word_embeddings=config.tie_embeddings, bos_token_id=None,
        eos_token_id=None, attn_implementation="eager", **extra)


def _mapping(model, rename=None):
    """The TorchMapping between the HF model's names and layouts and its twin's (Conv1D transposed)."""
    return TorchMapping(rename=rename, transpose=sorted(_conv1d_weights(model)))


def _load_into_hf(model, twin, mapping):
    """Copy the twin's weights into the HF model, in HF's names and layouts."""
    import torch
    arrays = mapping.to_torch(twin.state_dict(), list(model.state_dict()))
    model.load_state_dict({k: torch.from_numpy(a) for k, a in arrays.items()})


def gpt_from_hf(model, dtype, device=None):
    """npformer GPT (dtype, device) with the weights of the HF GPT2LMHeadModel `model`; the twin
    keeps its TorchMapping (Conv1D weights transposed) as ``torch_mapping``, for compare."""
    from ..models.gpt import GPT
    tied = model.lm_head.weight is model.transformer.wte.weight
    gpt = GPT(config_from_hf(model.config, tie_embeddings=tied), dtype=dtype, device=device)
    mapping = _mapping(model)
    # cast=True: the dtype was chosen by the caller (or is the source's)
    gpt.load_state_dict(mapping.to_twin(model), cast=True)
    gpt.torch_mapping = mapping
    return gpt.train(model.training)


def gpt_to_hf(gpt, torch_dtype):
    """HF GPT2LMHeadModel (eager attention, torch_dtype, CPU) with the weights of npformer's `gpt`."""
    import torch
    import transformers
    hf_config = config_to_hf(gpt.config)
    with torch.random.fork_rng(devices=[]):                        # its random init leaves torch's RNG alone
        model = transformers.GPT2LMHeadModel(hf_config)
    model = model.to(torch_dtype)
    _load_into_hf(model, gpt, _mapping(model))
    return model.train(gpt.training)


# ----------------------------------------------------------------------------- sequence classification

def _classes(c) -> int:
    """num_labels of a single-label GPT2Config; ValueError for regression or multi-label."""
    kind = c.problem_type or ("regression" if c.num_labels == 1 else "single_label_classification")
    if kind != "single_label_classification":
        raise ValueError(f"GPT2ForSequenceClassification: problem_type {kind!r} (num_labels={c.num_labels}) is "
                         f"not supported; SequenceClassifier is single-label (cross-entropy)")
    return c.num_labels


_CLASSIFIER_NAMES = {"score": "head", "transformer": "backbone.transformer"}    # HF prefix -> twin prefix


def classifier_from_hf(model, dtype, device=None):
    """SequenceClassifier over a GPT (dtype, device) with the weights of an HF GPT2ForSequenceClassification;
    the twin keeps its TorchMapping (renames, Conv1D transposes) as ``torch_mapping``, for compare."""
    from ..models.classifier import SequenceClassifier
    from ..models.gpt import GPT
    c = model.config
    gpt = GPT(config_from_hf(c, tie_embeddings=True), dtype=dtype, device=device)   # its lm_head is unused
    clf = SequenceClassifier(gpt, _classes(c), pooling="last", pad_id=c.pad_token_id, head_bias=False)
    mapping = _mapping(model, _CLASSIFIER_NAMES)
    state = mapping.to_twin(model)
    state["backbone.lm_head.weight"] = state["backbone.transformer.wte.weight"]     # tied: the same array
    clf.load_state_dict(state, cast=True)
    clf.torch_mapping = mapping
    return clf.train(model.training)


def classifier_to_hf(clf, torch_dtype):
    """HF GPT2ForSequenceClassification (eager attention, torch_dtype, CPU) computing what `clf` computes."""
    import torch
    import transformers
    where = "to_torch(SequenceClassifier)"
    if clf.kind != "gpt" or clf.pooling != "last":
        raise ValueError(f"{where}: only a GPT backbone with pooling='last' has an HF twin "
                         f"(GPT2ForSequenceClassification); got kind={clf.kind!r}, pooling={clf.pooling!r}")
    if clf.head.bias is not None or clf.dropout.p != 0.0:
        raise ValueError(f"{where}: GPT2ForSequenceClassification's score has no bias and no dropout before it; "
                         f"build the classifier with head_bias=False, dropout=0.0")
    hf_config = config_to_hf(clf.backbone.config, num_labels=clf.num_classes, pad_token_id=clf.pad_id,
                             problem_type="single_label_classification")
    with torch.random.fork_rng(devices=[]):
        model = transformers.GPT2ForSequenceClassification(hf_config)
    model = model.to(torch_dtype)
    _load_into_hf(model, clf, _mapping(model, _CLASSIFIER_NAMES))
    return model.train(clf.training)
