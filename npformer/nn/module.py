"""``Module`` and ``Parameter``: a minimal, deterministic module system.

Assigning a Parameter or a Module to an attribute registers it, in insertion
order; that order is the order of ``parameters()`` and ``state_dict()``. There
are no hooks. Names follow torch (``layers.0.attn.in_proj_weight``) so that
state dicts map one-to-one onto PyTorch's.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .. import backend
from ..tensor import Tensor


class Parameter(Tensor):
    """A Tensor that is a module's learnable weight (requires_grad=True by default)."""

    __slots__ = ()

    def __init__(self, data, requires_grad: bool = True):
        if isinstance(data, Tensor):
            data = data.data
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self) -> str:
        return "Parameter containing:\n" + super().__repr__()


class Module:
    """Base class of every layer and model.

    Subclasses create parameters and submodules in ``__init__`` (after calling
    ``super().__init__()``) and define ``forward``; calling the module calls
    ``forward``.
    """

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_buffer_formulas", {})
        object.__setattr__(self, "_non_persistent", set())
        object.__setattr__(self, "training", True)

    # ------------------------------------------------------------------ registration
    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__}: call super().__init__() before assigning attributes")
        for store in (self._parameters, self._modules, self._buffers):
            store.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        else:
            object.__setattr__(self, name, value)
            return
        self.__dict__.pop(name, None)

    def __getattr__(self, name):
        d = self.__dict__
        for store in ("_parameters", "_modules", "_buffers"):
            if store in d and name in d[store]:
                return d[store][name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __delattr__(self, name):
        for store in (self._parameters, self._modules, self._buffers):
            if name in store:
                del store[name]
                return
        object.__delattr__(self, name)

    def register_buffer(self, name: str, array, formula=None, persistent: bool = True) -> None:
        """A non-learnable array, saved in state_dict unless persistent=False; may be None.

        formula: for a buffer computed from a formula (a positional-encoding table), the function
        ``formula(dtype) -> host array`` that computes it; ``to(dtype=...)`` then recomputes the
        buffer in the new dtype instead of casting the old values (a float32 table cast to float64
        keeps its float32 rounding).
        persistent=False: left out of state_dict (and so of checkpoints and load_state_dict), as
        torch's; for tables the module rebuilds itself, such as RoPE's cos/sin.
        """
        self.__dict__.pop(name, None)
        self._buffers[name] = array
        self._buffer_formulas.pop(name, None)
        if formula is not None:
            self._buffer_formulas[name] = formula
        (self._non_persistent.discard if persistent else self._non_persistent.add)(name)

    def register_parameter(self, name: str, param) -> None:
        """Register a Parameter (or None, for an absent optional weight such as a disabled bias)."""
        if param is None:
            self.__dict__.pop(name, None)
            self._parameters[name] = None
        else:
            setattr(self, name, param)

    # ------------------------------------------------------------------ calling
    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__}.forward is not defined")

    # ------------------------------------------------------------------ traversal
    def named_modules(self, prefix: str = ""):
        """(name, module) for this module and every submodule, depth first in insertion order."""
        yield prefix, self
        for name, m in self._modules.items():
            if m is not None:
                yield from m.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self):
        for _, m in self.named_modules():
            yield m

    def children(self):
        return (m for m in self._modules.values() if m is not None)

    def named_parameters(self, prefix: str = ""):
        """(dotted name, Parameter) for every parameter, each shared parameter once."""
        seen = set()
        for mod_name, m in self.named_modules(prefix):
            for name, p in m._parameters.items():
                if p is None or id(p) in seen:
                    continue
                seen.add(id(p))
                yield (f"{mod_name}.{name}" if mod_name else name), p

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def named_buffers(self):
        for mod_name, m in self.named_modules():
            for name, b in m._buffers.items():
                if b is not None:
                    yield (f"{mod_name}.{name}" if mod_name else name), b

    # ------------------------------------------------------------------ modes, devices, grads
    def train(self, mode: bool = True) -> "Module":
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def to(self, device: str = None, dtype=None) -> "Module":
        """Move (and/or cast) every parameter and buffer in place; parameters keep their identity.

        Floating buffers registered with a formula are recomputed in `dtype`, not cast.
        """
        for m in self.modules():
            for p in m._parameters.values():
                if p is None:
                    continue
                data = p.data if device is None else backend.to_device(p.data, device)
                p.data = data if dtype is None else data.astype(dtype)
                if p.grad is not None:
                    g = p.grad if device is None else backend.to_device(p.grad, device)
                    p.grad = g if dtype is None else g.astype(dtype)
            for name, b in list(m._buffers.items()):
                if b is None:
                    continue
                formula = m._buffer_formulas.get(name)
                if dtype is not None and b.dtype.kind == "f" and formula is not None:
                    b = backend.to_device(np.asarray(formula(np.dtype(dtype))), device or backend.device_of(b))
                else:
                    b = b if device is None else backend.to_device(b, device)
                    if dtype is not None and b.dtype.kind == "f":
                        b = b.astype(dtype)
                m._buffers[name] = b
        return self

    def double(self) -> "Module":
        return self.to(dtype=np.float64)

    def float(self) -> "Module":
        return self.to(dtype=np.float32)

    def num_parameters(self) -> int:
        return int(sum(p.size for p in self.parameters()))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> "OrderedDict[str, object]":
        """Name -> array (the live arrays, not copies) for every parameter and buffer.

        A shared parameter appears under every name it is registered with, as in torch.
        """
        out = OrderedDict()
        for mod_name, m in self.named_modules():
            for name, p in m._parameters.items():
                if p is not None:
                    out[f"{mod_name}.{name}" if mod_name else name] = p.data
            for name, b in m._buffers.items():
                if b is not None and name not in m._non_persistent:
                    out[f"{mod_name}.{name}" if mod_name else name] = b
        return out

    def load_state_dict(self, state, strict: bool = True, cast: bool = False):
        """Copy arrays into the parameters and buffers of the same names (in place, keeping dtype and device).

        With strict=True any missing, unexpected or wrong-shaped key raises one ValueError listing
        all of them. A value whose dtype does not fit the parameter's without loss (float64 into
        float32, say) is refused, naming each such entry, unless cast=True: rounding the weights of
        a float64 reference model would make every later comparison silently wrong. Build the model
        in the source's dtype instead (``with npformer.default_dtype(np.float64): ...``).
        Returns (missing, unexpected).
        """
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        wrong = [f"{k}: expected {tuple(own[k].shape)}, got {tuple(np.shape(state[k]))}"
                 for k in own if k in state and tuple(own[k].shape) != tuple(np.shape(state[k]))]
        if not cast and not wrong:
            lossy = [f"{k} ({src} -> {own[k].dtype})" for k in own if k in state
                     for src in [_dtype_of(state[k])] if not np.can_cast(src, own[k].dtype, "safe")]
            if lossy:
                raise ValueError(f"load_state_dict for {type(self).__name__}: {len(lossy)} entries would lose "
                                 f"precision: {', '.join(lossy)}; build the model in that dtype "
                                 f"(npformer.default_dtype) or pass cast=True to round them")
        if wrong or (strict and (missing or unexpected)):
            parts = []
            if missing:
                parts.append(f"missing keys: {missing}")
            if unexpected:
                parts.append(f"unexpected keys: {unexpected}")
            if wrong:
                parts.append(f"wrong shapes: {wrong}")
            raise ValueError(f"load_state_dict for {type(self).__name__}: " + "; ".join(parts))
        targets = {}
        for mod_name, m in self.named_modules():
            for name, p in m._parameters.items():
                if p is not None:
                    targets[f"{mod_name}.{name}" if mod_name else name] = (m, name, True)
            for name, b in m._buffers.items():
                if b is not None and name not in m._non_persistent:
                    targets[f"{mod_name}.{name}" if mod_name else name] = (m, name, False)
        for key, (m, name, is_param) in targets.items():
            if key not in state:
                continue
            value = state[key].data if isinstance(state[key], Tensor) else state[key]
            if is_param:
                p = m._parameters[name]
                xp = backend.get_array_module(p.data)
                p.data[...] = xp.asarray(backend.to_numpy(value) if xp is np else value, dtype=p.dtype)
            else:
                b = m._buffers[name]
                xp = backend.get_array_module(b)
                m._buffers[name] = xp.asarray(backend.to_numpy(value) if xp is np else value, dtype=b.dtype)
        return missing, unexpected

    # ------------------------------------------------------------------ printing
    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, m in self._modules.items():
            sub = repr(m).replace("\n", "\n  ")
            lines.append(f"  ({name}): {sub}")
        return "\n".join(lines) + (")" if len(lines) == 1 else "\n)")


def _dtype_of(value) -> np.dtype:
    """The dtype of a state-dict value: an array, a Tensor, or anything numpy.asarray takes."""
    value = value.data if isinstance(value, Tensor) else value
    try:
        return np.dtype(value.dtype)
    except (AttributeError, TypeError):
        return np.asarray(backend.to_numpy(value) if backend.is_array(value) else value).dtype
