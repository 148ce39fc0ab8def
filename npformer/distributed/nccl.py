"""``NCCLCommunicator``: the communicator interface (comm.py) over NCCL, for CuPy device arrays.

One GPU per rank: rank r of a machine drives GPU ``local_rank`` (its place among the ranks of
its machine), so ``mpiexec -n 8`` on an 8-GPU machine uses all eight. NCCL needs every rank to
share one 128-byte unique id before the communicator exists; rank 0 makes it
(``nccl.get_unique_id``) and MPI broadcasts it (the bootstrap ChainerMN uses). Device arrays then
go through NCCL on CuPy's current stream; host arrays (small control values: a loss, a stop
flag) and barriers go through the MPI communicator, as do the JSON gathers.

CuPy's NCCL bindings (reached through npformer.backend, which holds every CuPy call) need the NCCL
library (``pip install nvidia-nccl-cu12``); `NCCL_NAMES` lists
everything of ``cupy.cuda.nccl`` used here (tests/test_distributed.py checks that it exists).
"""

from __future__ import annotations

import numpy as np

from .. import backend
from .comm import Communicator, check_op, check_root
from .mpi import MPICommunicator

# the names of cupy.cuda.nccl this module uses (module level, then NcclCommunicator methods)
NCCL_NAMES = ("available", "get_unique_id", "NcclCommunicator", "NCCL_SUM", "NCCL_MAX", "NCCL_MIN",
              "NCCL_FLOAT16", "NCCL_FLOAT32", "NCCL_FLOAT64", "NCCL_INT32", "NCCL_INT64")
NCCL_METHODS = ("allReduce", "bcast", "abort")


class NCCLCommunicator(Communicator):
    """All ranks of `mpi` (an MPICommunicator; the world by default), one GPU each."""

    name = "nccl"

    def __init__(self, mpi: MPICommunicator = None):
        self.mpi = MPICommunicator() if mpi is None else mpi
        self.rank, self.size = self.mpi.rank, self.mpi.size
        self.local_rank, self.local_size = self.mpi.local_rank, self.mpi.local_size
        try:
            nccl = backend.nccl_module()
        except RuntimeError as exc:
            raise RuntimeError(f"NCCLCommunicator: {exc}") from None
        gpus = backend.gpu_count()
        if self.local_size > gpus:
            raise RuntimeError(f"{self.local_size} ranks run on this machine but it has {gpus} GPU(s); "
                               f"start at most one rank per GPU")
        backend.use_gpu(self.local_rank)
        uid = self.mpi.broadcast_json(list(nccl.get_unique_id()) if self.rank == 0 else None)
        self.comm = nccl.NcclCommunicator(self.size, tuple(uid), self.rank)
        self._ops = {"sum": nccl.NCCL_SUM, "max": nccl.NCCL_MAX, "min": nccl.NCCL_MIN}
        self._types = {np.dtype(np.float16): nccl.NCCL_FLOAT16, np.dtype(np.float32): nccl.NCCL_FLOAT32,
                       np.dtype(np.float64): nccl.NCCL_FLOAT64, np.dtype(np.int32): nccl.NCCL_INT32,
                       np.dtype(np.int64): nccl.NCCL_INT64}

    def _device(self, array, what: str):
        if not (array.flags.c_contiguous and array.dtype in self._types):
            raise ValueError(f"{what}: NCCL takes C-contiguous arrays of {sorted(map(str, self._types))}; got "
                             f"{array.dtype}{'' if array.flags.c_contiguous else ', not contiguous'}")
        return array.data.ptr, array.size, self._types[array.dtype]

    def allreduce(self, array, op: str = "sum"):
        """Sum (max, min) over the ranks, in place: device arrays by NCCL, host arrays by MPI."""
        if isinstance(array, np.ndarray):
            return self.mpi.allreduce(array, op)
        ptr, n, dtype = self._device(array, "allreduce")
        self.comm.allReduce(ptr, ptr, n, dtype, self._ops[check_op(op)], backend.current_stream_ptr())
        return array

    def broadcast(self, array, root: int = 0):
        """Overwrite `array` with the root's, in place: device arrays by NCCL, host arrays by MPI."""
        if isinstance(array, np.ndarray):
            return self.mpi.broadcast(array, root)
        ptr, n, dtype = self._device(array, "broadcast")
        self.comm.bcast(ptr, n, dtype, check_root(root, self.size), backend.current_stream_ptr())
        return array

    def barrier(self) -> None:
        backend.synchronize()
        self.mpi.barrier()

    def gather_json(self, obj, root: int = 0):
        return self.mpi.gather_json(obj, root)

    def broadcast_json(self, obj, root: int = 0):
        return self.mpi.broadcast_json(obj, root)

    def abort(self, code: int = 1) -> None:
        try:
            self.comm.abort()
        finally:
            self.mpi.abort(code)
