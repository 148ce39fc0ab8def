"""Is this process one rank of a launched run, and which communicator does it use?

``mpiexec`` (MPICH's hydra, Open MPI, MVAPICH, Slurm's PMI) starts N copies of a command and
tells each its place through environment variables; ``detect()`` reads them without importing
MPI, so ``npformer pretrain`` can decide before anything heavy is loaded:

    launcher       rank / size variables                        local rank
    MPICH hydra    PMI_RANK / PMI_SIZE                          MPI_LOCALRANKID
    Open MPI       OMPI_COMM_WORLD_RANK / OMPI_COMM_WORLD_SIZE   OMPI_COMM_WORLD_LOCAL_RANK
    MVAPICH        MV2_COMM_WORLD_RANK / MV2_COMM_WORLD_SIZE     MV2_COMM_WORLD_LOCAL_RANK
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .comm import SingleProcess

LAUNCHERS = (("MPICH hydra", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
             ("Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
             ("MVAPICH", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK"))
KINDS = ("single", "mpi", "nccl")


@dataclass(frozen=True)
class Launch:
    """What the launcher told this process: its rank, the rank count, its rank on this machine."""
    launcher: str
    rank: int
    size: int
    local_rank: int = None          # None: the launcher does not say (MPI's shared-memory split does)


def detect(environ=None):
    """The Launch described by `environ` (os.environ by default), or None without a launcher.

    Raises ValueError for variables that are set but not a rank in [0, size)."""
    env = os.environ if environ is None else environ
    for name, rank_var, size_var, local_var in LAUNCHERS:
        if rank_var in env and size_var in env:
            try:
                rank, size = int(env[rank_var]), int(env[size_var])
                local = int(env[local_var]) if env.get(local_var, "") != "" else None
            except ValueError:
                raise ValueError(f"{name}: {rank_var}={env[rank_var]!r}, {size_var}={env[size_var]!r} are not "
                                 f"integers") from None
            if not (size >= 1 and 0 <= rank < size):
                raise ValueError(f"{name}: {rank_var}={rank} is not a rank of {size_var}={size}")
            return Launch(name, rank, size, local)
    return None


def communicator(kind: str = None, device: str = "cpu"):
    """A communicator: "single", "mpi", "nccl", or None to choose from the environment
    (single without a launcher; under one, "mpi" for the cpu and "nccl" for the gpu)."""
    if kind is None:
        kind = "single" if detect() is None else ("nccl" if device == "gpu" else "mpi")
    if kind not in KINDS:
        raise ValueError(f"communicator kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if kind == "single":
        return SingleProcess()
    if kind == "mpi":
        from .mpi import MPICommunicator
        return MPICommunicator()
    from .nccl import NCCLCommunicator
    return NCCLCommunicator()
