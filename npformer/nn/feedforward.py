"""The gated feed-forward of today's LLMs: down_proj(act(gate_proj(x)) * up_proj(x)).

Shazeer's GLU variants (2020): the first linear layer of the Transformer's feed-forward becomes
two, and one of them, through the activation, gates the other elementwise. With SiLU it is
SwiGLU, LLaMA's MLP (transformers' LlamaMLP, whose parameter names it keeps: gate_proj, up_proj,
down_proj, no biases); with GELU it is GEGLU, T5 v1.1's gated-gelu feed-forward (which uses the
tanh form, "gelu_tanh" here).
"""

from __future__ import annotations

from . import functional as F
from .layers import Linear
from .module import Module

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class GatedFeedForward(Module):
    """y = down_proj(act(gate_proj(x)) * up_proj(x)).  x: (..., hidden_size) -> (..., hidden_size).

    gate_proj, up_proj: Linear(hidden_size, intermediate_size); down_proj: Linear(intermediate_size,
    hidden_size), each with torch.nn.Linear's initialisation and a bias only when bias=True.
    activation: "silu" (SwiGLU, LLaMA), "gelu" (exact GEGLU) or "gelu_tanh" (GEGLU with GELU's
    tanh form, T5 v1.1). generator, dtype, device: as nn.Linear's.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "silu", bias: bool = False,
                 generator=None, dtype=None, device=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"GatedFeedForward: activation must be one of {', '.join(map(repr, ACTIVATIONS))}; "
                             f"got {activation!r}")
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.activation = activation
        kw = dict(bias=bias, generator=generator, dtype=dtype, device=device)
        self.gate_proj = Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = Linear(intermediate_size, hidden_size, **kw)

    def forward(self, x):
        if not x.shape or x.shape[-1] != self.hidden_size:
            raise ValueError(f"GatedFeedForward: input of shape {tuple(x.shape)} must end with hidden_size "
                             f"{self.hidden_size}")
        gate = ACTIVATIONS[self.activation](self.gate_proj(x))   # (..., intermediate_size)
        return self.down_proj(gate * self.up_proj(x))              # (..., hidden_size)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"activation={self.activation!r}")
