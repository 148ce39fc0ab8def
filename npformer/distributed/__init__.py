"""Data parallelism over processes ("ranks"), the way ChainerMN does it: docs/distributed.md.

    mpiexec -n 2 npformer pretrain                   # two ranks, one global batch of --batch-size

A communicator (comm.py) connects the ranks: ``SingleProcess`` (one rank), MPI through mpi4py
for host arrays (mpi.py), NCCL through CuPy for device arrays (nccl.py). ``communicator()``
picks one from the environment the launcher set (launch.py); mpi4py is imported only then,
never by ``import npformer``. The helpers a training loop calls are in helpers.py (gradients,
parameters, optimizer state), sampler.py (each rank's share of a batch), step.py (the sharded
step over ranks) and faults.py (one error message for all ranks, nobody left waiting).
"""

from .comm import Communicator, SingleProcess
from .faults import RankError, agree, check_same, fail_together, on_all_ranks, together
from .helpers import allreduce_gradients, any_rank, broadcast_optimizer_state, broadcast_parameters
from .launch import Launch, communicator, detect
from .runs import claim_on_rank_0, quiet, resume_point, run_launched, stage
from .sampler import DistributedSampler, share
from .step import forward_backward, global_shards, rank_pieces

__all__ = ["Communicator", "SingleProcess", "RankError", "agree", "check_same", "fail_together", "on_all_ranks",
           "together", "allreduce_gradients", "any_rank", "broadcast_optimizer_state", "broadcast_parameters",
           "Launch", "communicator", "detect", "claim_on_rank_0", "quiet", "resume_point", "run_launched", "stage",
           "DistributedSampler", "share", "forward_backward", "global_shards", "rank_pieces"]
