"""Position as an additive bias on the attention scores: ALiBi's distance penalties and T5's learned
relative position buckets.

Both are added to the scores before the softmax, with the attention op's `bias` argument:

    out = softmax(q k^T * scale + bias) v,      bias: (H, L, S) or (1, H, L, S)

ALiBi (Press et al. 2022, "Train Short, Test Long") has no parameters: head h penalises query i
attending key j by m_h (i - j), with the slopes m_h a geometric sequence. Use it with the usual
scale 1/sqrt(d_head) (BLOOM does).

T5 (Raffel et al. 2020, section 2.1) learns one scalar per (bucket, head), where the bucket of the
relative position j - i is exact for small distances and log-spaced up to max_distance. T5 does NOT
scale the scores: pass scale=1.0 to the attention op (T5's initialisation folds 1/sqrt(d) into W_q).

Both are composed of existing ops, so the gradient of the learned table is theirs: the scores'
gradient dS, summed over the batch axes the bias was broadcast along, scattered into the table's rows
by bucket (the embedding op's backward): docs/derivations.md, "Attention" (dbias = dS) and "Embedding".
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from .. import backend, ops
from ..dtypes import resolve
from ..tensor import Tensor
from .layers import Embedding
from .module import Module


def _int_at_least(where: str, name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{where}: {name} must be an int >= {low}; got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------- ALiBi

def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi's slopes m_h, float64 (num_heads,).

    For n = num_heads a power of two: m_h = 2^(-8 h / n), h = 1 .. n (8 heads: 1/2, 1/4, .., 1/256).
    Otherwise, with n the largest power of two below num_heads, the n slopes of n heads followed by
    the first num_heads - n of the odd powers 2^(-8 h / (2n)), h = 1, 3, 5, ..: the slopes of 2n heads
    that fall between those of n (the ALiBi paper's code, and BLOOM's _get_alibi_slopes, which computes
    them in float32).
    """
    H = _int_at_least("alibi_slopes", "num_heads", num_heads, 1)
    n = 1 << (H.bit_length() - 1)                                               # largest power of two <= H
    slopes = 2.0 ** (-8.0 * np.arange(1, n + 1) / n)                            # (n,)
    extra = 2.0 ** (-8.0 * np.arange(1, 2 * (H - n), 2) / (2 * n))             # (H - n,)
    return np.concatenate([slopes, extra])


def alibi_bias(num_heads: int, query_length: int, key_length: int, dtype, causal: bool = True, device=None,
               offset: int = 0) -> Tensor:
    """ALiBi's additive bias, a constant Tensor (num_heads, L, S) (no parameters, no gradient).

    Query i sits at position offset + i (offset: the number of earlier tokens, in cached decoding),
    key j at position j; with slopes m_h = alibi_slopes(num_heads):

        causal=True:   bias[h, i, j] = -m_h (offset + i - j)     for every j
        causal=False:  bias[h, i, j] = -m_h |offset + i - j|     (the symmetric form of encoders)

    causal=True is the paper's: under a causal mask only keys j <= offset + i are seen, each penalised
    by m_h times its distance. It is linear in j on every row, so keys past the query get a positive
    value; the causal mask must remove them (the attention op's causal=True when offset is 0, else
    the bool mask j <= offset + i). BLOOM adds instead m_h j, the key position alone: that
    differs from this by -m_h (offset + i), a constant on each row, which the softmax ignores
    (softmax(s + c) = softmax(s)); so the two give the same attention, and here `offset` changes the
    values but not the attention.

    Computed in float64 on the host, then cast to `dtype` (npformer's default when None) on `device`.
    """
    where = "alibi_bias"
    H = _int_at_least(where, "num_heads", num_heads, 1)
    L = _int_at_least(where, "query_length", query_length, 0)
    S = _int_at_least(where, "key_length", key_length, 0)
    offset = _int_at_least(where, "offset", offset, 0)
    xp = backend.xp_for(backend.check_device(device) if device else backend.default_device())
    j_minus_i = np.arange(S)[None, :] - (offset + np.arange(L)[:, None])          # (L, S)
    minus_distance = j_minus_i if causal else -np.abs(j_minus_i)                  # (L, S)
    bias = alibi_slopes(H)[:, None, None] * minus_distance                        # (H, L, S) float64
    return Tensor(xp.asarray(bias.astype(resolve(dtype))))


# ----------------------------------------------------------------------------- T5

def _max_exact(where: str, num_buckets, max_distance, bidirectional: bool) -> tuple[int, int]:
    """(num_buckets, max_distance) as ints after checking them: each direction needs >= 2 buckets, and
    max_distance must lie beyond the exact buckets (else the log spacing divides by log(1) = 0)."""
    low = 4 if bidirectional else 2
    num_buckets = _int_at_least(where, "num_buckets", num_buckets, low)
    max_exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
    if isinstance(max_distance, bool) or not isinstance(max_distance, numbers.Integral) or max_distance <= max_exact:
        raise ValueError(f"{where}: max_distance must be an int > {max_exact} (the exact buckets, num_buckets "
                         f"{num_buckets} {'// 2 ' if bidirectional else ''}// 2); got {max_distance!r}")
    return num_buckets, int(max_distance)


def relative_position_bucket(relative_position, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 128):
    """T5's bucket of each relative position j - i (key minus query), an int64 array of the input's shape.

    relative_position: an integer array (NumPy or CuPy) or nested list. bidirectional=True (T5's
    encoder): half the buckets for keys before the query (j - i <= 0), half, offset by
    num_buckets // 2, for keys after it; False (the decoder): only keys before the query count,
    later ones share bucket 0. In each direction, with nb buckets and distance n = |j - i|:

        bucket = n                                                  for n < nb // 2 (exact)
        bucket = min(nb - 1, nb//2 + floor(log(n / (nb//2)) / log(max_distance / (nb//2)) * (nb - nb//2)))

    log-spaced up to max_distance, and every n >= max_distance in the last bucket. With
    bidirectional=True, bucket num_buckets // 2 ("after the query, at distance 0") never occurs, and
    an odd num_buckets leaves the last bucket unused too (nb = num_buckets // 2 per direction), as T5.

    The log term is computed in float32, as Mesh TensorFlow's T5 and transformers' T5Attention do, so
    that pretrained tables are indexed alike. Where the exact value is an integer (n = 16 with 8 exact
    buckets of 16 and max_distance 128) the bucket depends on the last bit of a float32 log: NumPy's
    rounds correctly, torch's may be one ulp off. Measured against transformers 5.25 (num_buckets
    2..69, max_distance 1..39 and 64..512, distances to 3000): equal in 4125 of 4128 settings, T5's
    (32, 128) among them; num_buckets 17, 34 and 35 with max_distance 27 differ at distances 12 and
    18. Computed in float64 instead, 12 settings would differ, (18, 128) among them.
    """
    where = "relative_position_bucket"
    num_buckets, max_distance = _max_exact(where, num_buckets, max_distance, bidirectional)
    rp = relative_position if backend.is_array(relative_position) else np.asarray(relative_position)
    if rp.dtype.kind not in "iu":
        raise TypeError(f"{where}: relative_position must be integers; got dtype {rp.dtype}")
    xp = backend.get_array_module(rp)
    rp = rp.astype(xp.int64)
    if bidirectional:
        num_buckets //= 2
        bucket = (rp > 0).astype(xp.int64) * num_buckets                          # keys after the query
        n = xp.abs(rp)
    else:
        bucket = xp.zeros(rp.shape, dtype=xp.int64)
        n = -xp.minimum(rp, 0)                                                    # keys after: distance 0
    max_exact = num_buckets // 2
    ratio = xp.maximum(n, max_exact).astype(xp.float32) / xp.float32(max_exact)   # >= 1: no log(0)
    spread = xp.log(ratio) / xp.float32(math.log(max_distance / max_exact)) * xp.float32(num_buckets - max_exact)
    large = xp.minimum(max_exact + spread.astype(xp.int64), num_buckets - 1)      # truncation = floor, >= 0
    return bucket + xp.where(n < max_exact, n, large)


class RelativePositionBias(Module):
    """T5's learned relative position bias: one scalar per (bucket, head), added to the scores.

    relative_attention_bias: an Embedding (num_buckets, num_heads), T5's parameter name, so state
    dicts move over as ``...relative_attention_bias.weight``; drawn from N(0, 1) as nn.Embedding's.
    bidirectional: True for T5's encoder, False for its decoder (T5: ``not config.is_decoder``).
    num_buckets, max_distance: see relative_position_bucket. num_heads is keyword-only.

    forward(query_length, key_length, offset=0) -> bias (1, num_heads, L, S), a Tensor with
    bias[0, h, i, j] = weight[bucket(j - (offset + i)), h]: query i sits at position offset + i
    (offset: the number of cached tokens before it; T5's compute_bias with past_seen_tokens). Its
    gradient reaches the table: dweight[b, h] = sum of dbias[0, h, i, j] over the (i, j) in bucket b.

    Use it with scale=1.0, as T5 does not scale the scores:
        attention(q, k, v, bias=rpb(L, S), scale=1.0)              # q: (B, H, L, d), k, v: (B, H, S, d)
    T5 computes the bias in its first layer only and reuses that in every layer of the stack.
    """

    def __init__(self, num_buckets: int = 32, max_distance: int = 128, *, num_heads: int, bidirectional: bool = True,
                 generator=None, dtype=None, device=None):
        super().__init__()
        where = type(self).__name__
        num_buckets, max_distance = _max_exact(where, num_buckets, max_distance, bidirectional)
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bool(bidirectional)
        self.num_heads = _int_at_least(where, "num_heads", num_heads, 1)
        self.relative_attention_bias = Embedding(num_buckets, self.num_heads, generator=generator, dtype=dtype,
                                                 device=device)

    def buckets(self, query_length: int, key_length: int, offset: int = 0):
        """The (L, S) int64 bucket of every (query i, key j), on the table's device."""
        where = type(self).__name__
        L = _int_at_least(where, "query_length", query_length, 0)
        S = _int_at_least(where, "key_length", key_length, 0)
        offset = _int_at_least(where, "offset", offset, 0)
        xp = self.relative_attention_bias.weight.xp
        relative = xp.arange(S)[None, :] - (offset + xp.arange(L)[:, None])       # (L, S): key - query
        return relative_position_bucket(relative, self.bidirectional, self.num_buckets, self.max_distance)

    def forward(self, query_length: int, key_length: int, offset: int = 0):
        idx = self.buckets(query_length, key_length, offset)                      # (L, S)
        values = self.relative_attention_bias(idx)                                # (L, S, H)
        return ops.reshape(ops.permute(values, (2, 0, 1)), (1, self.num_heads) + tuple(idx.shape))  # (1, H, L, S)

    def extra_repr(self) -> str:
        return (f"num_buckets={self.num_buckets}, max_distance={self.max_distance}, num_heads={self.num_heads}, "
                f"bidirectional={self.bidirectional}")
