"""GPTs written in the nanoGPT and minGPT styles <-> npformer.models.GPT.

A torch module is taken for such a GPT by its structure and parameter names (its class does not
matter):

    transformer.wte, transformer.wpe          nn.Embedding (vocab_size, C), (block_size, C)
    transformer.h[i].ln_1, .ln_2              LayerNorm: nn.LayerNorm, or any module with weight
                                              (and bias or None) computing a layer norm (nanoGPT's)
    transformer.h[i].attn.c_attn, .c_proj     nn.Linear C -> 3C, C -> C (stored (out, in): not transposed)
    transformer.h[i].mlp.c_fc, .c_proj        nn.Linear C -> 4C, 4C -> C, plus one activation module
    transformer.ln_f, lm_head                 LayerNorm; nn.Linear C -> V without bias

The block is assumed to compute what nanoGPT's does (pre-LN residuals, causal softmax attention
scaled by 1/sqrt(hs), GELU MLP); compare() checks that. Read off the modules:
    n_head         attn.n_head (nanoGPT and minGPT store it there), else the model's config.n_head
    block_size     wpe's rows;  vocab_size, n_embd from wte;  n_layer from len(h)
    bias           present in every Linear and LayerNorm (lm_head excepted), or in none
    tie            lm_head.weight is transformer.wte.weight (nanoGPT ties, minGPT does not)
    gelu           nn.GELU's approximate; any other activation module (minGPT's NewGELU) is probed
                   on a grid and must match GELU (erf) or GELU (tanh) to rounding
    eps            nn.LayerNorm's eps; a module without one (nanoGPT's LayerNorm) is taken as 1e-5
                   and probed to compute layer_norm with that eps
    dropout        one p shared by every nn.Dropout and attn.dropout (npformer's GPT has one)
Buffers are ignored only when they are the causal mask (``attn.bias``, lower triangular); any
other buffer, or a parameter npformer's GPT has no place for, raises ValueError naming it.

The twin's parameters keep the torch names and layouts. to_torch gives them back in npformer's
own torch module of that layout (torch_gpt.TorchGPT): the source class is not known to npformer.
"""

from __future__ import annotations

import numpy as np

from .. import backend

PARTS = ("transformer.wte", "transformer.wpe", "transformer.h", "transformer.ln_f", "lm_head")


def is_gpt_like(module) -> bool:
    """True when `module` has the nanoGPT/minGPT structure (transformer.{wte,wpe,h,ln_f} and lm_head)."""
    t = getattr(module, "transformer", None)
    return t is not None and hasattr(module, "lm_head") and all(hasattr(t, n) for n in ("wte", "wpe", "h", "ln_f"))


def _child(m, name: str, where: str):
    if not hasattr(m, name):
        raise ValueError(f"{where}: has no {name}; a nanoGPT-style GPT needs {where}.{name}")
    return getattr(m, name)


def _linear(torch, m, where: str, d_in: int, d_out: int):
    """Check that m is an nn.Linear d_in -> d_out; return whether it has a bias."""
    if type(m) is not torch.nn.Linear:
        raise ValueError(f"{where}: {type(m).__name__} is not supported here; expected torch.nn.Linear")
    if (m.in_features, m.out_features) != (d_in, d_out):
        raise ValueError(f"{where}: Linear({m.in_features}, {m.out_features}); npformer's GPT needs "
                         f"Linear({d_in}, {d_out})")
    return m.bias is not None


def _embedding(torch, m, where: str):
    if type(m) is not torch.nn.Embedding:
        raise ValueError(f"{where}: {type(m).__name__} is not supported here; expected torch.nn.Embedding")
    for option, plain in (("padding_idx", None), ("max_norm", None), ("scale_grad_by_freq", False),
                          ("sparse", False)):
        if getattr(m, option) != plain:
            raise ValueError(f"{where}: Embedding({option}={getattr(m, option)!r}) is not supported in a GPT")
    return m.num_embeddings, m.embedding_dim


def _probe_close(torch, got, want) -> bool:
    """got equals want to rounding: 1e-12 (float64) or 1e-5 (float32) relative to max |want|."""
    tol = 1e-12 if want.dtype == torch.float64 else 1e-5
    return bool((got - want).abs().max() <= tol * want.abs().max().clamp_min(1e-30))


def _norm(torch, m, where: str, C: int):
    """(eps, has bias) of a LayerNorm-like module over C features."""
    if type(m) is torch.nn.LayerNorm:
        if tuple(m.normalized_shape) != (C,) or not m.elementwise_affine:
            raise ValueError(f"{where}: LayerNorm{tuple(m.normalized_shape)} elementwise_affine="
                             f"{m.elementwise_affine}; npformer's GPT needs LayerNorm(({C},)) with weights")
        return float(m.eps), m.bias is not None
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    if not isinstance(w, torch.nn.Parameter) or tuple(w.shape) != (C,) or \
            not (b is None or (isinstance(b, torch.nn.Parameter) and tuple(b.shape) == (C,))):
        raise ValueError(f"{where}: {type(m).__name__} is not a LayerNorm over {C} features (weight ({C},) and "
                         f"bias ({C},) or None)")
    eps = float(getattr(m, "eps", 1e-5))
    g = torch.Generator().manual_seed(0)
    x = (0.3 + 0.01 * torch.randn(4, C, generator=g, dtype=torch.float64)).to(w.dtype)   # var ~ 1e-4: eps shows
    with torch.no_grad():
        if not _probe_close(torch, m(x), torch.nn.functional.layer_norm(x, (C,), w, b, eps)):
            raise ValueError(f"{where}: {type(m).__name__} does not compute layer_norm(x, weight, bias, eps={eps:g}) "
                             f"(probed); give it an eps attribute or use torch.nn.LayerNorm")
    return eps, b is not None


def _gelu(torch, mlp, where: str, dtype) -> str:
    """"none" or "tanh": the GELU of the MLP's one activation module."""
    acts = [(n, m) for n, m in mlp.named_children() if n not in ("c_fc", "c_proj")
            and type(m) is not torch.nn.Dropout]
    if len(acts) != 1:
        raise ValueError(f"{where}: expected one activation module besides c_fc, c_proj and dropout; found "
                         f"{[n for n, _ in acts]}")
    name, act = acts[0]
    if type(act) is torch.nn.GELU:
        return act.approximate
    x = torch.linspace(-6.0, 6.0, 241, dtype=torch.float64).to(dtype)
    with torch.no_grad():
        y = act(x)
        for approximate in ("none", "tanh"):
            if _probe_close(torch, y, torch.nn.functional.gelu(x, approximate=approximate)):
                return approximate
    raise ValueError(f"{where}.{name}: {type(act).__name__} computes neither GELU (erf) nor GELU (tanh) (probed); "
                     f"npformer's GPT supports only those")


def _uniform(where: str, option: str, values: dict):
    """The one value shared by all entries of {place: value}, else ValueError naming two that differ."""
    distinct = dict.fromkeys(values.values())
    if len(distinct) != 1:
        first = next(iter(values.items()))
        other = next((k, v) for k, v in values.items() if v != first[1])
        raise ValueError(f"{where}: {option} differs: {first[0]} has {first[1]!r} but {other[0]} has {other[1]!r}; "
                         f"npformer's GPT has one {option}")
    return next(iter(distinct))


def config_from_torch(torch, model, where: str):
    """The GPTConfig of a nanoGPT/minGPT-style torch model; ValueError naming what does not fit."""
    from ..models.gpt import GPTConfig
    t = model.transformer
    V, C = _embedding(torch, t.wte, f"{where}.transformer.wte")
    block_size, C_pos = _embedding(torch, t.wpe, f"{where}.transformer.wpe")
    if C_pos != C:
        raise ValueError(f"{where}.transformer.wpe: embedding_dim {C_pos} differs from wte's {C}")
    if _linear(torch, model.lm_head, f"{where}.lm_head", C, V):
        raise ValueError(f"{where}.lm_head: has a bias; npformer's GPT has lm_head without bias")
    blocks = list(t.h)
    if not blocks:
        raise ValueError(f"{where}.transformer.h: n_layer must be at least 1")
    dtype = t.wte.weight.dtype
    biases, eps, gelu, heads, drops = {}, {}, {}, {}, {}
    for i, b in enumerate(blocks):
        p = f"{where}.transformer.h.{i}"
        attn, mlp = _child(b, "attn", p), _child(b, "mlp", p)
        for ln in ("ln_1", "ln_2"):
            eps[f"{p}.{ln}"], biases[f"{p}.{ln}"] = _norm(torch, _child(b, ln, p), f"{p}.{ln}", C)
        for name, m, d_in, d_out in (("attn.c_attn", _child(attn, "c_attn", f"{p}.attn"), C, 3 * C),
                                     ("attn.c_proj", _child(attn, "c_proj", f"{p}.attn"), C, C),
                                     ("mlp.c_fc", _child(mlp, "c_fc", f"{p}.mlp"), C, 4 * C),
                                     ("mlp.c_proj", _child(mlp, "c_proj", f"{p}.mlp"), 4 * C, C)):
            biases[f"{p}.{name}"] = _linear(torch, m, f"{p}.{name}", d_in, d_out)
        gelu[f"{p}.mlp"] = _gelu(torch, mlp, f"{p}.mlp", dtype)
        n_head = getattr(attn, "n_head", getattr(getattr(model, "config", None), "n_head", None))
        if n_head is None:
            raise ValueError(f"{p}.attn: has no n_head attribute (nor has the model a config.n_head); "
                             f"cannot tell the number of heads")
        heads[f"{p}.attn"] = int(n_head)
        if isinstance(getattr(attn, "dropout", None), (int, float)):
            drops[f"{p}.attn.dropout"] = float(attn.dropout)
    eps[f"{where}.transformer.ln_f"], biases[f"{where}.transformer.ln_f"] = \
        _norm(torch, t.ln_f, f"{where}.transformer.ln_f", C)
    drops.update({f"{where}.{n}" if n else where: float(m.p) for n, m in model.named_modules()
                  if type(m) is torch.nn.Dropout})
    return GPTConfig(vocab_size=V, block_size=block_size, n_layer=len(blocks), n_head=_uniform(where, "n_head", heads),
                     n_embd=C, dropout=_uniform(where, "dropout", drops) if drops else 0.0,
                     bias=_uniform(where, "bias", biases), gelu_approximate=_uniform(where, "GELU", gelu),
                     layer_norm_eps=_uniform(where, "layer_norm eps", eps),
                     tie_embeddings=model.lm_head.weight is t.wte.weight)


def _check_names(torch, model, own: set, where: str):
    """Every torch parameter has a place in the twin; buffers are only causal masks."""
    extra = [n for n, _ in model.named_parameters(remove_duplicate=False) if n not in own]
    if extra:
        raise ValueError(f"{where}: parameters npformer's GPT has no place for: {extra}")
    for name, b in model.named_buffers():
        n = b.shape[-1] if b.ndim >= 2 else -1
        causal = name.endswith("attn.bias") and b.ndim >= 2 and b.numel() == n * n and torch.equal(
            b.reshape(n, n) != 0, torch.ones(n, n, dtype=torch.bool).tril())
        if not causal:
            raise ValueError(f"{where}: buffer {name} {tuple(b.shape)} is not a causal mask; npformer's GPT has "
                             f"no place for it")


def gpt_from_torch(torch, model, dtype, device=None):
    """npformer GPT (dtype, device) with the weights of a nanoGPT/minGPT-style torch model."""
    from ..models.gpt import GPT
    where = type(model).__name__
    config = config_from_torch(torch, model, where)
    gpt = GPT(config, dtype=dtype, device=device)
    own = gpt.state_dict()
    _check_names(torch, model, set(own), where)
    theirs = model.state_dict()
    gpt.load_state_dict({k: theirs[k].detach().cpu().numpy() for k in own}, cast=True)
    gpt.torch_layout = "nanogpt"
    return gpt.train(model.training)


def gpt_to_torch(gpt, torch_dtype):
    """npformer's TorchGPT (nanoGPT layout, torch_dtype, CPU) with the weights of npformer's `gpt`."""
    import torch
    from .torch_gpt import TorchGPT
    with torch.random.fork_rng(devices=[]):                        # its random init leaves torch's RNG alone
        model = TorchGPT(gpt.config).to(torch_dtype)
    model.load_state_dict({k: torch.from_numpy(np.array(backend.to_numpy(a))) for k, a in gpt.state_dict().items()})
    return model.train(gpt.training)
