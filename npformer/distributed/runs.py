"""The start of a training run over ranks, the same for every command (pretrain, finetune, seq2seq).

    summary, comm = run_launched(train, cfg, device)     # the command: one process, or one rank of N
    with claim_on_rank_0(comm, out, "seq2seq", resume):  # rank 0 alone holds the run directory
        ckpt = resume_point(out, comm, check)             # every rank: the checkpoint rank 0 chose

``stage(comm)`` wraps a start-up step so that an error on any rank is raised on all (faults.py);
``quiet`` is the log of ranks other than 0. The training package is imported inside the functions:
it imports this package.
"""

from __future__ import annotations

import contextlib

from .faults import fail_together, together
from .launch import communicator, detect


def quiet(*args, **kwargs) -> None:
    """The log of ranks other than 0."""


def stage(comm):
    """A start-up stage: with ranks (comm not None), an error on any of them is one RankError on all."""
    return contextlib.nullcontext() if comm is None else together(comm)


@contextlib.contextmanager
def claim_on_rank_0(comm, out: str, kind: str, resume: bool):
    """Collective: once every rank is past the command line's look at `out` (a barrier), rank 0 claims
    and locks it (training.rundir.RunDir) for the body; an error claiming it is raised on every rank."""
    from ..training.rundir import RunDir
    comm.barrier()
    run = None
    with together(comm):
        run = RunDir.claim(out, kind, resume=resume) if comm.rank == 0 else None
    with run or contextlib.nullcontext():
        yield


def resume_point(out: str, comm, check=None):
    """The checkpoint a resume continues from: rank 0 chooses it (the newest intact one in `out`) and
    runs check(ckpt) on it (e.g. check_resumable, set_aside); the other ranks load the one it chose.
    comm: the run's communicator, or None for one process."""
    from ..training.checkpoint import load_checkpoint
    from ..training.rundir import load_for_resume
    root = comm is None or comm.rank == 0
    with stage(comm):
        ckpt = load_for_resume(out) if root else None
        if root and check is not None:
            check(ckpt)
    if comm is not None:
        path = comm.broadcast_json(ckpt.path if root else None)
        with stage(comm):
            ckpt = ckpt or load_checkpoint(path)
    return ckpt


def run_launched(train, cfg, device: str):
    """(train(cfg), None) in this process; started by an MPI launcher, (train(cfg, comm=comm), comm) as
    one of its ranks on `device`, where an error on one rank ends all of them in one line."""
    if detect() is None:
        return train(cfg), None
    comm = communicator(device=device)
    with fail_together(comm):
        return train(cfg, comm=comm), comm
