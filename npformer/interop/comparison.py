"""``compare(torch_module, twin, *inputs)``: run a torch module and its npformer twin side by side in
float64 and report every difference, in the torch module's own parameter names and layouts.

    report = compare(torch_module, twin, x, steps=2, optimizer=("AdamW", {"lr": 1e-2}))
    print(report)                       # a table: kind, name, shape, max|torch|, abs, rel
    report.assert_close(rtol=1e-10)     # AssertionError naming the first and the worst differences

What runs: float64 deep copies of both modules (the caller's modules, their dtypes and grads are
never touched) take the same inputs; the same scalar loss is pushed back through both; then
`steps` optimizer steps are taken on both. The report has one Entry per

    weight      parameter before the run (a weight that did not copy across shows up here first)
    output      floating output (tensors, tuples, lists, dicts, HF ModelOutputs, flattened in order)
    loss        the scalar that was backpropagated
    input_grad  gradient of each floating input
    grad        gradient of each parameter
    updated     parameter after the optimizer steps

with abs = max |twin - torch| and rel = abs / max |torch| (0 when both are zero, inf when only
torch's is). An entry that cannot be compared (a parameter or gradient present on one side only,
a shape that differs) has abs = rel = inf and a note saying why: nothing is skipped silently.

Names: the twin's arrays go back to torch's names and layouts through the TorchMapping given as
`mapping`, else the one load_torch_state_dict left on the twin (``twin.torch_mapping``), else the
identity (from_torch twins share torch's names).
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .. import autograd, backend
from ..tensor import Tensor
from .mapping import TorchMapping, _host

KINDS = ("weight", "output", "loss", "input_grad", "grad", "updated")
# the default atol: rounding noise of arrays that are zero in exact arithmetic, which Adam's steps
# amplify by lr / eps (see Report.assert_close)
ATOL = {**dict.fromkeys(KINDS, 1e-12), "updated": 1e-8}


@dataclass(frozen=True)
class Entry:
    """One compared array: kind (one of KINDS), name (torch's), abs = max |twin - torch|,
    rel = abs / max |torch|, scale = max |torch|, shape (torch's), note (why it could not be compared)."""

    kind: str
    name: str
    abs: float
    rel: float
    scale: float
    shape: tuple
    note: str = ""

    def ok(self, atol: float, rtol: float) -> bool:
        """abs <= atol + rtol * max |torch| (False for NaN and for entries that could not be compared)."""
        return bool(self.abs <= atol + rtol * self.scale)

    def excess(self, atol: float, rtol: float) -> float:
        """How many times the tolerance abs is (inf for NaN or a one-sided entry)."""
        return math.inf if math.isnan(self.abs) else self.abs / max(atol + rtol * self.scale, 1e-300)


def _entry(kind, name, ours, theirs) -> Entry:
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    scale = float(np.abs(theirs).max()) if theirs.size else 0.0
    if ours.shape != theirs.shape:
        return Entry(kind, name, math.inf, math.inf, scale, theirs.shape, f"the twin's shape is {ours.shape}")
    diff = float(np.abs(ours - theirs).max()) if theirs.size else 0.0
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
    return Entry(kind, name, diff, rel, scale, theirs.shape)


def _one_sided(kind, name, shape, note) -> Entry:
    return Entry(kind, name, math.inf, math.inf, 0.0, tuple(shape), note)


class Report:
    """The entries of one compare run; ``print(report)`` shows them as a table.

    entries: list of Entry, in the order of KINDS; select(kind, name) filters them; worst(n, kind)
    are the n largest rel; failures(atol, rtol) fail the tolerance; assert_close raises on any.
    """

    def __init__(self, entries, title: str):
        self.entries, self.title = list(entries), title

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def select(self, kind: str = None, name: str = None) -> list:
        if kind is not None and kind not in KINDS:
            raise ValueError(f"Report.select: kind must be one of {KINDS}; got {kind!r}")
        return [e for e in self.entries if (kind is None or e.kind == kind) and (name is None or e.name == name)]

    def worst(self, n: int = 1, kind: str = None) -> list:
        """The n entries with the largest rel (NaN first), optionally of one kind."""
        return sorted(self.select(kind), key=lambda e: math.inf if math.isnan(e.rel) else e.rel, reverse=True)[:n]

    def failures(self, atol=None, rtol=1e-10) -> list:
        """The entries beyond the tolerance (atol, rtol: as in assert_close)."""
        atol, rtol = _per_kind(atol, ATOL), _per_kind(rtol, 1e-10)
        return [e for e in self.entries if not e.ok(atol[e.kind], rtol[e.kind])]

    def assert_close(self, atol=None, rtol=1e-10) -> "Report":
        """Raise AssertionError unless every entry has abs <= atol + rtol * max |torch|.

        atol, rtol: a float for every kind, or {kind: float} (kinds left out keep the defaults);
        atol None: ATOL, 1e-12, and 1e-8 for the updated entries (below).
        The message names the first entry to differ (in the order of KINDS: a weight that differs
        before the run explains everything after it) and the five furthest beyond the tolerance.
        atol covers arrays that are zero in exact arithmetic, rounding noise in practice: the gradient
        of a key bias (softmax ignores a constant added to a row of scores). Adam divides such noise
        by its eps: a step of lr * noise / eps, 1e-2 * 1e-16 / 1e-8 = 1e-10 and more, hence 1e-8 for the
        updated entries. An optimizer that differs (bias correction, coupled decay) shows near lr.
        """
        bad = self.failures(atol, rtol)
        if not bad:
            return self
        atol, rtol = _per_kind(atol, ATOL), _per_kind(rtol, 1e-10)
        excess = lambda e: e.excess(atol[e.kind], rtol[e.kind])          # noqa: E731
        first = min(bad, key=lambda e: KINDS.index(e.kind))
        first = max((e for e in bad if e.kind == first.kind), key=excess)
        worst = sorted(bad, key=excess, reverse=True)[:5]
        tol = f"atol={_tolerance(atol)}, rtol={_tolerance(rtol)}"
        advice = ""
        if all(e.kind == "updated" for e in bad):
            advice = ("\nonly parameters after the optimizer steps differ: Adam turns rounding noise in a gradient "
                      "that is zero in exact arithmetic into steps of about lr * noise / eps; if the grad entries of "
                      "these parameters are tiny, give updated entries their own atol (atol={'updated': ...})")
        raise AssertionError(
            f"{self.title}: {len(bad)} of {len(self.entries)} entries differ by more than the tolerance "
            f"({tol})\nfirst to differ ({' > '.join(KINDS)}):\n  {_line(first)}\n"
            f"furthest beyond the tolerance:\n" + "\n".join("  " + _line(e) for e in worst) + advice)

    def __str__(self) -> str:
        width = min(max([len(e.name) for e in self.entries] + [4]), 64)
        head = f"{'kind':10s} {'name':{width}s} {'shape':14s} {'max|torch|':>10s} {'abs':>9s} {'rel':>9s}"
        rows = [f"{e.kind:10s} {e.name:{width}s} {str(e.shape):14s} {e.scale:10.2e} {e.abs:9.2e} {e.rel:9.2e}"
                + (f"  {e.note}" if e.note else "") for e in self.entries]
        summary = ["per kind, the entry nearest the default tolerance: abs / (atol + rtol * max|torch|)"]
        for k in KINDS:
            mine = self.select(k)
            if mine:
                e = max(mine, key=lambda e: e.excess(ATOL[k], 1e-10))
                summary.append(f"  {k:10s} {e.excess(ATOL[k], 1e-10):9.2e}  {e.name}")
        return "\n".join([self.title, head, *rows, *summary])

    def __repr__(self) -> str:
        return f"<Report {self.title}: {len(self.entries)} entries>"


def _per_kind(value, default) -> dict:
    """{kind: float} from None (the default: a float or a {kind: float}), a float for every kind,
    or a {kind: float} dict (other kinds keep the default)."""
    default = default if isinstance(default, dict) else dict.fromkeys(KINDS, default)
    if value is None:
        return dict(default)
    if isinstance(value, dict):
        unknown = set(value) - set(KINDS)
        if unknown:
            raise ValueError(f"Report: tolerance kinds must be among {KINDS}; got {sorted(unknown)}")
        return {k: float(value.get(k, default[k])) for k in KINDS}
    return dict.fromkeys(KINDS, float(value))


def _tolerance(per_kind: dict) -> str:
    """'1e-12 (updated 1e-08)': the value most kinds have, then the exceptions."""
    values = list(per_kind.values())
    common = max(values, key=values.count)
    other = [f"{k} {v:g}" for k, v in per_kind.items() if v != common]
    return f"{common:g}" + (f" ({', '.join(other)})" if other else "")


def _line(e: Entry) -> str:
    return f"{e.kind} {e.name} {e.shape}: abs {e.abs:.2e}, rel {e.rel:.2e}" + (f" ({e.note})" if e.note else "")


# ----------------------------------------------------------------------------- running both sides

def _inputs(torch, values, torch_device, twin_device):
    """(torch values, twin values, [(name, torch leaf, twin leaf)]) for a {name: input} dict.

    Floating arrays (torch tensors, npformer Tensors, NumPy/CuPy arrays) become float64 leaves that
    require grad, on each side's device; other arrays go across as they are (token ids, boolean
    masks); anything else (None, numbers, strings) is given to both unchanged."""
    t_vals, n_vals, leaves = {}, {}, []
    for name, v in values.items():
        if not (isinstance(v, (torch.Tensor, Tensor)) or backend.is_array(v)):
            t_vals[name] = n_vals[name] = v
            continue
        a = _host(v)
        if a.dtype.kind == "f":
            t_vals[name] = torch.tensor(a, dtype=torch.float64, device=torch_device, requires_grad=True)
            n_vals[name] = Tensor(backend.to_device(a.astype(np.float64), twin_device), requires_grad=True)
            leaves.append((name, t_vals[name], n_vals[name]))
        else:
            t_vals[name] = v if isinstance(v, torch.Tensor) else torch.from_numpy(a).to(torch_device)
            n_vals[name] = backend.to_device(a, twin_device)
    return t_vals, n_vals, leaves


def _flatten(out, path: str, is_tensor) -> list:
    """[(path, tensor)] of the floating tensors in a nest of tuples, lists and mappings (HF's
    ModelOutput is one), in order; None and other objects (a KV cache) are passed over."""
    if is_tensor(out):
        return [(path, out)]
    if isinstance(out, Mapping):
        return [x for k, v in out.items() for x in _flatten(v, f"{path}.{k}", is_tensor)]
    if isinstance(out, (tuple, list)):
        return [x for i, v in enumerate(out) for x in _flatten(v, f"{path}[{i}]", is_tensor)]
    return []


def _optimizers(torch, optimizer):
    """(torch factory, twin factory): each takes a list of parameters and returns an optimizer."""
    from .. import optim
    if isinstance(optimizer, (tuple, list)) and len(optimizer) == 2 and all(callable(f) for f in optimizer):
        return tuple(optimizer)
    name, options = (optimizer, {}) if isinstance(optimizer, str) else optimizer
    both = sorted(n for n in optim.__all__ if isinstance(getattr(optim, n), type)
                  and issubclass(getattr(optim, n), optim.Optimizer) and n != "Optimizer"
                  and hasattr(torch.optim, n))
    if name not in both:
        raise ValueError(f"compare: optimizer {name!r} is not one both torch.optim and npformer.optim have; "
                         f"choose one of {both}, or pass a pair of factories (torch_factory, twin_factory)")
    return (lambda ps: getattr(torch.optim, name)(ps, **options)), (lambda ps: getattr(optim, name)(ps, **options))


def _weights(kind, t_arrays, twin_arrays, mapping, twin_params) -> list:
    """Entries comparing torch's {name: host array or None} (parameters or their grads) with the
    twin's {name: array} mapped back to torch's names and layouts; twin_params: the twin's names."""
    back = mapping.to_torch(twin_arrays, list(t_arrays))
    out = []
    for name, t in t_arrays.items():
        twin_name = mapping.route(name).twin_name
        if twin_name not in twin_params:
            note = "the mapping drops it" if twin_name is None else f"the twin has no parameter {twin_name}"
            out.append(_one_sided(kind, name, () if t is None else t.shape, note))
        elif t is None and name not in back:
            out.append(Entry(kind, name, 0.0, 0.0, 0.0, (), "no gradient on either side"))
        elif t is None or name not in back:
            side, shape = ("torch", back[name].shape) if t is None else ("the twin", t.shape)
            out.append(_one_sided(kind, name, shape, f"{side} has no gradient for it"))
        else:
            out.append(_entry(kind, name, back[name], t))
    return out


@contextlib.contextmanager
def _borrowed_in_float64(module):
    """The torch module itself, in float64 inside the block; every parameter, buffer and gradient
    (values, dtypes and identities) is put back afterwards, whatever happens inside.

    Not a deep copy: a module that holds its own submodules in a closure (minGPT's
    ``self.mlpf = lambda x: ...``) would keep computing with the originals, not with the copy.
    """
    params = list(module.named_parameters(remove_duplicate=True))
    # copies: .double() converts the gradients in place, and on a float64 module it changes nothing,
    # so the steps would update the very arrays we keep
    saved = [(p, p.detach().clone(), None if p.grad is None else p.grad.detach().clone()) for _, p in params]
    buffers = [(m, name, b.clone()) for m in module.modules() for name, b in m._buffers.items() if b is not None]
    try:
        module.double()
        for _, p in params:
            p.grad = None
        yield module
    finally:
        for p, data, grad in saved:
            p.grad = None                  # the float64 one, before the dtype goes back
            p.data = data
            p.grad = grad
        for m, name, b in buffers:
            m._buffers[name] = b


def compare(torch_module, twin, *inputs, kwargs: dict = None, loss=None, steps: int = 0, optimizer=None,
            mapping: TorchMapping = None, seed: int = 0) -> Report:
    """Run torch_module and its npformer twin in float64 on the same inputs; report every difference.

    inputs, kwargs: given to both modules (converted as _inputs says; floating ones get gradients).
    loss: None for sum over every floating output of (output * R), R a fixed standard normal array
        of its shape from numpy.random.default_rng(seed); or a function outputs -> scalar used on
        both sides; or a pair (torch_loss, twin_loss).
    steps: optimizer steps after the first backward (each later step runs forward and backward
        again); the parameters after them are the "updated" entries.
    optimizer: ("AdamW", {"lr": 1e-2, "weight_decay": 0.1}): a name that torch.optim and
        npformer.optim share and its options, or just the name; or a pair of factories
        (torch_factory, twin_factory), each parameters -> optimizer. Default ("AdamW", {"lr": 1e-3}).
    mapping: a TorchMapping (default: twin.torch_mapping, else identical names).
    Returns a Report. Dropout should be off (eval mode or p=0): the two draw different masks.
    """
    try:
        import torch
    except ImportError as exc:
        raise ImportError("npformer.interop.compare needs PyTorch: pip install torch") from exc
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"compare: steps must be an int >= 0; got {steps!r}")
    mapping = mapping or getattr(twin, "torch_mapping", None) or TorchMapping()
    with _borrowed_in_float64(torch_module) as tm:
        return _compare(torch, tm, copy.deepcopy(twin), inputs, kwargs, loss, steps, optimizer, mapping, seed,
                        title_of=(type(torch_module).__name__, type(twin).__name__))


def _compare(torch, tm, nm, inputs, kwargs, loss, steps, optimizer, mapping, seed, title_of) -> Report:
    """compare's body, on the float64 torch module `tm` and the twin's float64 copy `nm`."""
    if any(a.dtype.kind == "f" and a.dtype != np.float64 for a in nm.state_dict().values()):
        nm.to(dtype=np.float64)
    nm.zero_grad()
    if any(m.training and (isinstance(m, torch.nn.Dropout) and m.p or
                           isinstance(m, torch.nn.MultiheadAttention) and m.dropout) for m in tm.modules()):
        warnings.warn("compare: the torch module is in training mode with dropout on; the two sides draw "
                      "different dropout masks (use .eval() or p=0)", stacklevel=2)
    t_params, n_params = dict(tm.named_parameters()), dict(nm.named_parameters())
    used = {mapping.route(n).twin_name for n in t_params}
    twin_only = [n for n in n_params if n not in used]
    t_dev = next((p.device for p in tm.parameters()), torch.device("cpu"))
    n_dev = next((backend.device_of(p.data) for p in nm.parameters()), backend.default_device())
    losses = (loss, loss) if callable(loss) or loss is None else tuple(loss)
    entries = _weights("weight", {n: _host(p) for n, p in t_params.items()},
                       {n: p.data for n, p in n_params.items()}, mapping, n_params)
    entries += [_one_sided("weight", n, n_params[n].shape, "twin only: no torch parameter maps to it")
                for n in twin_only]

    def run():
        """Forward and backward on both sides; the entries for outputs, loss and gradients."""
        named = {**{f"inputs[{i}]": v for i, v in enumerate(inputs)}, **(kwargs or {})}
        t_vals, n_vals, leaves = _inputs(torch, named, t_dev, n_dev)
        pos = range(len(inputs))
        with torch.enable_grad(), autograd.set_grad_enabled(True):
            t_out = tm(*[t_vals[f"inputs[{i}]"] for i in pos], **{k: t_vals[k] for k in kwargs or {}})
            n_out = nm(*[n_vals[f"inputs[{i}]"] for i in pos], **{k: n_vals[k] for k in kwargs or {}})
            t_flat = [x for x in _flatten(t_out, "output", lambda o: isinstance(o, torch.Tensor))
                      if x[1].is_floating_point()]
            n_flat = [x for x in _flatten(n_out, "output", lambda o: isinstance(o, Tensor)) if x[1].dtype.kind == "f"]
            out = [_entry("output", tn, _host(n), t.detach().cpu().numpy()) for (tn, t), (_, n) in zip(t_flat, n_flat)]
            out += [_one_sided("output", p, t.shape, "the twin has no such output") for p, t in t_flat[len(n_flat):]]
            out += [_one_sided("output", p, n.shape, "twin only: torch has no such output")
                    for p, n in n_flat[len(t_flat):]]
            if losses[0] is None:
                rng = np.random.default_rng(seed)
                pairs = [(t, n, rng.standard_normal(tuple(t.shape))) for (_, t), (_, n) in zip(t_flat, n_flat)]
                pairs = [(t, n, r) for t, n, r in pairs if tuple(n.shape) == r.shape]
                t_loss = sum((t * torch.from_numpy(r).to(t.device)).sum() for t, n, r in pairs)
                n_loss = sum((n * backend.to_device(r, n_dev)).sum() for t, n, r in pairs)
            else:
                t_loss, n_loss = losses[0](t_out), losses[1](n_out)
            if not (isinstance(t_loss, torch.Tensor) and t_loss.requires_grad):
                raise ValueError("compare: the loss does not depend on any parameter or input of the torch module")
            t_loss.backward()
            n_loss.backward()
        out.append(_entry("loss", "loss", _host(n_loss), t_loss.detach().cpu().numpy()))
        for name, t, n in leaves:
            if t.grad is None and n.grad is None:
                out.append(Entry("input_grad", name, 0.0, 0.0, 0.0, tuple(t.shape), "no gradient on either side"))
            elif t.grad is None or n.grad is None:
                out.append(_one_sided("input_grad", name, t.shape,
                                      f"{'torch' if t.grad is None else 'the twin'} has no gradient for it"))
            else:
                out.append(_entry("input_grad", name, _host(n.grad), t.grad.cpu().numpy()))
        out += _weights("grad", {n: None if p.grad is None else _host(p.grad) for n, p in t_params.items()},
                        {n: p.grad for n, p in n_params.items() if p.grad is not None}, mapping, n_params)
        out += [_one_sided("grad", n, n_params[n].shape, "twin only: no torch parameter maps to it")
                for n in twin_only if n_params[n].grad is not None]
        return out

    entries += run()
    if steps:
        t_make, n_make = _optimizers(torch, optimizer or ("AdamW", {"lr": 1e-3}))
        t_opt, n_opt = t_make(list(tm.parameters())), n_make(list(nm.parameters()))
        for k in range(steps):
            if k:
                t_opt.zero_grad(), n_opt.zero_grad()
                run()
            t_opt.step()
            n_opt.step()
        entries += _weights("updated", {n: _host(p) for n, p in t_params.items()},
                            {n: p.data for n, p in n_params.items()}, mapping, n_params)
    what = "sum(output * fixed random)" if losses[0] is None else "the given loss"
    title = (f"compare {title_of[0]} (torch) with {title_of[1]} (npformer), float64, "
             f"loss {what}" + (f", {steps} optimizer step{'s' * (steps > 1)}" if steps else ""))
    return Report(sorted(entries, key=lambda e: KINDS.index(e.kind)), title)
