"""Each rank's share of a global batch.

``--batch-size`` stays the *global* batch: with N ranks, rank r trains on rows
``share(B, r, N)`` of it, B / N contiguous rows. Every rank runs the same seeded sampler, so
all ranks draw the same global batch, in the same order as a single process, and each keeps its
rows (drawing B window offsets costs microseconds; nothing is sent). The sampler's state is
therefore the same on every rank, and a checkpoint written by rank 0 resumes all of them.
"""

from __future__ import annotations


def share(n: int, rank: int, size: int) -> slice:
    """Rank `rank`'s rows of a batch of `n`: slice(rank * n // size, (rank + 1) * n // size).

    Raises ValueError unless `size` divides `n` (each rank gets the same number of rows)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"the rank count must be a positive integer; got {size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < size:
        raise ValueError(f"rank must be in [0, {size}); got {rank!r}")
    if n % size:
        raise ValueError(f"--batch-size ({n}) must be divisible by the rank count ({size}): it is the global "
                         f"batch, split evenly across the ranks")
    k = n // size
    return slice(rank * k, (rank + 1) * k)


class DistributedSampler:
    """A batch sampler that gives this rank its share of every global batch.

    sampler: anything with ``sample() -> (x, y)`` arrays of B rows (e.g. data.BatchSampler),
    seeded the same on every rank; comm: the run's communicator (its rank and size).
    sample() -> (x[s], y[s]) with s = share(B, comm.rank, comm.size): (B / N, ...) each.
    """

    def __init__(self, sampler, comm):
        self.sampler, self.rank, self.size = sampler, comm.rank, comm.size
        batch = getattr(sampler, "batch_size", None)
        if batch is not None:
            share(batch, self.rank, self.size)          # refuse an indivisible batch at once

    def sample(self):
        x, y = self.sampler.sample()
        s = share(len(x), self.rank, self.size)
        return x[s], y[s]

    def state_dict(self) -> dict:
        """The wrapped sampler's state (the same on every rank)."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
