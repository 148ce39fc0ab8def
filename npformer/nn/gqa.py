"""Grouped-query attention with rotary positions and a key/value cache: HF LLaMA's self-attention.

GQA (Ainslie et al. 2023) lets G = H / Hkv query heads share one key head and one value head:
H = Hkv is multi-head attention, Hkv = 1 multi-query attention. Query head h reads key and
value head h // G (HF's repeat_kv order). The shared keys and values are never copied G times
here: the queries are viewed as (B, Hkv, G, T, D) and the keys and values as (B, Hkv, 1, S, D),
and the attention op broadcasts its batch axes, so the G query heads of a group meet the same
keys; its backward sums dk and dv over the broadcast axis G (a key used by G heads gets
the sum of their gradients, which is what the chain rule asks; docs/derivations.md,
"Grouped-query attention").
"""

from __future__ import annotations

import numbers

import numpy as np

from .. import ops
from ..ops._core import constant
from ..tensor import Tensor
from . import functional as F
from .layers import Linear
from .module import Module
from .rotary import RotaryEmbedding, apply_rotary_pos_emb


class GroupedQueryAttention(Module):
    """HF's LlamaAttention, with its parameter names q_proj, k_proj, v_proj, o_proj, and its own RoPE.

    hidden_size C; num_attention_heads H; num_key_value_heads Hkv (H when None; must divide
    H); head_dim D (C / H when None). q_proj: C -> H D, k_proj and v_proj: C -> Hkv D,
    o_proj: H D -> C, all four with a bias when attention_bias (as HF's LlamaAttention; LLaMA
    itself has none). Each Linear is initialised as torch.nn.Linear. attention_dropout:
    dropout on the attention weights in training. rope_theta, max_position_embeddings: those
    of the submodule ``rotary_emb`` (a RotaryEmbedding; HF keeps one per model, outside
    LlamaAttention). The scores are scaled by D^-1/2.

    Its RoPE tables (rotary_emb.inv_freq, .cos_cached, .sin_cached) are non-persistent buffers, left
    out of state_dict as HF leaves its own out: an HF LlamaAttention's state dict loads strictly.
    """

    def __init__(self, hidden_size: int, num_attention_heads: int, num_key_value_heads: int = None,
                 head_dim: int = None, attention_bias: bool = False, attention_dropout: float = 0.0,
                 rope_theta: float = 10000.0, max_position_embeddings: int = 2048, generator=None,
                 dtype=None, device=None):
        super().__init__()
        where = type(self).__name__
        for name, value, optional in (("hidden_size", hidden_size, False),
                                      ("num_attention_heads", num_attention_heads, False),
                                      ("num_key_value_heads", num_key_value_heads, True),
                                      ("head_dim", head_dim, True)):
            if (value is not None or not optional) and (isinstance(value, bool) or not isinstance(
                    value, numbers.Integral) or value < 1):
                raise ValueError(f"{where}: {name} must be a positive int{' or None' if optional else ''}; "
                                 f"got {value!r}")
        H = int(num_attention_heads)
        Hkv = H if num_key_value_heads is None else int(num_key_value_heads)
        if H % Hkv:
            raise ValueError(f"{where}: num_key_value_heads {Hkv} must divide num_attention_heads {H} (each key/value "
                             f"head serves num_attention_heads / num_key_value_heads query heads)")
        if head_dim is None and hidden_size % H:
            raise ValueError(f"{where}: hidden_size {hidden_size} must be divisible by num_attention_heads {H}, "
                             f"or head_dim given")
        D = hidden_size // H if head_dim is None else int(head_dim)
        if not 0.0 <= attention_dropout <= 1.0:
            raise ValueError(f"{where}: attention_dropout must be in [0, 1]; got {attention_dropout}")
        self.hidden_size, self.num_heads, self.num_key_value_heads, self.head_dim = int(hidden_size), H, Hkv, D
        self.num_key_value_groups = H // Hkv                                  # G
        self.scaling = D ** -0.5
        self.attention_dropout = float(attention_dropout)
        kw = dict(bias=attention_bias, generator=generator, dtype=dtype, device=device)
        self.q_proj = Linear(hidden_size, H * D, **kw)
        self.k_proj = Linear(hidden_size, Hkv * D, **kw)
        self.v_proj = Linear(hidden_size, Hkv * D, **kw)
        self.o_proj = Linear(H * D, hidden_size, **kw)
        self.rotary_emb = RotaryEmbedding(D, max_position_embeddings, rope_theta, dtype=dtype, device=device)

    def forward(self, x, attention_mask=None, position_ids=None, past_key_value=None, use_cache: bool = False,
                *, is_causal: bool = True):
        """Self-attention of x over the cached keys and values and its own.

        x: (B, T, C). past_key_value: None, or (k, v) from an earlier call with use_cache=True,
            each (B, Hkv, P, D), rotated (RoPE already applied to k); P = 0 when None.
        attention_mask: None, or broadcastable to (B, H, T, P + T), with axis 1 of size 1 or H:
            bool True = ATTEND (SDPA's and HF's 4-D polarity), or floating, ADDED to the scores
            (HF's additive masks; -inf or a large negative masks; a Tensor that requires grad gets
            its gradient). It combines with the causal mask.
        position_ids: integer (T,) or (B, T), the RoPE positions of x's tokens; None means
            P .. P + T - 1, continuing after the cache.
        is_causal: query i (at cache index P + i) attends keys 0 .. P + i; True by default.
            A query left with no key gets a zero output, never NaN.
        Returns out (B, T, C), or (out, (k, v)) when use_cache, the new cache with k, v of
        shape (B, Hkv, P + T, D): Tensors that keep their graph (run under no_grad, or detach
        them, when generating).
        """
        where = type(self).__name__
        if not isinstance(x, Tensor):
            x = Tensor(x)
        if x.ndim != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"{where}: x must be (B, T, hidden_size) = (B, T, {self.hidden_size}); got shape "
                             f"{tuple(x.shape)}")
        B, T, _ = x.shape
        H, Hkv, G, D = self.num_heads, self.num_key_value_heads, self.num_key_value_groups, self.head_dim
        past_k, past_v = self._past(past_key_value, B, x)
        P = 0 if past_k is None else past_k.shape[2]
        S = P + T

        if position_ids is None:
            position_ids = x.xp.arange(P, S)                                   # (T,)
        cos, sin = self._rope(position_ids, B, T)                              # (T, D) or (B', T, D)
        q = ops.transpose(ops.reshape(self.q_proj(x), (B, T, H, D)), 1, 2)     # (B, H, T, D)
        k = ops.transpose(ops.reshape(self.k_proj(x), (B, T, Hkv, D)), 1, 2)   # (B, Hkv, T, D)
        v = ops.transpose(ops.reshape(self.v_proj(x), (B, T, Hkv, D)), 1, 2)   # (B, Hkv, T, D)
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1 if cos.ndim == 3 else None)
        if past_k is not None:
            k = ops.concatenate([past_k, k], axis=2)                           # (B, Hkv, S, D)
            v = ops.concatenate([past_v, v], axis=2)                           # (B, Hkv, S, D)

        mask, bias, causal = self._masks(attention_mask, is_causal, B, T, S, x)
        q5 = ops.reshape(q, (B, Hkv, G, T, D))                                 # query heads in groups
        k5 = ops.reshape(k, (B, Hkv, 1, S, D))                                 # one key head per group,
        v5 = ops.reshape(v, (B, Hkv, 1, S, D))                                 # broadcast over G
        p = self.attention_dropout if self.training else 0.0
        y = ops.attention(q5, k5, v5, mask, scale=self.scaling, dropout_p=p, causal=causal,
                          bias=bias)                                   # (B, Hkv, G, T, D)
        y = ops.reshape(ops.transpose(ops.reshape(y, (B, H, T, D)), 1, 2), (B, T, H * D))  # heads side by side
        out = self.o_proj(y)                                                   # (B, T, C)
        return (out, (k, v)) if use_cache else out

    # ------------------------------------------------------------------ inputs
    def _past(self, past_key_value, B: int, x: Tensor):
        """The cached (k, v) as Tensors, after checking them; (None, None) when there is none."""
        if past_key_value is None:
            return None, None
        where, Hkv, D = type(self).__name__, self.num_key_value_heads, self.head_dim
        if not isinstance(past_key_value, (tuple, list)) or len(past_key_value) != 2:
            raise ValueError(f"{where}: past_key_value must be a pair (k, v), as returned with use_cache=True; got "
                             f"{type(past_key_value).__name__}")
        pair = tuple(t if isinstance(t, Tensor) else Tensor(constant(where, t, x, "past_key_value is", "x is")) for t in past_key_value)
        expected = f"(B, num_key_value_heads, P, head_dim) = ({B}, {Hkv}, P, {D})"
        for name, t in zip(("k", "v"), pair):
            if t.ndim != 4 or t.shape[0] != B or t.shape[1] != Hkv or t.shape[3] != D:
                raise ValueError(f"{where}: past_key_value {name} has shape {tuple(t.shape)}; expected {expected}")
            if t.dtype != self.k_proj.weight.dtype:
                raise TypeError(f"{where}: past_key_value {name} is {t.dtype} but the module is "
                                f"{self.k_proj.weight.dtype}")
        if pair[0].shape != pair[1].shape:
            raise ValueError(f"{where}: past_key_value k {tuple(pair[0].shape)} and v {tuple(pair[1].shape)} "
                             f"must have the same shape")
        return pair

    def _rope(self, position_ids, B: int, T: int):
        """cos, sin for the positions of x's tokens: (T, D) for (T,) positions, (B', T, D) for (B', T)."""
        shape = tuple(position_ids.shape) if hasattr(position_ids, "shape") else np.shape(position_ids)
        if len(shape) not in (1, 2) or shape[-1] != T or (len(shape) == 2 and shape[0] not in (1, B)):
            raise ValueError(f"{type(self).__name__}: position_ids must have shape (T,) or (B, T) with T = {T}, "
                             f"B = {B}; got {shape}")
        return self.rotary_emb(position_ids)

    def _masks(self, attention_mask, is_causal: bool, B: int, T: int, S: int, like: Tensor):
        """(bool mask, additive bias, causal) for ops.attention in the grouped layout, the mask and the
        bias broadcastable to (B, Hkv, G, T, S), either None. The causal part is the (T, S) lower
        triangle shifted right by the cache length S - T; without a cache and a bool mask it is the
        op's own causal=True (which its fast path runs in blocks)."""
        where, H, Hkv, G = type(self).__name__, self.num_heads, self.num_key_value_heads, self.num_key_value_groups
        xp = like.xp
        m = F.mask_tensor(attention_mask, like)
        op_causal = is_causal and S == T and (m is None or m.dtype != np.bool_)
        causal = xp.tri(T, S, k=S - T, dtype=bool) if is_causal and not op_causal else None  # (T, S), True = attend
        if m is None:
            return causal, None, op_causal
        full = (B, H, T, S)
        try:
            fits = m.ndim <= 4 and np.broadcast_shapes(tuple(m.shape), full) == full
        except ValueError:
            fits = False
        F.check_mask(where, "attention_mask", m, fits, f"a shape broadcastable to (B, num_attention_heads, T, S) "
                     f"= {full}, S = past length + T")
        b, h, t, s = (1,) * (4 - m.ndim) + tuple(m.shape)
        grouped = (b, Hkv, G, t, s) if h == H else (b, 1, 1, t, s)           # head h = group h // G, member h % G
        if m.dtype == np.bool_:
            allowed = m.data.reshape(grouped)
            return (allowed if causal is None else allowed & causal), None, False
        return causal, ops.reshape(m, grouped), op_causal

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_attention_heads={self.num_heads}, "
                f"num_key_value_heads={self.num_key_value_heads}, head_dim={self.head_dim}, "
                f"attention_dropout={self.attention_dropout}")
