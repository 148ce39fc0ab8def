"""Data-parallel forward/backward on CPU threads: each thread runs the whole model on its rows.

NumPy evaluates every elementwise operation on one core. Splitting each op over threads
costs a thread hand-off per op (80-100 us on a virtual machine, more than many ops take),
and OpenBLAS's own worker threads keep spinning after each GEMM and take the cores such
threads would need. So npformer splits the *batch* instead: the batch axis is cut into
shards, every thread runs the forward and the backward of its shards with a single-threaded
BLAS (``npformer.cpu.blas_threads(1)``), and NumPy releases the GIL inside its loops, so the
threads overlap almost completely. There is one hand-off per step.

By default a shard holds about TOKENS_PER_SHARD tokens and the shard count is a multiple of
the thread count; a thread with several shards runs them one after another, accumulating
their gradients, which keeps fewer activations alive at once and runs no slower (smaller
arrays stay in the caches).

The gradients are those of the full-batch loss. With loss_i the shard's mean loss over its
n_i counted targets (targets equal to ``ignore_index`` do not count) and N = sum n_i,

    loss = sum_i (n_i / N) loss_i,    so    d loss = sum_i (n_i / N) d loss_i,

which is the mean over all N targets. Each shard's backward hands its leaf gradients to a sink
(``autograd.backward(loss, sink=...)``) instead of ``.grad``; they are summed per thread in shard
order, and added to ``.grad`` in thread order once every thread has finished (``accumulate``):
the result does not depend on timing, and a shard that raises leaves every ``.grad`` as it was.
The sums are split differently from a one-thread step, so the two agree to rounding (float64:
~1e-15 relative), not bit for bit.

The optimizer step can run on threads too: ``step_in_threads(opt, threads)`` updates balanced
groups of parameters concurrently, bit for bit as ``opt.step()`` does.

The data-parallel entry points (``forward_backward`` here, ``workers.ShardWorkers``) tune the
C allocator on the CPU (``cpu.tune_allocator``; ``NPFORMER_TUNE_MALLOC=0`` keeps the system's
settings): ``import npformer`` alone leaves it alone.

Dropout: shard i draws from its own generator, seeded at every step from the global
generator of the device, so a run is reproducible for a given thread and shard count.
"""

from __future__ import annotations

import contextlib

import numpy as np

from .. import autograd, backend, cpu, random

TOKENS_PER_SHARD = 512   # default shard size (elements of x, i.e. tokens for (B, T) ids)


def default_threads(device: str = "cpu") -> int:
    """Threads the data-parallel step uses by default: the usable cores on the CPU, else 1.

    1 as well when the BLAS library's thread count cannot be set (MKL, Accelerate): several
    threads each calling a multi-threaded BLAS would oversubscribe the cores.
    """
    if device != "cpu" or not cpu.blas_controllable():
        return 1
    return cpu.usable_cores()


def check_threads(threads, device: str = "cpu") -> int:
    """`threads` validated (a positive int; None means default_threads(device))."""
    if threads is None:
        return default_threads(device)
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"threads must be a positive integer; got {threads!r}")
    if threads > 1 and device != "cpu":
        raise ValueError(f"threads={threads} splits the batch over CPU threads, but the model is on {device}; "
                         f"use threads=1 (a GPU runs each op in parallel already)")
    return int(threads)


def blas_context(threads: int):
    """A context for a whole training step run with `threads` data-parallel threads.

    With threads > 1 it keeps OpenBLAS at one thread for the step's other BLAS calls too
    (the gradient norm's dot products): a multi-threaded BLAS call leaves OpenBLAS's workers
    spinning for a while, on the cores the next step's threads need.
    """
    return cpu.blas_threads(1) if threads > 1 else contextlib.nullcontext()


def check_batch(x, y) -> None:
    """Raise ValueError unless x and y are arrays with the same, non-zero batch size."""
    if getattr(x, "shape", None) is None or getattr(y, "shape", None) is None or len(x.shape) == 0:
        raise ValueError("forward_backward: x and y must be arrays with a batch axis")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"forward_backward: x has batch size {x.shape[0]} but y has {y.shape[0]} "
                         f"(shapes {tuple(x.shape)} and {tuple(y.shape)})")
    if x.shape[0] == 0:
        raise ValueError(f"forward_backward: the batch is empty (x has shape {tuple(x.shape)})")


def default_shards(tokens: int, threads: int, device: str) -> int:
    """Shards of a batch of `tokens` when none are asked for: on the CPU about TOKENS_PER_SHARD
    tokens each, a multiple of `threads`; on a GPU one."""
    return threads * max(1, -(-tokens // (threads * TOKENS_PER_SHARD))) if device == "cpu" else 1


def plan_shards(x, y, threads: int, shards, ignore_index: int, device: str):
    """Cut a batch for forward_backward: (shards, threads, [(x_i, y_i, weight_i, seed_i)]).

    Validates `shards`; caps shards at the batch size and threads at shards; weights are the
    shards' shares of the counted targets; seeds (one dropout stream per shard) are drawn from
    the device's global generator.
    """
    if shards is None:
        shards = default_shards(x.size, threads, device)
    elif isinstance(shards, bool) or not isinstance(shards, (int, np.integer)) or shards < 1:
        raise ValueError(f"shards must be a positive integer; got {shards!r}")
    shards = min(int(shards), x.shape[0])
    threads = min(threads, shards)
    if shards == 1:
        return 1, 1, [(x, y, 1.0, None)]
    q, r = divmod(x.shape[0], shards)                 # the first r shards get one row more
    edges = [i * q + min(i, r) for i in range(shards + 1)]
    xs = [x[a:b] for a, b in zip(edges[:-1], edges[1:])]
    ys = [y[a:b] for a, b in zip(edges[:-1], edges[1:])]
    counts = [int((s != ignore_index).sum()) for s in ys]
    total = sum(counts)
    weights = [c / total if total else len(s) / len(y) for c, s in zip(counts, ys)]
    seeds = random.default_generator(device).integers(0, 2**63 - 1, size=shards)
    return shards, threads, [(xs[i], ys[i], weights[i], int(seeds[i])) for i in range(shards)]


def run_shards(model, pieces, device: str = "cpu", sink=None):
    """Forward and backward of `pieces` [(x, y, weight, seed)] one after another, on this thread.

    Returns ([(leaf, summed gradient)], summed weighted loss). The leaf gradients of the pieces
    are summed in order, each as backward completes it; nothing touches ``.grad``.
    sink: a callable ``sink(leaf, gradient)`` (see ``autograd.backward``) that takes every
    piece's gradients instead (the caller sums them); the list returned is then empty.
    """
    summing = _Summing() if sink is None else sink
    loss_part = 0.0
    for x, y, weight, seed in pieces:
        if weight == 0.0:                                      # nothing counted here
            continue
        with random.thread_default_generator(random.Generator(seed, device), device):
            _, loss = model(x, y)
            autograd.backward(loss * weight, sink=summing)
        loss_part += weight * loss.item()
    return (summing.pairs() if sink is None else []), loss_part


class _Summing:
    """A leaf-gradient sink (autograd.backward's `sink`) summing each leaf's gradients in arrival order."""

    def __init__(self):
        self._summed = {}                                      # id(leaf) -> [leaf, gradient, ours]

    def __call__(self, t, g) -> None:
        entry = self._summed.get(id(t))
        if entry is None:
            self._summed[id(t)] = [t, g, False]                # g may be shared: not written
        elif entry[2]:
            entry[1] += g
        else:
            entry[1], entry[2] = entry[1] + g, True            # a new array, ours to add into

    def pairs(self) -> list:
        return [(t, g) for t, g, _ in self._summed.values()]


def accumulate(pairs, threads: int = 1) -> None:
    """Add each ``(leaf, gradient)`` pair to the leaf's ``.grad``, as backward would have.

    A leaf's gradients are added in the order of `pairs` (so the float result is fixed); a leaf
    without a ``.grad`` gets the sum of its first two as a new array (one pass instead of a
    copy and an add). No gradient array in `pairs` is written. threads: the leaves are shared
    out among this many threads.
    """
    by_leaf = {}
    for t, g in pairs:
        by_leaf.setdefault(id(t), (t, []))[1].append(g)

    def add(items):
        for t, gs in items:
            if t.grad is None and len(gs) > 1 and gs[0].dtype == gs[1].dtype == t.dtype:
                t.grad = gs[0] + gs[1]
                gs = gs[2:]
            for g in gs:
                t._accumulate(g)
    items = list(by_leaf.values())
    parts = [items[i::threads] for i in range(threads)] if threads > 1 else [items]
    cpu.run_in_threads([lambda part=part: add(part) for part in parts if part])


def _balanced(work: list, parts: int) -> list:
    """`work` [(parameter, ...)] cut into at most `parts` consecutive runs of about equal numbers of elements."""
    sizes = [item[0].data.size for item in work]
    total = sum(sizes)
    if parts <= 1 or len(work) <= 1 or total == 0:
        return [work]
    runs, start, acc = [], 0, 0
    for i, n in enumerate(sizes):
        acc += n
        if acc >= total * (len(runs) + 1) / parts and len(runs) < parts - 1:
            runs.append(work[start:i + 1])
            start = i + 1
    runs.append(work[start:])
    return [r for r in runs if r]


def step_in_threads(opt, threads: int) -> None:
    """``opt.step()`` with the parameters split into `threads` groups of about equal size, updated concurrently.

    Every parameter gets the same update, bit for bit, as in ``opt.step()`` (each one is
    ``opt.update(p, options)`` on one thread; NumPy releases the GIL in its loops). All grads
    are checked before any parameter changes. threads: a positive int; None for default_threads().
    """
    threads = check_threads(threads, "cpu")
    work = opt.params_to_update()
    cpu.run_in_threads([lambda part=part: [opt.update(p, opts) for p, opts in part]
                        for part in _balanced(work, threads)])


def forward_backward(model, x, y, threads=None, ignore_index: int = -1, shards=None) -> float:
    """Run ``model(x, y) -> (logits, loss)`` and its backward over shards of the batch, on threads.

    x: (B, ...) inputs; y: (B, ...) integer targets, `ignore_index` marking targets the
    loss skips (GPT uses -1). The model's loss must be the mean over its counted targets.
    threads: None for default_threads(device). shards: how many pieces the batch is cut
    into; thread j runs shards j, j + threads, ... one after another (gradient accumulation),
    so more shards than threads lowers the activation memory. None: a multiple of `threads`
    with about TOKENS_PER_SHARD elements of x per shard (activations that fit the caches
    better; measured no slower than one shard per thread, with 30% less peak memory on the
    large benchmark config). threads = shards = 1 is a plain forward and backward.
    Gradients are added to each parameter's ``.grad`` (as ``loss.backward()`` does).
    Returns the full-batch loss as a Python float. On the CPU it first tunes the C allocator
    (``cpu.tune_allocator``, once per process).
    """
    check_batch(x, y)
    device = backend.device_of(x)
    if device == "cpu":
        cpu.tune_allocator()
    shards, threads, pieces = plan_shards(x, y, check_threads(threads, device), shards, ignore_index, device)
    if shards == 1:
        _, loss = model(x, y)
        loss.backward()
        return loss.item()
    return run_pieces(model, pieces, threads, device)


def run_pieces(model, pieces, threads: int = 1, device: str = "cpu") -> float:
    """Forward and backward of `pieces` [(x, y, weight, seed)] (from plan_shards) on `threads` threads.

    Thread j runs pieces j, j + threads, ... one after another; the gradients are added to
    ``.grad`` in thread order once all have finished. Returns the sum of the pieces' weighted
    losses. forward_backward uses it for a whole batch; distributed.step for one rank's pieces.
    """
    threads = max(1, min(threads, len(pieces)))

    def run_thread(j):                  # shards j, j + threads, ...
        return run_shards(model, pieces[j::threads], device)

    with cpu.blas_threads(1):
        results = cpu.run_in_threads([lambda j=j: run_thread(j) for j in range(threads)])
        accumulate([pair for grads, _ in results for pair in grads], threads)   # in thread order
    return float(sum(part for _, part in results))
