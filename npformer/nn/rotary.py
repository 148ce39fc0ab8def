"""Rotary position embedding (RoPE, Su et al. 2021) in Hugging Face LLaMA's layout.

RoPE encodes position m by rotating query and key features in pairs, by an angle that
grows with m, so that q_m . k_n depends on the positions only through m - n. With
head_dim d and theta_i = rope_theta^(-2i / d), i = 0 .. d/2 - 1, LLaMA pairs feature i
with feature i + d/2 (the two halves of the head, not neighbours as in the paper):

    x'_i       = x_i cos(m theta_i) - x_{i+d/2} sin(m theta_i)
    x'_{i+d/2} = x_{i+d/2} cos(m theta_i) + x_i sin(m theta_i)

that is x' = x * cos + rotate_half(x) * sin, with cos and sin the (d,) rows
[cos(m theta), cos(m theta)] and [sin(m theta), sin(m theta)], and
rotate_half(x) = [-x_{d/2:}, x_{:d/2}]. Composed from mul, add, split, neg and
concatenate, so its gradient is theirs: the inverse rotation, x * cos - rotate_half(x) * sin
for the cotangent (docs/derivations.md, "Rotary position embedding").
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from .. import backend, ops
from ..dtypes import resolve
from ..tensor import Tensor
from .module import Module


def rotate_half(x):
    """[-x2, x1] for x = [x1, x2] split into halves along the last axis.  x: (..., d), d even."""
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"rotate_half: the last axis of x {tuple(x.shape)} must be even, to split it into halves")
    x1, x2 = ops.split(x, d // 2, axis=-1)                                    # 2 x (..., d/2)
    return ops.concatenate([ops.neg(x2), x1], axis=-1)                         # (..., d)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin), HF LLaMA's function.

    q: (B, H, T, d); k: (B, Hkv, T, d) (any batch axes that broadcast with cos and sin).
    cos, sin: (B, T, d) from RotaryEmbedding on (B, T) positions, with a head axis inserted
    at `unsqueeze_dim` (1, as HF, for the (B, H, T, d) layout; 2 for (B, T, H, d)); or,
    with unsqueeze_dim=None, any shape that broadcasts as it is, such as the (T, d) that
    RotaryEmbedding gives for (T,) positions. cos and sin must have q's and k's dtype:
    nothing is cast here. Their gradients (when they require grad) are the chain rule's.
    """
    where = "apply_rotary_pos_emb"
    q, k, cos, sin = (t if isinstance(t, Tensor) else Tensor(t) for t in (q, k, cos, sin))
    if tuple(cos.shape) != tuple(sin.shape):
        raise ValueError(f"{where}: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape")
    for name, t in (("q", q), ("k", k)):
        if t.ndim < 2 or t.shape[-1] != cos.shape[-1] or t.shape[-1] % 2:
            raise ValueError(f"{where}: {name} of shape {tuple(t.shape)} must end with cos's last axis "
                             f"{cos.shape[-1]} (head_dim, even)")
        if t.dtype != cos.dtype or t.dtype != sin.dtype:
            raise TypeError(f"{where}: {name} is {t.dtype} but cos, sin are {cos.dtype}, {sin.dtype}; compute them "
                            f"in {name}'s dtype (RotaryEmbedding(dtype=...)), nothing is cast here")
    if unsqueeze_dim is not None:
        if cos.ndim < 3:
            raise ValueError(f"{where}: unsqueeze_dim={unsqueeze_dim} inserts a head axis into cos and sin of "
                             f"shape (B, T, head_dim); cos has shape {tuple(cos.shape)}, which broadcasts as it "
                             f"is: pass unsqueeze_dim=None")
        axis = unsqueeze_dim % (cos.ndim + 1)
        cos, sin = (ops.reshape(t, t.shape[:axis] + (1,) + t.shape[axis:]) for t in (cos, sin))
    for name, t in (("q", q), ("k", k)):
        try:
            np.broadcast_shapes(tuple(t.shape), tuple(cos.shape))
        except ValueError:
            raise ValueError(f"{where}: cos and sin of shape {tuple(cos.shape)} (after unsqueeze_dim="
                             f"{unsqueeze_dim}) do not broadcast with {name} {tuple(t.shape)}") from None
    q_embed = q * cos + rotate_half(q) * sin
    k_embed = k * cos + rotate_half(k) * sin
    return q_embed, k_embed


def inverse_frequencies(head_dim: int, rope_theta: float, xp=np):
    """theta_i = 1 / rope_theta^(2i / head_dim), i = 0 .. head_dim/2 - 1, float64 (head_dim/2,)."""
    return 1.0 / rope_theta ** (xp.arange(0, head_dim, 2, dtype=xp.float64) / head_dim)


def rope_cos_sin(positions, head_dim: int, rope_theta: float, dtype, xp=np):
    """cos, sin (*positions.shape, head_dim) of the angles m theta_i, computed in float64 then cast."""
    angle = positions.astype(xp.float64)[..., None] * inverse_frequencies(head_dim, rope_theta, xp)  # (..., d/2)
    emb = xp.concatenate([angle, angle], axis=-1)                              # (..., d)
    return xp.cos(emb).astype(dtype), xp.sin(emb).astype(dtype)


def _positive_int(where: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{where}: {name} must be a positive int; got {value!r}")
    return int(value)


class RotaryEmbedding(Module):
    """The cos and sin tables of RoPE at given positions: HF's LlamaRotaryEmbedding (default rope type).

    head_dim: d, even. rope_theta: the base (10000 in LLaMA 1/2, 500000 in LLaMA 3).
    max_position_embeddings: rows of the cached tables. Buffers: ``inv_freq`` (d/2,) =
    1 / rope_theta^(arange(0, d, 2) / d), and ``cos_cached``, ``sin_cached``
    (max_position_embeddings, d), all in the module's dtype (npformer's default dtype when
    None). Being formulas, ``.to(dtype=...)`` recomputes them in the new dtype.

    Precision, and how this differs from HF: every value here is computed in float64 and then
    cast, so a float32 table is correctly rounded (within 3.0e-8 of the exact cos and sin).
    HF computes inv_freq, the angles m theta_i and their cos, sin in float32 (whatever the
    model's dtype) and casts the result, so its error grows with the angle: measured against
    float64 (transformers 5.25, head_dim 128), at most 6.7e-6 over positions 0..127, 1.2e-4 over
    0..2047 with rope_theta 10000, and 5.8e-4 over 0..8191 with rope_theta 500000; our float32
    tables differ from HF's by the same amounts. A float64 model here therefore matches HF's
    LlamaAttention to 1e-10 only when both are given the same cos and sin.

    forward(positions): positions, integer (T,) or (B, T) (a Tensor, array or list), >= 0.
    Returns cos, sin, each (T, d) or (B, T, d), constant Tensors in the module's dtype.
    Positions at or past max_position_embeddings are not an error: their rows are computed from
    the same formula on the fly (as HF does for every position); the cached tables are never
    changed by forward.
    """

    def __init__(self, head_dim: int, max_position_embeddings: int = 2048, rope_theta: float = 10000.0,
                 dtype=None, device=None):
        super().__init__()
        where = type(self).__name__
        head_dim = _positive_int(where, "head_dim", head_dim)
        if head_dim % 2:
            raise ValueError(f"{where}: head_dim must be even (RoPE rotates features in pairs); got {head_dim}")
        max_len = _positive_int(where, "max_position_embeddings", max_position_embeddings)
        if not (isinstance(rope_theta, numbers.Real) and math.isfinite(rope_theta) and rope_theta > 0):
            raise ValueError(f"{where}: rope_theta must be a positive finite number; got {rope_theta!r}")
        self.head_dim, self.max_position_embeddings, self.rope_theta = head_dim, max_len, float(rope_theta)
        xp = backend.xp_for(backend.check_device(device) if device else backend.default_device())
        dt, theta = resolve(dtype), self.rope_theta
        # formulas, not data: .to(dtype) and .double() recompute them in the new dtype
        inv = lambda d: inverse_frequencies(head_dim, theta).astype(d)                # noqa: E731
        cos = lambda d: rope_cos_sin(np.arange(max_len), head_dim, theta, d)[0]       # noqa: E731
        sin = lambda d: rope_cos_sin(np.arange(max_len), head_dim, theta, d)[1]       # noqa: E731
        for name, table in (("inv_freq", inv), ("cos_cached", cos), ("sin_cached", sin)):
            self.register_buffer(name, xp.asarray(table(dt)), formula=table, persistent=False)

    def forward(self, positions):
        where = type(self).__name__
        xp = backend.get_array_module(self.cos_cached)
        pos = positions.data if isinstance(positions, Tensor) else positions
        if not backend.is_array(pos):
            pos = xp.asarray(pos)
        if backend.device_of(pos) != backend.device_of(self.cos_cached):
            raise backend.DeviceMismatchError(f"{where}: positions are on {backend.device_of(pos)} but the tables "
                                              f"are on {backend.device_of(self.cos_cached)}")
        if pos.dtype.kind not in "iu" or pos.ndim not in (1, 2):
            raise ValueError(f"{where}: positions must be integers of shape (T,) or (B, T); got dtype {pos.dtype}, "
                             f"shape {tuple(pos.shape)}")
        if pos.size and int(pos.min()) < 0:
            raise ValueError(f"{where}: positions must be >= 0; got {int(pos.min())}")
        if pos.size == 0 or int(pos.max()) < self.max_position_embeddings:
            cos, sin = self.cos_cached[pos], self.sin_cached[pos]              # (..., T, d)
        else:                                                                  # past the tables: the formula
            cos, sin = rope_cos_sin(pos, self.head_dim, self.rope_theta, self.cos_cached.dtype, xp)
        return Tensor(cos), Tensor(sin)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, max_position_embeddings={self.max_position_embeddings}, "
                f"rope_theta={self.rope_theta:g}")
