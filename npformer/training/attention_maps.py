"""Attention maps of a trained encoder-decoder: what each head of each layer looks at.

``attention_weights`` records every MultiHeadAttention's per-head weights during one teacher-forced
pass; ``save_attention_maps`` draws them (matplotlib, when installed) for a translation of one input,
one PNG per kind of attention (``npformer seq2seq --attention-maps``; docs/seq2seq.md).
"""

from __future__ import annotations

import os

import numpy as np

from .. import backend
from ..autograd import no_grad
from ..data.tasks import EOS, TaskTokenizer

# kind of attention -> PNG file name
KINDS = {"encoder self-attention": "attention-encoder-self.png",
         "decoder self-attention": "attention-decoder-self.png", "cross-attention": "attention-cross.png"}


def attention_weights(model, src, tgt_in) -> dict:
    """Per-layer, per-head attention weights of one teacher-forced pass in eval mode.

    src (1, S), tgt_in (1, T) int. Returns {kind: [(H, L, S_kv) host array per layer]} for the
    kinds in KINDS: encoder (S, S), decoder self (T, T) and cross (T, S). Each MultiHeadAttention's
    forward is wrapped for the pass only, asking it for its unaveraged weights.
    """
    t = model.transformer
    enc, dec, cross = KINDS
    mods = [(enc, layer.self_attn) for layer in t.encoder.layers]
    mods += [(kind, attn) for layer in t.decoder.layers
             for kind, attn in ((dec, layer.self_attn), (cross, layer.multihead_attn))]
    weights = {kind: [] for kind in KINDS}

    def recording(kind, attn):
        def forward(*args, **kwargs):
            out, w = type(attn).forward(attn, *args, **{**kwargs, "need_weights": True, "average_attn_weights": False})
            weights[kind].append(backend.to_numpy(w.data)[0])                 # (H, L, S_kv)
            return out, w
        return forward

    was_training = model.training
    model.eval()
    try:
        for kind, attn in mods:
            object.__setattr__(attn, "forward", recording(kind, attn))
        with no_grad():
            model(src, tgt_in)
    finally:
        for _, attn in mods:
            attn.__dict__.pop("forward", None)
        model.train(was_training)
    return weights


def save_attention_maps(model, tok: TaskTokenizer, text: str, out_dir: str, dpi: int = 80) -> list:
    """PNGs of the three kinds of attention while the model translates `text` (its own greedy
    output as the decoder input); one panel per layer (rows) and head (columns). Returns the
    paths written, none when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    from .seq2seq import decode, model_device                               # seq2seq.py imports this module
    device = model_device(model)
    src = tok.encode(text)[None]                                             # (1, S)
    ys = decode(model, tok, src)[0]                                          # BOS y EOS (then PAD)
    ys = ys[:1 + int(np.argmax(ys == EOS))] if (ys == EOS).any() else ys
    weights = attention_weights(model, backend.to_device(src, device), backend.to_device(ys[None, :-1], device))
    show = lambda c: "_" if c == " " else c                                  # noqa: E731
    out_chars = [show(c) for c in tok.decode(ys[1:])] + ["</s>"] * bool((ys == EOS).any())
    src_labels, tgt_in_labels = [show(c) for c in text], ["<s>"] + out_chars[:len(ys) - 2]
    enc, dec, cross = KINDS
    # kind -> (query labels, key labels, query axis name, key axis name)
    labels = {enc: (src_labels, src_labels, "source (query)", "source (key)"),
              dec: (out_chars, tgt_in_labels, "output being predicted", "decoder input"),
              cross: (out_chars, src_labels, "output being predicted", "source")}
    paths = []
    for kind in KINDS:
        layers = weights[kind]
        n_layers, H = len(layers), layers[0].shape[0]
        rows, cols, row_name, col_name = labels[kind]
        fig, axes = plt.subplots(n_layers, H, squeeze=False, layout="constrained",
                                 figsize=(H * (0.15 * len(cols) + 0.8), n_layers * (0.15 * len(rows) + 1.0) + 0.3))
        for i, w in enumerate(layers):
            for h in range(H):
                ax = axes[i][h]
                ax.imshow(w[h], vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest", aspect="equal")
                ax.set_xticks(range(len(cols)), cols, fontsize=6, rotation=90 if max(map(len, cols)) > 1 else 0)
                ax.set_yticks(range(len(rows)), rows, fontsize=6)
                ax.set_title(f"layer {i}, head {h}", fontsize=8)
                if h == 0:
                    ax.set_ylabel(row_name, fontsize=7)
                if i == n_layers - 1:
                    ax.set_xlabel(col_name, fontsize=7)
        fig.suptitle(f"{kind}: {text!r} -> {tok.decode(ys[1:])!r}", fontsize=9)
        path = os.path.join(out_dir, KINDS[kind])
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        paths.append(path)
    return paths
