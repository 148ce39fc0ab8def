"""Interop with PyTorch and HF transformers: twins of torch modules with their weights copied.

    twin = from_torch(torch_module)      # npformer module computing what torch_module computes
    back = to_torch(twin)                # and back; weights survive the round trip bit for bit

torch and transformers are imported only when these functions run.
"""

from .torch_interop import SUPPORTED, from_torch, to_torch

__all__ = ["from_torch", "to_torch", "SUPPORTED"]
