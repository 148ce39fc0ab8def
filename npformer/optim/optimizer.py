"""``Optimizer``: parameter groups, per-parameter state, and a flat state dict without pickle.

An optimizer updates tensors in place from their ``.grad`` arrays (NumPy or CuPy, shaped like
the tensor). As in PyTorch, ``param_groups`` is a list of dicts ``{"params": [...], "lr": ..., ...}``;
options a group leaves out come from the optimizer's defaults. ``state[p]`` holds the
per-parameter state (moment buffers, step counters), created on the first step that sees a grad.

``state_dict()`` is a flat mapping ``{str: number | str | list | np.ndarray}``, so that
``np.savez(f, **opt.state_dict())`` followed by ``opt.load_state_dict(np.load(f, allow_pickle=False))``
round-trips it. Its keys (g: group index, i: index of the parameter in its group):

    optimizer              class name, e.g. "AdamW"
    n_groups               number of parameter groups
    group.{g}.n_params     number of parameters in group g
    group.{g}.{option}     the group's options (lr, betas, ...); tuples are stored as lists
    param.{g}.{i}.shape    shape of the parameter, to check that a state fits
    state.{g}.{i}.{key}    state array shaped like the parameter (exp_avg, momentum_buffer, ...)
    scalar.{g}.{i}.{key}   state number (step)

A group may carry ``param_names`` (a list of str, one per parameter); errors then name parameters.
"""

from __future__ import annotations

import numbers

import numpy as np

from .. import autograd, backend
from ..tensor import Tensor


# ----------------------------------------------------------------------------- option checks

def as_float(name: str, value) -> float:
    """`value` as a Python float (never a NumPy scalar), or a ValueError naming the option."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number; got {value!r}")
    return float(value)


def nonnegative(name: str, value) -> float:
    """A float >= 0 (NaN rejected), or a ValueError naming the option."""
    v = as_float(name, value)
    if not v >= 0.0:
        raise ValueError(f"{name} must be >= 0; got {value!r}")
    return v


# ----------------------------------------------------------------------------- the base class

class Optimizer:
    """Base class: holds param_groups and state; subclasses define `_check_options` and `_update`.

    ``step()`` is ``update(p, options)`` for each ``(p, options)`` of ``params_to_update()``;
    a caller may run those updates in another order or concurrently: each touches only its
    parameter and that parameter's state.

    params: an iterable of Tensors, or of dicts {"params": iterable of Tensors, option: value}
    defaults: option -> default value for every group
    """

    def __init__(self, params, defaults: dict):
        if isinstance(params, Tensor):
            raise TypeError("params must be an iterable of Tensors or of dicts, not a single Tensor")
        self.defaults = dict(defaults)
        self.param_groups: list[dict] = []
        self.state: dict = {}  # Tensor -> dict; Tensors hash by identity
        groups = [params] if isinstance(params, dict) else list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    def add_param_group(self, group: dict) -> None:
        """Append a group {"params": tensors, option: value}; missing options come from defaults."""
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError(f"a parameter group must be a dict with a 'params' entry; got {type(group).__name__}")
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        for i, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(f"optimizer parameters must be Tensors; parameter {i} is a {type(p).__name__}")
            if not p.is_leaf:
                raise ValueError(f"parameter {i} is not a leaf tensor (it was computed by {p.grad_fn}); "
                                 "optimize the leaves")
            if id(p) in seen:
                raise ValueError(f"parameter {i} appears in more than one parameter group (or twice in one)")
            seen.add(id(p))
        new = {"params": params, **self.defaults, **{k: v for k, v in group.items() if k != "params"}}
        names = new.get("param_names")
        if names is not None:
            new["param_names"] = [str(n) for n in names]
            if len(new["param_names"]) != len(params):
                raise ValueError(f"param_names has {len(new['param_names'])} names for {len(params)} parameters")
        new.update(self._check_options(new))
        self.param_groups.append(new)

    # ------------------------------------------------------------------ what subclasses define
    def _check_options(self, group: dict) -> dict:
        """Validate a group's options; return them normalised (Python floats, tuples, bools)."""
        return {}

    def _update(self, x, grad, state: dict, opts: dict) -> None:
        """Update the array `x` in place from `grad` (same shape), the parameter's state and options."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the training-loop API
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Set every parameter's grad to None (or fill it with zeros in place)."""
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none or p.grad is None:
                    p.grad = None
                else:
                    p.grad[...] = 0

    def step(self, closure=None):
        """One update of every parameter that has a grad; returns closure() when given (else None).

        closure: a callable that recomputes the loss (and its gradients), run with grad enabled.
        """
        loss = None
        if closure is not None:
            with autograd.set_grad_enabled(True):
                loss = closure()
        for p, opts in self.params_to_update():
            self.update(p, opts)
        return loss

    def params_to_update(self) -> list:
        """``[(parameter, its group's options)]`` for every parameter with a grad, in group order.

        Checks every group's options (normalised in place: groups are editable) and every grad's
        shape first, so that a bad one raises before any parameter changes.
        """
        work = []
        for gi, group in enumerate(self.param_groups):
            opts = self._check_options(group)
            group.update(opts)
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if tuple(p.grad.shape) != p.shape:
                    raise ValueError(f"{_label(group, gi, i)}: grad shape {tuple(p.grad.shape)} "
                                     f"does not match parameter shape {p.shape}")
                work.append((p, opts))
        return work

    def update(self, p: Tensor, opts: dict) -> None:
        """Update parameter `p` in place from ``p.grad`` with options `opts` (from ``params_to_update``).

        Its state is created on its first update and kept in ``self.state[p]`` when not empty
        (SGD without momentum keeps none). Touches nothing of any other parameter.
        """
        state = self.state.get(p, {})
        self._update(p.data, p.grad, state, opts)
        if state:
            self.state[p] = state

    # ------------------------------------------------------------------ state dict
    def state_dict(self) -> dict:
        """A flat {str: number | str | list | np.ndarray} snapshot (arrays are host copies)."""
        flat = {"optimizer": type(self).__name__, "n_groups": len(self.param_groups)}
        for gi, group in enumerate(self.param_groups):
            flat[f"group.{gi}.n_params"] = len(group["params"])
            for key, value in group.items():
                if key != "params":
                    flat[f"group.{gi}.{key}"] = _plain(f"group {gi} option {key!r}", value)
            for i, p in enumerate(group["params"]):
                flat[f"param.{gi}.{i}.shape"] = np.array(p.shape, dtype=np.int64)
                for key, value in self.state.get(p, {}).items():
                    if backend.is_array(value):
                        flat[f"state.{gi}.{i}.{key}"] = (value.copy() if isinstance(value, np.ndarray)
                                                        else backend.to_numpy(value))
                    else:
                        flat[f"scalar.{gi}.{i}.{key}"] = _plain(f"state {key!r}", value)
        return flat

    def load_state_dict(self, state_dict) -> None:
        """Restore options and state from `state_dict()` output (or np.load of it).

        Everything is checked before anything changes; a state that does not fit these
        parameters (other optimizer, number of groups or parameters, names, shapes) raises a
        ValueError naming what differs. State arrays are copied onto each parameter's device
        and dtype.
        """
        sd = {k: state_dict[k] for k in state_dict.keys()}
        mine = type(self).__name__

        def get(key):
            if key not in sd:
                raise ValueError(f"{mine}.load_state_dict: the state has no {key!r} entry")
            return _scalar(key, sd[key])

        kind = get("optimizer")
        if kind != mine:
            raise ValueError(f"cannot load a {kind} state into {mine}")
        n_groups = get("n_groups")
        if n_groups != len(self.param_groups):
            raise ValueError(f"{mine}.load_state_dict: parameter groups differ: {n_groups} in the state, "
                             f"{len(self.param_groups)} in the optimizer")
        for gi, group in enumerate(self.param_groups):
            n = get(f"group.{gi}.n_params")
            if n != len(group["params"]):
                raise ValueError(f"{mine}.load_state_dict: group {gi} has {n} parameters in the state, "
                                 f"{len(group['params'])} in the optimizer")

        options = [{} for _ in self.param_groups]
        new_state: dict = {}
        for key, value in sd.items():
            kind, _, rest = key.partition(".")
            if kind in ("optimizer", "n_groups") and not rest:
                continue
            if kind == "group":
                gi, _, name = rest.partition(".")
                gi = _index(key, gi, len(self.param_groups))
                group = self.param_groups[gi]
                if name == "param_names":
                    _check_names(gi, group, value)
                elif name != "n_params":
                    a = np.asarray(value)
                    options[gi][name] = a.item() if a.ndim == 0 else a.tolist()
                continue
            parts = rest.split(".", 2)
            if kind not in ("param", "state", "scalar") or len(parts) != 3:
                raise ValueError(f"{mine}.load_state_dict: unexpected key {key!r}")
            gi = _index(key, parts[0], len(self.param_groups))
            group = self.param_groups[gi]
            i = _index(key, parts[1], len(group["params"]))
            p, name = group["params"][i], parts[2]
            if kind == "param":
                if name != "shape":
                    raise ValueError(f"{mine}.load_state_dict: unexpected key {key!r}")
                shape = tuple(int(s) for s in np.ravel(value))
                if shape != p.shape:
                    raise ValueError(f"{mine}.load_state_dict: {_label(group, gi, i)} has shape {p.shape}, "
                                     f"the state was saved for shape {shape}")
            elif kind == "state":
                a = np.asarray(value)
                if a.shape != p.shape:
                    raise ValueError(f"{mine}.load_state_dict: state {name!r} of {_label(group, gi, i)} has "
                                     f"shape {a.shape}, the parameter has shape {p.shape}")
                new_state.setdefault(p, {})[name] = backend.xp_for(p.device).array(a, dtype=p.dtype)
            else:
                new_state.setdefault(p, {})[name] = _scalar(key, value)

        checked = [self._check_options({**group, **opts}) for group, opts in zip(self.param_groups, options)]
        for group, opts, normalised in zip(self.param_groups, options, checked):
            group.update(opts)
            group.update(normalised)
        self.state = new_state

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for gi, group in enumerate(self.param_groups):
            opts = ", ".join(f"{k}={v}" for k, v in group.items() if k not in ("params", "param_names"))
            lines.append(f"  group {gi}: {len(group['params'])} params, {opts}")
        return "\n".join(lines + [")"])


# ----------------------------------------------------------------------------- helpers

def _label(group: dict, gi: int, i: int) -> str:
    """'group 0 parameter 2' plus the parameter's name when the group has param_names."""
    names = group.get("param_names")
    return f"group {gi} parameter {i}" + (f" ({names[i]!r})" if names else "")


def _plain(what: str, value):
    """A value that np.savez stores without pickle: number, bool, str, or list of those."""
    if isinstance(value, (tuple, list)):
        return [_plain(what, v) for v in value]
    if isinstance(value, (bool, numbers.Number, str, np.generic)):
        return value.item() if isinstance(value, np.generic) else value
    raise TypeError(f"{what} is a {type(value).__name__}; a state dict holds only numbers, strings and lists")


def _scalar(key: str, value):
    """A 0-d value (Python or NumPy, as np.load returns it) as a Python number or str."""
    a = np.asarray(value)
    if a.ndim != 0:
        raise ValueError(f"optimizer state entry {key!r} should be a single value; got shape {a.shape}")
    return a.item()


def _index(key: str, text: str, n: int) -> int:
    """Parse a group or parameter index from a state key and check it is in range(n)."""
    if not text.isdigit() or int(text) >= n:
        raise ValueError(f"optimizer state key {key!r} refers to index {text!r}, but there are only {n}")
    return int(text)


def _check_names(gi: int, group: dict, saved) -> None:
    """Compare saved param_names with the group's, when it has them."""
    mine = group.get("param_names")
    if mine is None:
        return
    saved = [str(s) for s in np.ravel(saved).tolist()]
    if len(saved) != len(mine):
        raise ValueError(f"optimizer state group {gi} was saved with {len(saved)} parameter names, "
                         f"the optimizer has {len(mine)}")
    for i, (a, b) in enumerate(zip(saved, mine)):
        if a != b:
            raise ValueError(f"optimizer state group {gi} parameter {i} is {a!r}, the optimizer has {b!r}")
