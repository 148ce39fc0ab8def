"""The data-parallel training step over ranks: the shards of one process, shared out.

One process cuts each batch into S shards (``training.parallel.plan_shards``: shard i gets
the weight n_i / n, its share of the n targets the batch counts, and a dropout seed drawn from the
run's dropout generator) and sums the weighted shard gradients. Over N ranks, every rank makes
the *same* plan of the same global batch (the same sampler, the same dropout generator), runs
the S / N consecutive shards ``sampler.share(S, rank, N)`` (its share of the batch's rows),
and an allreduce sums the ranks' gradients:

    grad = sum_r sum_{i in rank r} (n_i / n) grad loss_i = sum_i (n_i / n) grad loss_i

the gradient of the full-batch loss, which one process with the same S shards computes as
well. The terms are the same arrays, bit for bit (same rows, same dropout masks); only the order
of the final sums differs, so N ranks and one process agree to rounding (float64: ~1e-16
relative). The rank count changes no dropout mask, so a run may even resume on another count.

S: ``shards``, or by default as one process with N * workers workers would cut the batch
(pieces of about 512 tokens, a multiple of N * workers; on a GPU, N). S must be a multiple of N.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ..training import parallel
from .helpers import allreduce_gradients
from .sampler import share


def global_shards(batch: int, tokens: int, size: int, workers: int = 1, device: str = "cpu", shards=None) -> int:
    """S, the shards a global batch of `batch` rows (`tokens` elements) is cut into over `size` ranks.

    Raises ValueError (naming the flag) unless `size` divides the batch and S."""
    share(batch, 0, size)                                  # the batch divides evenly
    if shards is None:
        shards = parallel.default_shards(tokens, size * workers, device) if device == "cpu" else size
    elif isinstance(shards, bool) or not isinstance(shards, (int, np.integer)) or shards < 1:
        raise ValueError(f"--shards must be a positive integer; got {shards!r}")
    shards = min(int(shards), batch)
    if shards % size:
        raise ValueError(f"--shards ({shards}) must be a multiple of the rank count ({size}): every rank runs "
                         f"the same number of shards")
    return shards


def rank_pieces(x, y, comm, workers: int = 1, shards=None, ignore_index: int = -1) -> list:
    """This rank's pieces [(x_i, y_i, weight_i, seed_i)] of the global batch (x, y): (B, ...) each.

    Every rank must call it with the same batch at the same point: it draws the shards' dropout
    seeds from the device's default generator (the run's dropout generator in pretrain)."""
    parallel.check_batch(x, y)
    device = backend.device_of(x)
    s = global_shards(x.shape[0], x.size, comm.size, workers, device, shards)
    s, _, pieces = parallel.plan_shards(x, y, comm.size * workers, s, ignore_index, device)
    return pieces[share(s, comm.rank, comm.size)]


def forward_backward(model, x, y, comm, workers: int = 1, ignore_index: int = -1, shards=None, pool=None) -> float:
    """Forward and backward of this rank's share of the global batch, then the allreduce.

    x, y: the global batch (B, ...), the same on every rank. workers: threads this rank runs its
    shards on, or `pool`, a ``training.workers.ShardWorkers`` of the model to run them on its
    processes. Afterwards every rank's ``.grad`` holds the full-batch gradient (one allreduce of
    one flat buffer per dtype). Returns the full-batch loss (the same float on every rank).
    """
    pieces = rank_pieces(x, y, comm, workers, shards, ignore_index)
    if len(pieces) == 1 and pieces[0][3] is None:          # one rank, one shard: a plain step
        loss = parallel.forward_backward(model, x, y, 1, ignore_index, 1)
    elif pool is not None:
        loss = pool.run_pieces(pieces)
    else:
        loss = parallel.run_pieces(model, pieces, workers, backend.device_of(x))
    allreduce_gradients(model, comm, "sum")
    return float(comm.allreduce(np.array([loss], dtype=np.float64), "sum")[0])
