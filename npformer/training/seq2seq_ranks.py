"""``npformer seq2seq`` over ranks (``mpiexec -n N``): the parts of seq2seq.py's loop that know of them.

The same scheme as ``npformer finetune`` (docs/distributed.md). ``--batch-size`` stays the global
batch: every rank draws the same global batch from the same batch generator, pads it as one
process does, and runs its rows ``distributed.share(B, rank, N)``. The loss is the mean over the
n non-padding target tokens of the batch (label smoothing is per token, so it changes nothing
here); rank r's rows hold n_r of them, so each rank backpropagates its mean weighted by n_r / n
and an allreduce sums:

    grad = sum_r (n_r / n) grad loss_r = grad (1/n) sum_tokens loss_t

the single-process gradient of the full batch, to float rounding (a rank's matrix products run
over fewer rows). Dropout: each step every rank draws N seeds from the run's one dropout
generator and uses seed r, so the run repeats bit for bit for a given N and the checkpoint
needs only that generator's state. Rank 0 alone claims ``--out``, logs, evaluates and writes.
"""

from __future__ import annotations

import numpy as np

from .. import __version__, backend, distributed, random
from ..data.tasks import PAD


def train_ranks(cfg, log, comm) -> dict:
    """seq2seq.train over the ranks of `comm`: checks agreed by every rank, then rank 0 claims cfg.out."""
    from .seq2seq import _train
    if comm.rank != 0:
        log = distributed.quiet
    with distributed.together(comm):
        cfg = cfg.checked()
        distributed.share(cfg.batch_size, comm.rank, comm.size)       # the global batch splits evenly
    with distributed.claim_on_rank_0(comm, cfg.out, "seq2seq", cfg.resume):
        return _train(cfg, log, comm)


def start_together(comm, model, opt, facts: dict) -> None:
    """Collective: check that every rank has the same `facts` (settings, task, step) and npformer
    version (one RankError on all otherwise), then give every rank rank 0's weights and optimizer state."""
    distributed.check_same(comm, {"npformer": __version__, **facts})
    distributed.broadcast_parameters(model, comm)
    distributed.broadcast_optimizer_state(opt, comm)


def rank_step(model, batch, label_smoothing: float, comm, device: str) -> float:
    """Forward and backward of this rank's rows of the global batch, then the allreduce.

    batch: host (src (B, S), tgt_in (B, T), tgt_out (B, T)), the same on every rank. Afterwards
    every rank's ``.grad`` holds the full batch's gradient; returns the full batch's loss (the
    same float on every rank). Draws comm.size seeds from the device's default generator (the
    run's dropout generator in the loop) and runs its rows' dropout on seed comm.rank."""
    from .seq2seq import loss_fn
    tgt_out = batch[2]
    rows = distributed.share(len(tgt_out), comm.rank, comm.size)
    n, mine = int((tgt_out != PAD).sum()), int((tgt_out[rows] != PAD).sum())
    seeds = random.default_generator(device).integers(0, 2**63 - 1, size=comm.size)
    part = 0.0
    if mine:                                                         # rows without a target add nothing
        src, tgt_in, tgt_out = (backend.to_device(a[rows], device) for a in batch)   # (B/N, S), (B/N, T) x 2
        with random.thread_default_generator(random.Generator(int(seeds[comm.rank]), device), device):
            loss = loss_fn(model, src, tgt_in, tgt_out, label_smoothing)             # mean over its n_r tokens
        (loss * (mine / n)).backward()
        part = loss.item() * (mine / n)
    distributed.allreduce_gradients(model, comm, "sum")
    return float(comm.allreduce(np.array([part], dtype=np.float64), "sum")[0])


def stop_signal(stop, comm):
    """The signal that asked the run to stop (GracefulStop), or None; with ranks, collective: the
    largest any rank received (SIGTERM over SIGINT), the same on every rank."""
    if comm is None:
        return stop.signum
    signum = int(comm.allreduce(np.array([float(stop.signum or 0)]), "max")[0])
    return signum or None


def ranks_note(saved: int, ranks: int) -> str:
    """What a resume on another rank count than the run so far changes ("; note: ..."), or ""."""
    if saved == ranks:
        return ""
    return (f"; note: the run so far used {saved} rank(s) and this one uses {ranks}: the rows of each rank and "
            f"the dropout seeds differ, so the float sums (and, with --dropout, the masks) differ from a run "
            f"that kept {saved}")
