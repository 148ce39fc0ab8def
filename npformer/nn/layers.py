"""Basic layers with torch.nn's names, arguments and parameter names: Linear, Embedding,
LayerNorm, RMSNorm, Dropout, activations, and the containers ModuleList and Sequential.

Layers with weights take ``dtype`` (npformer.get_default_dtype() when None: float32 unless
changed, as torch), ``device``
(NPFORMER_DEVICE when None) and ``generator`` for their initialisation.
"""

from __future__ import annotations

from .. import backend, ops
from ..dtypes import resolve
from ..tensor import Tensor
from . import functional as F
from . import init
from .module import Module, Parameter


def empty_parameter(shape, dtype=None, device=None) -> Parameter:
    """An uninitialised Parameter of `shape` on `device` (the default device when None), of `dtype`
    (npformer.get_default_dtype() when None)."""
    xp = backend.xp_for(backend.check_device(device) if device else backend.default_device())
    return Parameter(xp.empty(tuple(shape), dtype=resolve(dtype)))


class Linear(Module):
    """y = x @ weight^T + bias.  x: (..., in_features) -> (..., out_features).

    weight: (out_features, in_features), bias: (out_features,), both drawn from
    U(-1/sqrt(in_features), 1/sqrt(in_features)) as torch.nn.Linear.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, generator=None,
                 dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = empty_parameter((out_features, in_features), dtype, device)
        self.register_parameter("bias", empty_parameter((out_features,), dtype, device) if bias else None)
        init.linear_default_(self.weight, self.bias, generator=generator)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    """A lookup table: integer indices (any shape) -> rows of weight (num_embeddings, embedding_dim).

    weight is drawn from N(0, 1), as torch.nn.Embedding. padding_idx (as torch): that row starts
    at zero and never gets a gradient (its lookups are constants); negative counts from the end.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int = None, generator=None,
                 dtype=None, device=None):
        super().__init__()
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"Embedding: padding_idx must be in [-{num_embeddings}, {num_embeddings}); "
                                 f"got {padding_idx}")
            padding_idx %= num_embeddings
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.weight = empty_parameter((num_embeddings, embedding_dim), dtype, device)
        init.normal_(self.weight, generator=generator)
        if padding_idx is not None:
            self.weight.data[padding_idx] = 0

    def forward(self, indices):
        out = F.embedding(indices, self.weight)                            # (*indices.shape, D)
        if self.padding_idx is None:
            return out
        # the padding row's lookups read a constant copy of it, so no gradient reaches that row
        idx = indices.data if isinstance(indices, Tensor) else indices
        pad = F.mask_array(idx, self.weight) == self.padding_idx             # indices.shape
        return ops.where(pad[..., None], Tensor(self.weight.data[self.padding_idx]), out)

    def extra_repr(self) -> str:
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return f"{self.num_embeddings}, {self.embedding_dim}{pad}"


class LayerNorm(Module):
    """Normalise over the trailing `normalized_shape` axes: (x - mean) / sqrt(var + eps) * weight + bias.

    weight (ones) and bias (zeros) have shape normalized_shape; elementwise_affine=False
    drops both, bias=False drops the bias.
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 dtype=None, device=None):
        super().__init__()
        self.normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = init.ones_(empty_parameter(self.normalized_shape, dtype, device))
            self.register_parameter("bias", init.zeros_(empty_parameter(self.normalized_shape, dtype, device))
                                    if bias else None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class RMSNorm(Module):
    """Divide by the root mean square over the trailing `normalized_shape` axes: x / sqrt(mean(x^2) + eps) * weight.

    weight (ones) has shape normalized_shape; elementwise_affine=False drops it. eps=None uses
    the input dtype's machine epsilon, as torch.nn.RMSNorm.
    """

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True, dtype=None,
                 device=None):
        super().__init__()
        self.normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = init.ones_(empty_parameter(self.normalized_shape, dtype, device))
        else:
            self.register_parameter("weight", None)

    def forward(self, x):
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class Dropout(Module):
    """Zero each element with probability p and scale the rest by 1/(1-p) in training; identity in eval.

    generator: the random generator for the masks (the device's global one when None).
    """

    def __init__(self, p: float = 0.5, generator=None):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1]; got {p}")
        self.p = p
        self.generator = generator

    def forward(self, x):
        return F.dropout(x, self.p, self.training, self.generator)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ReLU(Module):
    def forward(self, x):
        return F.relu(x)


class SiLU(Module):
    """x * sigmoid(x) (swish)."""

    def forward(self, x):
        return F.silu(x)


class GELU(Module):
    """GELU; approximate="none" (exact, erf) or "tanh"."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU: approximate must be 'none' or 'tanh'; got {approximate!r}")
        self.approximate = approximate

    def forward(self, x):
        return F.gelu(x, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class Tanh(Module):
    def forward(self, x):
        return F.tanh(x)


class Identity(Module):
    """Returns its input; accepts and ignores any constructor arguments (as torch)."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def forward(self, x):
        return x


class ModuleList(Module):
    """A list of modules registered under the names "0", "1", ... (state_dict: "0.weight", ...)."""

    def __init__(self, modules=None):
        super().__init__()
        for m in modules or ():
            self.append(m)

    def append(self, module: Module) -> "ModuleList":
        if not isinstance(module, Module):
            raise TypeError(f"{type(self).__name__}: entries must be Modules; got {type(module).__name__}")
        setattr(self, str(len(self._modules)), module)
        return self

    def extend(self, modules) -> "ModuleList":
        for m in modules:
            self.append(m)
        return self

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, idx):
        items = list(self._modules.values())
        if isinstance(idx, slice):
            return type(self)(items[idx])
        if not -len(items) <= idx < len(items):
            raise IndexError(f"{type(self).__name__}: index {idx} is out of range for {len(items)} modules")
        return items[idx]


class Sequential(ModuleList):
    """Modules applied in order: Sequential(a, b)(x) == b(a(x))."""

    def __init__(self, *modules):
        super().__init__(modules)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return Sequential(*list(self._modules.values())[idx])
        return super().__getitem__(idx)

    def forward(self, x):
        for m in self:
            x = m(x)
        return x
