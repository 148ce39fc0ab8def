"""Weight mapping between a torch module and a hand-built npformer twin whose names or layouts differ.

    mapping = TorchMapping(
        rename={"*.feed_forward.w_1.*": "*.linear1.*",      # a `*` pattern
                "generator.proj": "generator"},              # a prefix: the name and every name below it
        fuse_qkv={"*.self_attn.in_proj_*": ("*.self_attn.linears.0.*", "*.self_attn.linears.1.*",
                                            "*.self_attn.linears.2.*")},
        transpose=["*.c_fc.weight"])
    arrays = mapping.to_twin(torch_module.state_dict())     # {twin name: host array in the twin's layout}
    back = mapping.to_torch(twin_grads, torch_names)        # {torch name: array in torch's layout}

or, in one call that also checks every name and shape against the twin and remembers the mapping
on it (``twin.torch_mapping``, which ``npformer.interop.compare`` picks up):

    load_torch_state_dict(twin, torch_module, rename=..., fuse_qkv=..., transpose=...)

Names are state-dict names (``encoder.layers.0.linear1.weight``). Every torch entry takes one
*route* to the twin: dropped, copied, transposed, or one third (q, k or v) of a fused twin array.
The inverse is built from the torch names by mapping each one forward, so it is exact whatever
the rules are (functions included).
"""

from __future__ import annotations

import difflib
import re
from collections import OrderedDict, namedtuple

import numpy as np

from .. import backend
from ..tensor import Tensor

Route = namedtuple("Route", "torch_name twin_name transpose block")
Route.__doc__ = """Where one torch entry goes: twin_name (None: dropped), transpose (2-D weight stored
(in, out) in torch), block (None, or 0, 1, 2: the q, k or v third of the fused twin array)."""
QKV = ("q", "k", "v")


def _regex(pattern: str):
    """A `*` pattern as a compiled regex matching a whole name; each `*` captures 1+ characters."""
    return re.compile("^" + "(.+?)".join(re.escape(part) for part in pattern.split("*")) + "$")


def _fill(pattern: str, captures) -> str:
    """The pattern with its `*`s replaced by the captured runs, in order."""
    parts = pattern.split("*")
    return parts[0] + "".join(c + p for c, p in zip(captures, parts[1:]))


def _table(table: dict):
    """A rename dict as a function name -> new name (None: dropped); the first matching entry wins."""
    rules = []
    for src, dst in table.items():
        if not isinstance(src, str) or not (dst is None or isinstance(dst, str)):
            raise TypeError(f"TorchMapping: rename entries map a str to a str or None; got {src!r}: {dst!r}")
        if dst is not None and dst.count("*") != src.count("*"):
            raise ValueError(f"TorchMapping: rename {src!r} -> {dst!r}: both sides need the same number of `*`")
        rules.append((src, dst, _regex(src) if "*" in src else None))

    def rename(name: str):
        for src, dst, rx in rules:
            if rx is not None:
                m = rx.match(name)
                if m:
                    return None if dst is None else _fill(dst, m.groups())
            elif name == src or name.startswith(src + "."):
                return None if dst is None else dst + name[len(src):]
        return name
    return rename


class TorchMapping:
    """How a twin's state-dict names and layouts relate to a torch module's.

    rename: {torch pattern: twin pattern}, tried in order (the first entry that matches wins; names
        no entry matches keep their name). A pattern with `*` matches a whole name, each `*` a run
        of one or more characters (dots included), and the twin pattern gets the runs in the same
        order. A pattern without `*` is a prefix: it matches the name itself or any name below it
        ("generator.proj" matches "generator.proj.weight") and that prefix is replaced. A twin
        pattern of None drops the entry (a buffer the twin computes itself, a tied duplicate).
        rename may also be a function torch_name -> twin name (or None), or a list of dicts and
        functions applied one after the other, each to the previous one's result.
    transpose: torch names or `*` patterns whose 2-D weights torch stores (in, out), as HF's Conv1D;
        the twin gets the transpose (npformer's Linear stores (out, in)).
    fuse_qkv: {twin pattern: (q pattern, k pattern, v pattern)}, the three in torch names with as
        many `*` as the twin pattern: the twin array is the three torch arrays concatenated along
        axis 0, [W_q; W_k; W_v], as npformer's in_proj_weight (3E, E) and in_proj_bias (3E,). Names
        these patterns match take no part in rename.
    """

    def __init__(self, rename=None, transpose=(), fuse_qkv=None):
        stages = [] if rename is None else list(rename) if isinstance(rename, (list, tuple)) else [rename]
        self._stages = []
        for s in stages:
            if isinstance(s, dict):
                self._stages.append(_table(s))
            elif callable(s):
                self._stages.append(s)
            else:
                raise TypeError(f"TorchMapping: rename takes dicts and functions; got {type(s).__name__}")
        if isinstance(transpose, str):
            transpose = [transpose]
        self._transpose = [_regex(p) for p in transpose]
        self._fused = []                                  # (twin pattern, [(block, regex, torch pattern)])
        for twin_pattern, qkv in (fuse_qkv or {}).items():
            qkv = [qkv] if isinstance(qkv, str) else list(qkv)
            if len(qkv) != 3 or any(p.count("*") != twin_pattern.count("*") for p in qkv):
                raise ValueError(f"TorchMapping: fuse_qkv[{twin_pattern!r}] must be three torch patterns (q, k, v) "
                                 f"with as many `*` as {twin_pattern!r}; got {qkv!r}")
            self._fused.append((twin_pattern, [(b, _regex(p), p) for b, p in enumerate(qkv)]))
        self.spec = dict(rename=rename, transpose=tuple(transpose), fuse_qkv=dict(fuse_qkv or {}))
        self.torch_names = None                           # the names of the state last passed to to_twin

    def __repr__(self) -> str:
        return "TorchMapping(" + ", ".join(f"{k}={v!r}" for k, v in self.spec.items() if v) + ")"

    # ------------------------------------------------------------------ one name
    def route(self, torch_name: str) -> Route:
        """Where the torch entry `torch_name` goes in the twin."""
        transposed = any(rx.match(torch_name) for rx in self._transpose)
        for twin_pattern, blocks in self._fused:
            for b, rx, _ in blocks:
                m = rx.match(torch_name)
                if m:
                    return Route(torch_name, _fill(twin_pattern, m.groups()), transposed, b)
        name = torch_name
        for stage in self._stages:
            name = stage(name)
            if name is None:
                break
        return Route(torch_name, name, transposed, None)

    def partners(self, route: Route) -> list:
        """The torch names of the q, k and v blocks of a fused route's twin array ([] when not fused)."""
        if route.block is None:
            return []
        for twin_pattern, blocks in self._fused:
            for b, rx, _ in blocks:
                m = rx.match(route.torch_name)
                if m and b == route.block:
                    return [_fill(p, m.groups()) for _, _, p in blocks]
        return []

    # ------------------------------------------------------------------ whole states
    def convert(self, state):
        """(twin arrays, problems, sources): the lenient to_twin that load_torch_state_dict reports from.

        sources: {twin name: [torch names it came from]}; problems: strings, one per entry that cannot
        be mapped (two torch entries onto one twin name, a fused block without its partners, a
        transpose of a non-2-D array).
        """
        host = OrderedDict((k, _host(v)) for k, v in _items(state))
        self.torch_names = list(host)
        out, problems, sources, fused = OrderedDict(), [], {}, {}
        for name, a in host.items():
            r = self.route(name)
            if r.twin_name is None:
                continue
            if r.transpose:
                if a.ndim != 2:
                    problems.append(f"{name}: transpose= matches it but it has shape {a.shape}, not 2-D")
                    continue
                a = a.T
            sources.setdefault(r.twin_name, []).append(name)
            if r.block is None:
                out[r.twin_name] = np.ascontiguousarray(a)
            else:
                fused.setdefault(r.twin_name, [None, None, None])[r.block] = a
                out.setdefault(r.twin_name, None)                 # keep the order of first appearance
        for twin_name, names in sources.items():
            if len(names) > 1 and twin_name not in fused:
                problems.append(f"{', '.join(names)}: all map to the twin entry {twin_name}")
        for twin_name, blocks in fused.items():
            want = self.partners(self.route(sources[twin_name][0]))
            absent = [f"{QKV[b]}: {n}" for b, n in enumerate(want) if blocks[b] is None]
            if absent:
                problems.append(f"fuse_qkv {twin_name}: torch has no {'; '.join(absent)}")
            elif len({b.shape[1:] for b in blocks}) != 1:
                problems.append(f"fuse_qkv {twin_name}: the q, k, v shapes {[b.shape for b in blocks]} do not "
                                f"concatenate along axis 0")
            else:
                out[twin_name] = np.concatenate(blocks, axis=0)
                continue
            del out[twin_name]
        return out, problems, sources

    def to_twin(self, state) -> "OrderedDict[str, np.ndarray]":
        """{twin name: host array in the twin's layout} from a torch module or state dict (tensors or
        arrays); ValueError listing every entry that cannot be mapped. Remembers the torch names."""
        out, problems, _ = self.convert(state)
        if problems:
            raise ValueError("TorchMapping.to_twin: " + "; ".join(problems))
        return out

    def to_torch(self, arrays, torch_names=None) -> "OrderedDict[str, np.ndarray]":
        """{torch name: host array in torch's layout} from the twin's {name: array} (weights, grads).

        torch_names: the torch entries wanted (default: those last passed to to_twin). An entry whose
        twin source is not in `arrays` (or is dropped) is left out: the caller decides what that means.
        """
        if torch_names is None:
            if self.torch_names is None:
                raise ValueError("TorchMapping.to_torch: pass torch_names (no state has gone through to_twin yet)")
            torch_names = self.torch_names
        out = OrderedDict()
        for name in torch_names:
            r = self.route(name)
            if r.twin_name is None or r.twin_name not in arrays or arrays[r.twin_name] is None:
                continue
            a = _host(arrays[r.twin_name])
            if r.block is not None:
                if a.shape[0] % 3:
                    raise ValueError(f"TorchMapping.to_torch: {r.twin_name} has shape {a.shape}; a fused q/k/v "
                                     f"array needs a first axis divisible by 3")
                a = np.split(a, 3, axis=0)[r.block]
            out[name] = np.ascontiguousarray(a.T if r.transpose and a.ndim == 2 else a)
        return out


def _items(state):
    """(name, value) pairs of a torch module (its state_dict) or of a mapping."""
    if hasattr(state, "state_dict") and callable(state.state_dict):
        state = state.state_dict()
    return list(state.items())


def _host(v) -> np.ndarray:
    """A NumPy copy of a torch tensor (bfloat16 widened to float32, exactly), Tensor or array."""
    if not isinstance(v, Tensor) and hasattr(v, "detach") and hasattr(v, "cpu"):   # torch's, without importing torch
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":
            v = v.float()
        return np.array(v.numpy())
    if isinstance(v, Tensor):
        v = v.data
    return np.array(backend.to_numpy(v) if backend.is_array(v) else v)


# ----------------------------------------------------------------------------- loading, with diagnoses

def _hint(twin_shape, torch_shape) -> str:
    """What a shape pair suggests: '' (equal), 'transposed?', 'fused q/k/v?', or None (unrelated)."""
    a, b = tuple(twin_shape), tuple(torch_shape)
    if a == b:
        return ""
    if len(a) == 2 and a == b[::-1]:
        return "transposed? (transpose=)"
    if len(a) == len(b) and a and a[0] == 3 * b[0] and a[1:] == b[1:]:
        return "fused q/k/v? (fuse_qkv=)"
    return None


def _closest(name: str, candidates: dict):
    """(candidate, hint) closest to `name` among {candidate: hint from _hint}: those whose shape fits
    (hint not None) first, then by difflib's similarity ratio (at least 0.4); (None, None) if none."""
    scored = [(hint is not None, difflib.SequenceMatcher(None, name, cand).ratio(), cand, hint)
              for cand, hint in candidates.items()]
    scored = [s for s in scored if s[1] >= 0.4]
    if not scored:
        return None, None
    _, _, cand, hint = max(scored, key=lambda s: s[:2])              # ties: the first in order
    return cand, hint


def load_torch_state_dict(twin, torch_module_or_state_dict, rename=None, fuse_qkv=None, transpose=(),
                          strict: bool = True, cast: bool = False, mapping: TorchMapping = None) -> TorchMapping:
    """Copy a torch module's weights (or a state dict's) into the npformer module `twin`, renamed,
    transposed and fused as TorchMapping(rename, transpose, fuse_qkv) says, or as `mapping` says.

    Goes through ``twin.load_state_dict``, so the twin keeps its dtype and device. Values are never
    rounded silently: float32 weights load into a float32 or float64 twin exactly; float64 weights
    need a float64 twin (build it under ``npformer.default_dtype(np.float64)``), or cast=True to
    accept the rounding. Twin buffers computed from a formula (positional tables) that torch does not
    provide keep their own values.
    Raises one ValueError listing every missing twin entry, unexpected torch entry (strict=True) and
    mis-shaped entry at once, each with the closest name on the other side and "transposed?" or
    "fused q/k/v?" when the shapes suggest it. Returns the mapping, also kept as ``twin.torch_mapping``.
    """
    if mapping is None:
        mapping = TorchMapping(rename=rename, transpose=transpose, fuse_qkv=fuse_qkv)
    elif rename is not None or fuse_qkv or transpose:
        raise ValueError("load_torch_state_dict: pass either mapping= or rename=/fuse_qkv=/transpose=, not both")
    where = f"load_torch_state_dict into {type(twin).__name__}"
    arrays, problems, sources = mapping.convert(torch_module_or_state_dict)
    own = {k: tuple(v.shape) for k, v in twin.state_dict().items()}
    computed = {f"{p}.{b}" if p else b for p, m in twin.named_modules() for b in m._buffer_formulas}
    missing = [k for k in own if k not in arrays and k not in computed and not _from_fused(k, problems)]
    unexpected = [k for k in arrays if k not in own]
    wrong = [k for k in arrays if k in own and own[k] != arrays[k].shape]

    def torch_side(k):
        names = sources.get(k, [k])
        return ", ".join(names) + ("" if names == [k] else f" (mapped to {k})")
    lines = [f"  cannot map: {p}" for p in problems]
    for k in wrong:
        hint = _hint(own[k], arrays[k].shape)
        lines.append(f"  mis-shaped: twin {k} {own[k]} <- torch {torch_side(k)} {arrays[k].shape}"
                     + (f": {hint}" if hint else ""))
    if strict:
        for k in missing:
            hints = {u: _hint(own[k], arrays[u].shape) for u in unexpected}
            thirds = [u for u in unexpected if hints[u] and hints[u].startswith("fused")]
            if len(thirds) >= 3:                            # name the three closest, in torch's order
                best = sorted(thirds, key=lambda u: -difflib.SequenceMatcher(None, k, u).ratio())[:3]
                lines.append(f"  missing: twin {k} {own[k]}: no torch entry maps to it; fused q/k/v? (fuse_qkv=) "
                             f"of {', '.join(torch_side(u) for u in thirds if u in best)} {arrays[best[0]].shape}")
                continue
            cand, hint = _closest(k, hints)
            lines.append(f"  missing: twin {k} {own[k]}: no torch entry maps to it"
                         + (f"; closest torch entry: {torch_side(cand)} {arrays[cand].shape}"
                            + (f", {hint}" if hint else "") if cand else ""))
        for k in unexpected:
            cand, hint = _closest(k, {m: _hint(own[m], arrays[k].shape) for m in missing})
            lines.append(f"  unexpected: torch {torch_side(k)} {arrays[k].shape}: the twin has no {k}"
                         + (f"; closest twin entry: {cand} {own[cand]}" + (f", {hint}" if hint else "")
                            if cand else ""))
    if lines:
        counts = [f"{len(x)} {w}" for x, w in ((problems, "unmappable"), (missing, "missing"),
                                                (unexpected, "unexpected"), (wrong, "mis-shaped")) if x]
        raise ValueError(f"{where}: {', '.join(counts)} (shapes as mapped to the twin's layout; fix with "
                         f"rename=, transpose=, fuse_qkv=):\n" + "\n".join(lines))
    twin.load_state_dict({k: v for k, v in arrays.items() if k in own}, strict=False, cast=cast)
    twin.torch_mapping = mapping
    return mapping


def _from_fused(name: str, problems: list) -> bool:
    """True when `name` is a fused twin entry that a problem line already reports."""
    return any(p.startswith(f"fuse_qkv {name}:") for p in problems)
