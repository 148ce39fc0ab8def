"""Position information added to token embeddings: the paper's fixed sinusoids, or a learned table.

Sinusoidal (section 3.5 of "Attention Is All You Need"), for position pos and i = 0, 1, ...:
    PE(pos, 2i)   = sin(pos / 10000^(2i / d_model))
    PE(pos, 2i+1) = cos(pos / 10000^(2i / d_model))
"""

from __future__ import annotations

import numpy as np

from .. import backend, ops
from ..dtypes import resolve
from . import init
from .layers import Dropout, empty_parameter
from .module import Module


def sinusoidal_table(max_len: int, d_model: int, dtype=np.float64) -> np.ndarray:
    """The (max_len, d_model) table PE above, computed in float64 on the host, then cast."""
    pos = np.arange(max_len, dtype=np.float64)[:, None]                       # (max_len, 1)
    two_i = np.arange(0, d_model, 2, dtype=np.float64)                        # (ceil(d/2),)
    angle = pos / 10000.0 ** (two_i / d_model)                                # (max_len, ceil(d/2))
    pe = np.zeros((max_len, d_model), dtype=np.float64)
    pe[:, 0::2] = np.sin(angle)
    pe[:, 1::2] = np.cos(angle[:, : d_model // 2])                            # odd d_model: one fewer cos
    return pe.astype(dtype)


def _positions(module, x, start: int) -> int:
    """T, the sequence length of x, after checking that positions start..start+T fit max_len and
    that x ends with d_model."""
    name = type(module).__name__
    T = x.shape[1] if module.batch_first else x.shape[0]
    if start < 0 or start + T > module.max_len:
        raise ValueError(f"{name}: sequence length {T} (starting at position {start}) exceeds max_len "
                         f"{module.max_len}")
    if x.shape[-1] != module.d_model:
        raise ValueError(f"{name}: input of shape {tuple(x.shape)} must end with d_model {module.d_model}")
    return T


class SinusoidalPositionalEncoding(Module):
    """x + PE[start:start+T], then dropout. PE is the buffer ``pe`` (max_len, d_model).

    x: (B, T, d_model) with batch_first (our default), else (T, B, d_model).
    start: position of the first element (for decoding one token at a time).
    """

    def __init__(self, d_model: int, max_len: int = 5000, dropout: float = 0.0, batch_first: bool = True,
                 dtype=None, device=None):
        super().__init__()
        self.d_model, self.max_len, self.batch_first = d_model, max_len, batch_first
        xp = backend.xp_for(device or backend.default_device())
        # a formula, not data: .to(dtype) and .double() recompute it in the new dtype
        table = lambda dt: sinusoidal_table(max_len, d_model, dt)             # noqa: E731
        self.register_buffer("pe", xp.asarray(table(resolve(dtype))), formula=table)
        self.dropout = Dropout(dropout)

    def forward(self, x, start: int = 0):
        T = _positions(self, x, start)
        pe = self.pe[start:start + T]                                         # (T, D)
        return self.dropout(x + (pe if self.batch_first else pe[:, None, :]))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, max_len={self.max_len}"


class LearnedPositionalEmbedding(Module):
    """x + weight[start:start+T], then dropout; weight (max_len, d_model) is learned, drawn from N(0, 1)
    like nn.Embedding's.

    x: (B, T, d_model) with batch_first (our default), else (T, B, d_model).
    """

    def __init__(self, max_len: int, d_model: int, dropout: float = 0.0, batch_first: bool = True,
                 generator=None, dtype=None, device=None):
        super().__init__()
        self.max_len, self.d_model, self.batch_first = max_len, d_model, batch_first
        self.weight = init.normal_(empty_parameter((max_len, d_model), dtype, device), generator=generator)
        self.dropout = Dropout(dropout)

    def forward(self, x, start: int = 0):
        T = _positions(self, x, start)
        pe = ops.getitem(self.weight, slice(start, start + T))                # (T, D)
        return self.dropout(x + (pe if self.batch_first else ops.reshape(pe, (T, 1, self.d_model))))

    def extra_repr(self) -> str:
        return f"max_len={self.max_len}, d_model={self.d_model}"
