"""Multi-head attention with torch.nn.MultiheadAttention's parameters, names and mask semantics.

    MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O,
    head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V),  Attention(q, k, v) = softmax(q k^T / sqrt(d_head)) v

The h query/key/value projections are stored stacked, as torch stores them:
``in_proj_weight`` (3E, E) holds [W^Q; W^K; W^V] (each (E, E), head i in rows
i*d_head:(i+1)*d_head), ``in_proj_bias`` (3E,), and ``out_proj`` is W^O.

torch's options ``add_bias_kv`` (a learned key and value, ``bias_k`` and ``bias_v``,
appended after the projected keys and values) and ``add_zero_attn`` (a key and a value of
zeros appended after those) are here with torch's semantics and names.

Differences from torch, on purpose: ``batch_first=True`` is the default (torch's
is False), ``need_weights=False`` is the default (torch's is True), ``scale`` can be
set (torch has no such argument), and ``is_causal=True`` without an attn_mask builds
the causal mask (torch raises). A query whose keys are all masked gives a zero
attention output (and zero weights), never NaN.
"""

from __future__ import annotations

import numbers

import numpy as np

from .. import ops
from ..tensor import Tensor
from . import functional as F
from . import init
from .layers import Linear, empty_parameter
from .module import Module


class MultiHeadAttention(Module):
    """torch.nn.MultiheadAttention, its parameters named as torch names them.

    embed_dim E must be divisible by num_heads H (d_head = E / H). kdim, vdim:
    feature sizes of key and value (default E); when either differs from E the
    projections are separate q_proj_weight (E, E), k_proj_weight (E, kdim) and
    v_proj_weight (E, vdim) instead of in_proj_weight, as in torch.
    dropout: probability of dropping attention weights in training.
    batch_first: inputs (B, T, E) when True (our default), (T, B, E) when False.
    add_bias_kv: learn one more key and value, bias_k and bias_v (1, 1, E), in the
        projected space, appended after the S projected keys and values of every sequence;
        initialised with xavier_normal_, N(0, 1 / E), as torch does.
    add_zero_attn: append a key and a value of zeros after those (a score of 0 that a
        query can put weight on). Masks are given for the S keys; every query attends
        the added keys (torch pads its masks with "not masked"), and the returned weights
        have S + add_bias_kv + add_zero_attn columns.
    scale: the factor on q k^T; None means 1 / sqrt(d_head) (T5 uses 1.0; torch has no
        such argument).
    The constructor's keyword names are torch's; add_bias_kv, add_zero_attn and scale are
    keyword-only (torch's 5th and 6th positional arguments are add_bias_kv and
    add_zero_attn, ours are kdim and vdim).

    forward(..., need_weights=False): need_weights is False by default here, so forward
    returns (out, None) unless asked; torch's default is True (it returns the weights
    averaged over heads unless told not to).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True, kdim=None,
                 vdim=None, batch_first: bool = True, generator=None, dtype=None, device=None, *,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, scale=None):
        super().__init__()
        if num_heads <= 0 or embed_dim % num_heads != 0:
            raise ValueError(f"MultiHeadAttention: embed_dim {embed_dim} must be divisible by num_heads "
                             f"{num_heads}")
        for name, dim in (("kdim", kdim), ("vdim", vdim)):
            if dim is not None and (isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1):
                raise TypeError(f"MultiHeadAttention: {name} must be a positive int or None; got {dim!r} (torch's "
                                f"5th and 6th positional arguments are add_bias_kv and add_zero_attn: pass those "
                                f"by keyword)")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.dropout = dropout
        self.batch_first = batch_first
        self.add_zero_attn = bool(add_zero_attn)
        self.scale = scale
        E = embed_dim
        if self._qkv_same_embed_dim:
            self.in_proj_weight = init.xavier_uniform_(empty_parameter((3 * E, E), dtype, device), generator=generator)
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                self.register_parameter(name, None)
        else:
            for name, d_in in (("q_proj_weight", E), ("k_proj_weight", self.kdim), ("v_proj_weight", self.vdim)):
                setattr(self, name, init.xavier_uniform_(empty_parameter((E, d_in), dtype, device), generator=generator))
            self.register_parameter("in_proj_weight", None)
        self.register_parameter("in_proj_bias", init.zeros_(empty_parameter((3 * E,), dtype, device)) if bias else None)
        for name in ("bias_k", "bias_v"):        # after in_proj_bias, before out_proj: torch's state_dict order
            self.register_parameter(name, init.xavier_normal_(empty_parameter((1, 1, E), dtype, device), generator=generator)
                                    if add_bias_kv else None)
        self.out_proj = Linear(E, E, bias=bias, generator=generator, dtype=dtype, device=device)
        if bias:
            init.zeros_(self.out_proj.bias)

    # ------------------------------------------------------------------ masks
    def _merge_masks(self, attn_mask, key_padding_mask, is_causal, B, L, S, added, like: Tensor):
        """One mask for SDPA over the S keys and the `added` ones after them, broadcastable to
        (B, H, L, S + added): a bool array with True = attend, or a float Tensor added to the scores
        (its graph kept, so a float mask that requires grad gets its gradient); or None.

        attn_mask: (L, S) or (B*H, L, S); key_padding_mask: (B, S). Boolean True = masked
        OUT here (nn.MultiheadAttention's polarity); float masks are added. The added keys
        (bias_k, the zero attention) are masked for no query.
        """
        where, H, xp = type(self).__name__, self.num_heads, like.xp
        am = F.mask_tensor(attn_mask, like)
        if am is None and is_causal:
            am = Tensor(~F.causal_mask(L, S, xp))                           # True above the diagonal
        if am is not None:
            F.check_mask(where, "attn_mask", am, tuple(am.shape) in ((L, S), (B * H, L, S)),
                         f"(L, S) = {(L, S)} or (B*num_heads, L, S) = {(B * H, L, S)}")
            am = am if am.ndim == 2 else ops.reshape(am, (B, H, L, S))
        kpm = F.mask_tensor(key_padding_mask, like)
        if kpm is not None:
            F.check_mask(where, "key_padding_mask", kpm, tuple(kpm.shape) == (B, S), f"(B, S) = {(B, S)}")
            kpm = ops.reshape(kpm, (B, 1, 1, S))
        masks = [m for m in (am, kpm) if m is not None]
        if not masks:
            return None
        if all(m.dtype == np.bool_ for m in masks):
            attend = ~masks[0].data if len(masks) == 1 else ~(masks[0].data | masks[1].data)   # SDPA's polarity
            if added:
                attend = xp.concatenate([attend, xp.ones(attend.shape[:-1] + (added,), bool)], axis=-1)
            return attend
        floats = [Tensor(xp.where(m.data, -np.inf, 0.0).astype(like.dtype)) if m.dtype == np.bool_
                  else ops.astype(m, like.dtype) for m in masks]
        bias = floats[0] if len(floats) == 1 else floats[0] + floats[1]
        if added:
            bias = ops.concatenate([bias, Tensor(xp.zeros(bias.shape[:-1] + (added,), like.dtype))], axis=-1)
        return bias

    # ------------------------------------------------------------------ forward
    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = False, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        """Attend from query to key/value.

        query: (B, L, E); key: (B, S, kdim); value: (B, S, vdim) with batch_first
        (else (L, B, E), ...), or unbatched (L, E), (S, kdim), (S, vdim).
        key_padding_mask: (B, S) (unbatched: (S,)); bool True = that key is padding,
            ignored; float: added to the scores (as torch adds it), and a float Tensor
            that requires grad gets its gradient.
        need_weights: also return the attention weights. False by default here; torch's
            default is True.
        attn_mask: (L, S) or (B*num_heads, L, S); bool True = NOT allowed to
            attend; float: added to the scores, with its gradient when it requires grad.
        is_causal: query i may attend keys 0..i only; a hint when attn_mask is
            given (attn_mask is then used as is), the mask itself when it is not.
        Returns (out (B, L, E), weights or None). weights (the ones multiplied into
        v, so after dropout in training): (B, L, S') averaged over heads, or
        (B, num_heads, L, S') with average_attn_weights=False; S' = S, plus one column
        for bias_k and one for the zero attention when those are on.
        """
        where = type(self).__name__
        q_in, k_in, v_in = query, key, value
        if query.ndim not in (2, 3) or key.ndim != query.ndim or value.ndim != query.ndim:
            raise ValueError(f"{where}: query, key and value must all be 3-D (batched) or 2-D (unbatched); "
                             f"got shapes {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        batched = query.ndim == 3
        if not batched:                                  # add a batch axis of 1
            q_in, k_in, v_in = (ops.reshape(t, (1,) + tuple(t.shape)) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = F.mask_tensor(key_padding_mask, q_in)
                key_padding_mask = ops.reshape(key_padding_mask, (1,) + tuple(key_padding_mask.shape))
        elif not self.batch_first:                       # (T, B, E) -> (B, T, E)
            q_in, k_in, v_in = (ops.transpose(t, 0, 1) for t in (query, key, value))
        B, L, E = q_in.shape
        S = k_in.shape[1]
        if E != self.embed_dim or k_in.shape[-1] != self.kdim or v_in.shape[-1] != self.vdim:
            raise ValueError(f"{where}: query, key, value have feature sizes {E}, {k_in.shape[-1]}, "
                             f"{v_in.shape[-1]}; expected embed_dim {self.embed_dim}, kdim {self.kdim}, "
                             f"vdim {self.vdim}")
        if k_in.shape[:2] != v_in.shape[:2] or k_in.shape[0] != B:
            raise ValueError(f"{where}: key {tuple(key.shape)} and value {tuple(value.shape)} must share batch "
                             f"and length, and match the batch of query {tuple(query.shape)}")
        H, d = self.num_heads, self.head_dim

        # Projections: q (B, L, E), k (B, S, E), v (B, S, E).
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = ops.split(self.in_proj_bias, E, axis=0)
        if self._qkv_same_embed_dim and query is key and key is value:      # self-attention: one matmul
            q, k, v = ops.split(F.linear(q_in, self.in_proj_weight, self.in_proj_bias), E, axis=-1)
        else:
            if self._qkv_same_embed_dim:
                w_q, w_k, w_v = ops.split(self.in_proj_weight, E, axis=0)
            else:
                w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
            q, k, v = F.linear(q_in, w_q, b_q), F.linear(k_in, w_k, b_k), F.linear(v_in, w_v, b_v)
        if self.bias_k is not None:                                         # add_bias_kv: a learned key, value
            k = ops.concatenate([k, ops.expand(self.bias_k, (B, 1, E))], axis=1)   # (B, S + 1, E)
            v = ops.concatenate([v, ops.expand(self.bias_v, (B, 1, E))], axis=1)   # (B, S + 1, E)
        if self.add_zero_attn:                                              # and a key, value of zeros
            k, v = (ops.concatenate([t, Tensor(t.xp.zeros((B, 1, E), t.dtype))], axis=1) for t in (k, v))
        mask = self._merge_masks(attn_mask, key_padding_mask, is_causal, B, L, S, k.shape[1] - S, q)
        S = k.shape[1]                                                      # the keys, added ones included
        q = ops.transpose(ops.reshape(q, (B, L, H, d)), 1, 2)              # (B, H, L, d)
        k = ops.transpose(ops.reshape(k, (B, S, H, d)), 1, 2)              # (B, H, S, d)
        v = ops.transpose(ops.reshape(v, (B, S, H, d)), 1, 2)              # (B, H, S, d)

        p = self.dropout if self.training else 0.0
        # one fused attention op unless the weights are wanted (then composed from primitive ops)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=self.scale,
                                           need_weights=need_weights)
        y, w = y if need_weights else (y, None)
        y = ops.reshape(ops.transpose(y, 1, 2), (B, L, E))                  # (B, L, E), heads side by side
        out = self.out_proj(y)

        weights = None
        if need_weights:
            weights = ops.mean(w, axis=1) if average_attn_weights else w    # (B, L, S) or (B, H, L, S)
            if not batched:
                weights = ops.reshape(weights, weights.shape[1:])
        if not batched:
            out = ops.reshape(out, (L, E))
        elif not self.batch_first:
            out = ops.transpose(out, 0, 1)                                  # back to (L, B, E)
        return out, weights

    def extra_repr(self) -> str:
        options = "".join(f", {name}=True" for name, on in (("add_bias_kv", self.bias_k is not None),
                                                             ("add_zero_attn", self.add_zero_attn)) if on)
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}" + options + ("" if self.scale is None else f", scale={self.scale}"))


MultiheadAttention = MultiHeadAttention   # torch's spelling
