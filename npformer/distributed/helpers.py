"""What a training loop calls to keep its ranks in step: gradients, parameters, optimizer state.

    loss.backward()                                   # each rank: the gradient of its share
    allreduce_gradients(model, comm)                  # now every rank holds the mean gradient
    opt.step()                                        # the same update on every rank

    broadcast_parameters(model, comm)                 # at the start: rank 0's weights everywhere
    broadcast_optimizer_state(opt, comm)              # and its optimizer state (after a resume)

``allreduce_gradients`` packs every gradient of one dtype into one flat buffer and makes one
allreduce call for it (a call per parameter would pay the latency of each call ~50 times for
a small GPT). The buffer ends with one entry per parameter, 1 where this rank has a gradient:
after the sum, a parameter that no rank gave a gradient keeps ``grad = None`` (the optimizer
skips it, as it would in one process), and one that some rank gave a gradient gets the sum,
with zeros from the others. Afterwards each ``.grad`` is a view of the reduced buffer.
"""

from __future__ import annotations

import numpy as np

from .. import backend

ARRAY = "npformer.array"        # marks an array's [shape, dtype] in broadcast_optimizer_state's JSON header


def _params(model_or_params) -> list:
    params = model_or_params.parameters() if hasattr(model_or_params, "parameters") else model_or_params
    return list(params)


def _by_dtype(params) -> list:
    """[(dtype, [params])] in a fixed order (by dtype name, then parameter order): the same on every rank."""
    groups = {}
    for p in params:
        groups.setdefault(np.dtype(p.dtype).str, []).append(p)
    return [(np.dtype(k), groups[k]) for k in sorted(groups)]


def allreduce_gradients(model_or_params, comm, op: str = "mean") -> None:
    """Replace each parameter's ``.grad`` by its sum ("sum") or mean ("mean") over the ranks.

    model_or_params: a Module or a list of parameters, the same on every rank. A missing grad
    counts as zeros; the mean divides by comm.size. One allreduce per parameter dtype.
    """
    if op not in ("mean", "sum"):
        raise ValueError(f"allreduce_gradients: op must be 'mean' or 'sum'; got {op!r}")
    for dtype, params in _by_dtype(_params(model_or_params)):
        xp = backend.get_array_module(params[0].data)
        sizes = [p.data.size for p in params]
        total = sum(sizes)
        flat = xp.zeros(total + len(params), dtype=dtype)          # (sum of sizes + one flag each,)
        at = 0
        for i, (p, n) in enumerate(zip(params, sizes)):
            if p.grad is not None:
                flat[at:at + n] = p.grad.reshape(-1)
                flat[total + i] = 1
            at += n
        comm.allreduce(flat, "sum")
        if op == "mean" and comm.size > 1:
            flat[:total] /= comm.size
        has = backend.to_numpy(flat[total:]) > 0
        at = 0
        for i, (p, n) in enumerate(zip(params, sizes)):
            p.grad = flat[at:at + n].reshape(p.shape) if has[i] else None
            at += n


def broadcast_parameters(model_or_params, comm, root: int = 0) -> None:
    """Copy the root's parameter values into every rank's parameters, in place (one call per dtype).

    In place, so that arrays sharing the parameters' memory (``workers.ShardWorkers``) see them."""
    for dtype, params in _by_dtype(_params(model_or_params)):
        xp = backend.get_array_module(params[0].data)
        flat = xp.concatenate([p.data.reshape(-1) for p in params]) if params else xp.zeros(0, dtype)
        comm.broadcast(flat, root)
        at = 0
        for p in params:
            p.data[...] = flat[at:at + p.data.size].reshape(p.shape)
            at += p.data.size


def broadcast_optimizer_state(opt, comm, root: int = 0) -> None:
    """Give every rank's optimizer the root's state (options, step counts, moments).

    The state's plain values travel as JSON, its arrays as one host buffer per dtype; each rank
    then loads it with ``opt.load_state_dict``, which checks it against its own parameters."""
    state = opt.state_dict() if comm.rank == root else {}
    header = comm.broadcast_json(
        {k: ({ARRAY: [list(v.shape), v.dtype.str]} if isinstance(v, np.ndarray) else v)
         for k, v in state.items()} if comm.rank == root else None, root)
    arrays = {k: v[ARRAY] for k, v in header.items() if isinstance(v, dict) and ARRAY in v}
    loaded = {k: v for k, v in header.items() if k not in arrays}
    for dt in sorted({dt for _, dt in arrays.values()}):
        keys = [k for k in arrays if arrays[k][1] == dt]
        sizes = [int(np.prod(arrays[k][0])) for k in keys]
        flat = (np.concatenate([state[k].reshape(-1) for k in keys]).astype(dt, copy=False)
                if comm.rank == root else np.empty(sum(sizes), dtype=dt))
        comm.broadcast(flat, root)
        at = 0
        for k, n in zip(keys, sizes):
            loaded[k] = flat[at:at + n].reshape(arrays[k][0]).copy()
            at += n
    if comm.rank != root:
        opt.load_state_dict(loaded)


def any_rank(comm, flag: bool) -> bool:
    """Whether `flag` is true on at least one rank (collective: every rank gets the same answer)."""
    return bool(comm.allreduce(np.array([1.0 if flag else 0.0]), "max")[0] > 0)
