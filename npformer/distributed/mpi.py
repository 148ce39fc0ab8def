"""``MPICommunicator``: the communicator interface (comm.py) over MPI, for host NumPy arrays.

mpi4py is imported when one is made, never at ``import npformer``: a run started without a
launcher never loads MPI. Arrays travel as raw buffers (``Allreduce``, ``Bcast``); the JSON
gathers and broadcasts send UTF-8 bytes with their lengths, so nothing is pickled.

The sum of an allreduce is taken in an order MPI fixes for a given rank count and message
size (MPICH and Open MPI choose the algorithm from those alone), so a run repeated with the
same rank count gets the same bits, and every rank gets the same result.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from .comm import Communicator, check_op, check_root


def import_mpi():
    """mpi4py's MPI module, or RuntimeError saying how to install it."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise RuntimeError(f"data parallelism over MPI needs mpi4py and an MPI library: pip install "
                           f"'npformer[mpi]' (mpi4py, mpich); {exc}") from None
    return MPI


def _host_buffer(array, what: str):
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{what}: MPICommunicator takes host NumPy arrays; got {type(array).__name__} "
                        f"(device arrays go through NCCLCommunicator)")
    if not (array.flags.c_contiguous and array.flags.writeable):
        raise ValueError(f"{what}: the array must be C-contiguous and writable (it is changed in place)")
    return array


class MPICommunicator(Communicator):
    """The ranks of an MPI communicator (MPI.COMM_WORLD by default)."""

    name = "mpi"

    def __init__(self, comm=None):
        self.MPI = MPI = import_mpi()
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)    # the ranks of this machine
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}

    def allreduce(self, array, op: str = "sum"):
        """Sum (max, min) `array` over the ranks, in place. array: a C-contiguous host array."""
        self.comm.Allreduce(self.MPI.IN_PLACE, _host_buffer(array, "allreduce"), op=self._ops[check_op(op)])
        return array

    def broadcast(self, array, root: int = 0):
        """Overwrite `array` with the root's, in place."""
        self.comm.Bcast(_host_buffer(array, "broadcast"), root=check_root(root, self.size))
        return array

    def barrier(self) -> None:
        self.comm.Barrier()

    def gather_json(self, obj, root: int = 0):
        """[each rank's obj] on the root (in rank order), None elsewhere. obj: JSON-serialisable."""
        check_root(root, self.size)
        data = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)
        counts = np.zeros(self.size, dtype=np.int64)
        self.comm.Gather(np.array([data.size], dtype=np.int64), counts, root=root)
        out = np.empty(int(counts.sum()), dtype=np.uint8) if self.rank == root else None
        self.comm.Gatherv(data, [out, counts] if self.rank == root else None, root=root)
        if self.rank != root:
            return None
        edges = np.concatenate([[0], np.cumsum(counts)])
        return [json.loads(out[a:b].tobytes()) for a, b in zip(edges[:-1], edges[1:])]

    def broadcast_json(self, obj, root: int = 0):
        """The root's obj on every rank (the others pass anything, e.g. None)."""
        check_root(root, self.size)
        data = json.dumps(obj).encode() if self.rank == root else b""
        n = np.array([len(data)], dtype=np.int64)
        self.comm.Bcast(n, root=root)
        buf = np.frombuffer(data, dtype=np.uint8).copy() if self.rank == root else np.empty(int(n[0]), np.uint8)
        self.comm.Bcast(buf, root=root)
        return json.loads(buf.tobytes())

    def abort(self, code: int = 1) -> None:
        """End every rank now (MPI_Abort); the launcher exits with `code`.

        MPICH's MPI_Abort may return before the launcher kills this process; leaving at once keeps
        the caller from going on (and printing its error a second time)."""
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)
        os._exit(code)
