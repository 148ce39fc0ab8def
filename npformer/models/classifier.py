"""Sequence classification on top of a Transformer backbone, for fine-tuning or a linear probe.

    h = backbone(idx)                       (B, T, C)  final hidden states
    z = pool(h, valid)                      (B, C)     last non-pad token, or mean over non-pad tokens
    logits = W dropout(z) + b               (B, num_classes)   (no b with head_bias=False)
    loss = cross_entropy(logits, labels)    mean over the batch
"""

from __future__ import annotations

import numpy as np

from .. import backend, ops
from .. import nn
from ..nn import functional as F
from ..tensor import Tensor
from .gpt import GPT
from .seq2seq import Seq2SeqTransformer


class SequenceClassifier(nn.Module):
    """A backbone, a pooling of its hidden states, and a Linear head to num_classes.

    backbone, and what forward's idx is for it:
      - GPT: (B, T) token ids; hidden states from its trunk (GPT.hidden_states, no lm_head).
        Attention is causal, so padding must be at the end (right padding); pooling "last" by default.
      - Seq2SeqTransformer: (B, T) source token ids; hidden states = its encoder's output
        (encode), padding masked out of attention; pooling "mean" by default.
      - nn.TransformerEncoder: (B, T, C) float vectors, already embedded; the pad mask is passed
        as its src_key_padding_mask; pooling "mean" by default.
    pooling: "last" (the hidden state at the last non-pad position) or "mean" (over non-pad positions).
    pad_id: the padding token, used when forward gets no pad_mask (default: a Seq2SeqTransformer's
        config.pad_id; None, i.e. no padding, for the others).
    dropout: on the pooled vector before the head. The head is built with the backbone's dtype and
    device; generator draws its initial weights (nn.Linear's init). head_bias=False: a head without
    bias (HF's GPT2ForSequenceClassification.score, say).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, pooling: str = None, pad_id: int = None,
                 dropout: float = 0.0, generator=None, head_bias: bool = True):
        super().__init__()
        if isinstance(backbone, GPT):
            kind, d_model, default_pool = "gpt", backbone.config.n_embd, "last"
        elif isinstance(backbone, Seq2SeqTransformer):
            kind, d_model, default_pool = "seq2seq", backbone.config.d_model, "mean"
            pad_id = backbone.config.pad_id if pad_id is None else pad_id
        elif isinstance(backbone, nn.TransformerEncoder):
            kind, d_model, default_pool = "encoder", backbone.layers[0].self_attn.embed_dim, "mean"
        else:
            raise TypeError(f"SequenceClassifier: backbone must be a GPT, a Seq2SeqTransformer or an "
                            f"nn.TransformerEncoder; got {type(backbone).__name__}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise ValueError(f"SequenceClassifier: num_classes must be a positive integer; got {num_classes!r}")
        pooling = default_pool if pooling is None else pooling
        if pooling not in ("last", "mean"):
            raise ValueError(f"SequenceClassifier: pooling must be 'last' or 'mean'; got {pooling!r}")
        self.kind, self.pooling, self.pad_id, self.num_classes = kind, pooling, pad_id, num_classes
        self.backbone = backbone
        w = backbone.parameters()[0]
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(d_model, num_classes, bias=head_bias, generator=generator, dtype=w.dtype,
                              device=w.device)

    def freeze_backbone(self) -> "SequenceClassifier":
        """Stop gradients into the backbone (a linear probe): only the head (and dropout) train."""
        for p in self.backbone.parameters():
            p.requires_grad = False
            p.grad = None
        return self

    def unfreeze_backbone(self) -> "SequenceClassifier":
        for p in self.backbone.parameters():
            p.requires_grad = True
        return self

    def trainable_parameters(self) -> list:
        """The parameters that require grad (for the optimizer of a frozen-backbone probe)."""
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ hidden states and pooling
    def _pad_mask(self, idx, pad_mask):
        """(B, T) bool array, True = padding, on the model's device; None when nothing is padding."""
        B, T = idx.shape[:2]
        if pad_mask is None:
            if self.pad_id is None or self.kind == "encoder":
                return None
            return idx == self.pad_id
        m = F.mask_array(pad_mask, self.head.weight)
        if m.dtype != np.bool_ or tuple(m.shape) != (B, T):
            raise ValueError(f"SequenceClassifier: pad_mask must be bool (B, T) = {(B, T)}; got {m.dtype} "
                             f"{tuple(m.shape)}")
        return m

    def hidden_states(self, idx, pad_mask=None):
        """The backbone's final hidden states (B, T, C) and the pad mask used (B, T) bool, or None."""
        if self.kind == "encoder":
            x = idx if isinstance(idx, Tensor) else Tensor(idx)
            if x.ndim != 3 or x.dtype.kind != "f":
                raise ValueError(f"SequenceClassifier: an nn.TransformerEncoder backbone takes embedded "
                                 f"vectors (B, T, C); got shape {x.shape} and dtype {x.dtype}")
            pad = self._pad_mask(x, pad_mask)
            return self.backbone(x, src_key_padding_mask=pad), pad
        raw = idx.data if isinstance(idx, Tensor) else idx
        raw = raw if backend.is_array(raw) else np.asarray(raw)
        if raw.ndim != 2:
            raise ValueError(f"SequenceClassifier: idx must be (B, T) token ids; got shape {tuple(raw.shape)}")
        pad = self._pad_mask(raw, pad_mask)
        if self.kind == "seq2seq":
            return self.backbone.encode(raw, pad), pad
        bad = None if pad is None else backend.to_numpy((pad[:, :-1] & ~pad[:, 1:]).any(axis=1))  # (B,)
        if bad is not None and bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(f"SequenceClassifier: a GPT backbone is causal and needs right padding, but row "
                             f"{row} has a token after padding")
        return self.backbone.hidden_states(raw), pad

    def pool(self, h: Tensor, pad) -> Tensor:
        """(B, T, C) -> (B, C): h at the last non-pad position, or the mean of h over non-pad positions."""
        B, T, C = h.shape
        xp = h.xp
        valid = xp.ones((B, T), dtype=bool) if pad is None else ~pad                  # (B, T)
        count = valid.sum(axis=1)                                                      # (B,)
        if bool((count == 0).any()):
            row = int(np.flatnonzero(backend.to_numpy(count == 0))[0])
            raise ValueError(f"SequenceClassifier: row {row} has no non-pad tokens to pool")
        if self.pooling == "last":
            last = T - 1 - xp.argmax(valid[:, ::-1], axis=1)                           # (B,)
            return ops.getitem(h, (xp.arange(B), last))                                # (B, C)
        w = (valid / count[:, None]).astype(h.dtype)[:, :, None]                       # (B, T, 1)
        return ops.sum(h * w, axis=1)                                                  # (B, C)

    def forward(self, idx, labels=None, pad_mask=None):
        """(logits (B, num_classes), mean cross-entropy or None).

        idx: (B, T) token ids (or (B, T, C) vectors for an nn.TransformerEncoder backbone);
        labels: (B,) int in [0, num_classes); pad_mask: (B, T) bool, True = padding.
        """
        h, pad = self.hidden_states(idx, pad_mask)                                     # (B, T, C)
        logits = self.head(self.dropout(self.pool(h, pad)))                            # (B, num_classes)
        loss = None
        if labels is not None:
            y = labels.data if isinstance(labels, Tensor) else labels
            y = y if backend.is_array(y) else np.asarray(y)
            if tuple(y.shape) != (logits.shape[0],):
                raise ValueError(f"SequenceClassifier: labels must have shape (B,) = ({logits.shape[0]},); "
                                 f"got {tuple(y.shape)}")
            loss = F.cross_entropy(logits, y)
        return logits, loss

    def extra_repr(self) -> str:
        return f"kind={self.kind}, pooling={self.pooling!r}, num_classes={self.num_classes}"
