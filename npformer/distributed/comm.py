"""The communicator interface of data-parallel training, and its single-process implementation.

A communicator connects the `size` processes ("ranks") of one run; each knows its `rank`
(0 .. size - 1), and its `local_rank` among the `local_size` ranks of its machine (which GPU it
drives; how many share the machine's memory).

    comm.allreduce(a, op="sum")     every rank's `a` replaced, in place, by the elementwise sum
                                    (or "max", "min") over all ranks' `a`; returns `a`
    comm.broadcast(a, root=0)       every rank's `a` overwritten, in place, by the root's; returns `a`
    comm.barrier()                  returns once every rank has called it
    comm.gather_json(obj, root=0)   [rank 0's obj, rank 1's, ...] on the root, None elsewhere
    comm.broadcast_json(obj, root)  the root's obj on every rank (JSON-encoded on the way: no pickle)
    comm.abort(code)                end every rank of the run now, with exit status `code`

Every call is collective: each rank must make the same calls in the same order, with arrays of
the same shape and dtype, or the run hangs. Three implementations share this interface:
``SingleProcess`` (here: one rank, every call a no-op), ``mpi.MPICommunicator`` (host NumPy
arrays, through mpi4py) and ``nccl.NCCLCommunicator`` (CuPy device arrays, through NCCL; host
arrays through its MPI communicator).
"""

from __future__ import annotations

import sys

OPS = ("sum", "max", "min")


def check_op(op: str) -> str:
    """`op` if it is one of OPS, else ValueError."""
    if op not in OPS:
        raise ValueError(f"allreduce: op must be one of {', '.join(OPS)}; got {op!r}")
    return op


def check_root(root, size: int) -> int:
    """`root` if it is a rank of a run of `size` ranks, else ValueError."""
    if isinstance(root, bool) or not isinstance(root, int) or not 0 <= root < size:
        raise ValueError(f"root must be a rank in [0, {size}); got {root!r}")
    return root


class Communicator:
    """The interface (see the module docstring); subclasses implement every method."""

    name = "communicator"
    rank, size, local_rank, local_size = 0, 1, 0, 1

    def allreduce(self, array, op: str = "sum"):
        raise NotImplementedError

    def broadcast(self, array, root: int = 0):
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def gather_json(self, obj, root: int = 0):
        raise NotImplementedError

    def broadcast_json(self, obj, root: int = 0):
        raise NotImplementedError

    def abort(self, code: int = 1) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} rank {self.rank} of {self.size}>"


class SingleProcess(Communicator):
    """One rank: allreduce and broadcast leave the array as it is, gathers return [obj].

    Lets a training loop written for ranks run unchanged in one process (and the tests check
    the loop's logic without a launcher)."""

    name = "single"

    def allreduce(self, array, op: str = "sum"):
        check_op(op)
        return array

    def broadcast(self, array, root: int = 0):
        check_root(root, 1)
        return array

    def barrier(self) -> None:
        pass

    def gather_json(self, obj, root: int = 0):
        check_root(root, 1)
        return [obj]

    def broadcast_json(self, obj, root: int = 0):
        check_root(root, 1)
        return obj

    def abort(self, code: int = 1) -> None:
        sys.stderr.flush()
        raise SystemExit(code)
