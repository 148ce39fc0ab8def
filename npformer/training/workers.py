"""Worker processes for the data-parallel step: the shards of parallel.py without the GIL.

Threads share one interpreter lock. When a model's ops are short (the small benchmark config),
a thread often returns from NumPy while the other holds the lock and sleeps until it is free:
two threads were busy only 83-90% of the time there. A forked worker process has an
interpreter of its own, so its shards overlap fully with the parent's.

    workers = ShardWorkers(model, 2)          # forks 1 worker; the parent is the other
    loss = workers.forward_backward(x, y)     # as parallel.forward_backward(model, x, y, 2)
    ...
    workers.close()                           # or use it as a context manager

How it works (Linux, where ``fork`` is safe with NumPy and OpenBLAS; CPU only):

- The parameters are moved into one block of shared memory (an anonymous ``MAP_SHARED`` mmap)
  before the workers are forked: ``p.data`` becomes a view of that block. The parent's
  optimizer updates parameters in place, so every worker sees the new values at its next step.
- Each step, the parent sends worker k a JSON header and the raw bytes of its shards (shards
  k, k + n, ... of ``parallel.plan_shards``; no pickle) and runs shards 0, n, ... itself.
  A worker runs them exactly as a thread of ``parallel.forward_backward`` would
  (``parallel.run_shards``), writes the summed leaf gradients into its own shared gradient
  block and answers with its loss, or with the error it met.
- The parent adds the workers' gradients after its own, in worker order: the gradients are
  the same, bit for bit, as ``parallel.forward_backward(model, x, y, threads=n)`` with the same
  shards. If any shard failed, no ``.grad`` is touched and the error is raised in the parent.
- Workers mirror the train/eval mode of every module at each step. A parameter whose array was
  replaced (``p.data = ...``, ``model.to(...)``) is copied back into shared memory if its shape
  and dtype are unchanged; otherwise the step raises. Workers ignore Ctrl-C (the parent handles
  it) and exit when the parent closes them (``close()``, or when the ShardWorkers is garbage
  collected) or dies.
- Making a ShardWorkers tunes the C allocator (``cpu.tune_allocator``, inherited by the workers;
  ``NPFORMER_TUNE_MALLOC=0`` keeps the system's settings).
"""

from __future__ import annotations

import gc
import json
import mmap
import os
import signal
import struct
import sys
import threading
import time
import weakref

import numpy as np

from .. import autograd, backend, cpu
from . import parallel

_LEN = struct.Struct("<Q")


def available() -> bool:
    """Whether worker processes are used here: on Linux (elsewhere fork is missing, or, on macOS,
    unsafe once system frameworks such as Accelerate have started threads)."""
    return sys.platform.startswith("linux") and hasattr(os, "fork")


def _send(fd: int, *frames: bytes) -> None:
    for frame in frames:
        data = memoryview(_LEN.pack(len(frame)) + frame)
        while data:
            data = data[os.write(fd, data):]


def _recv_exact(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv_frame(fd: int) -> bytes:
    (n,) = _LEN.unpack(_recv_exact(fd, _LEN.size))
    return _recv_exact(fd, n)


def _die_with(parent: int) -> None:
    """Have the kernel kill this worker when its parent dies (Linux), even if some other process
    still holds the worker's pipes open; elsewhere the worker leaves at EOF on its pipe."""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)          # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:                              # the parent died before that
        os._exit(0)


_parent_fds = set()   # the parent's ends of every open worker pipe, of every ShardWorkers
_fork_lock = threading.Lock()


class _IntoBlock:
    """A leaf-gradient sink (autograd.backward's `sink`) summing into a worker's shared block.

    block: one array per parameter; index: id(parameter) -> its place. The first gradient of a
    parameter is copied in, later ones (other shards) are added. ``done`` lists the places written.
    """

    def __init__(self, block, index: dict):
        self.block, self.index, self.done, self._seen = block, index, [], set()

    def __call__(self, t, g) -> None:
        i = self.index.get(id(t))
        if i is None:
            raise ValueError("the loss depends on a tensor that requires grad but is not a parameter of the "
                             "model; ShardWorkers only returns the parameters' gradients (use "
                             "parallel.forward_backward)")
        if i in self._seen:
            self.block[i] += g
        else:
            self.block[i][...] = g
            self._seen.add(i)
            self.done.append(i)


def _shutdown(owner: int, pids, to_fds, from_fds) -> None:
    """Ask the workers to quit, close the pipes, and reap them (killing any that hang for 5 s).

    In a copy of the parent made by a later fork (owner != this pid) it only closes that
    copy's pipe ends: the workers belong to the parent.
    """
    pids, to_fds, from_fds = list(pids), list(to_fds), list(from_fds)
    if os.getpid() != owner:
        for fd in to_fds + from_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        return
    for fd in to_fds:
        try:
            _send(fd, b"")                 # an empty header: quit
        except OSError:
            pass
    for fd in to_fds + from_fds:
        _parent_fds.discard(fd)
        try:
            os.close(fd)
        except OSError:
            pass
    deadline = time.monotonic() + 5.0
    waiting = list(pids)
    try:
        while waiting:
            pid = waiting[0]
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == 0:
                    if time.monotonic() <= deadline:
                        time.sleep(0.01)
                        continue
                    _kill_and_reap(pid)
            except ChildProcessError:
                pass
            waiting.pop(0)
    except BaseException:             # a second Ctrl-C while waiting: no worker is left behind
        for pid in waiting:
            _kill_and_reap(pid)
        raise


def _kill_and_reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


class ShardWorkers:
    """`workers` - 1 forked processes that, with the parent, run the shards of each batch.

    model: a CPU model with ``model(x, y) -> (logits, loss)``, its parameters all of one float
    dtype. workers: the number of parallel workers, the parent included (>= 1; 1 forks nothing).
    """

    def __init__(self, model, workers: int):
        workers = parallel.check_threads(workers, "cpu")
        if workers > 1 and not available():
            raise RuntimeError("ShardWorkers: worker processes need Linux; use parallel.forward_backward with threads")
        params = model.parameters()
        if not params:
            raise ValueError("ShardWorkers: the model has no parameters")
        devices = {p.device for p in params}
        dtypes = {p.dtype for p in params}
        if devices != {"cpu"} or len(dtypes) != 1 or next(iter(dtypes)).kind != "f":
            raise ValueError(f"ShardWorkers: the parameters must be on the cpu and of one float dtype; "
                             f"got devices {sorted(devices)} and dtypes {sorted(map(str, dtypes))}")
        self.model, self.workers, self.params = model, workers, params
        cpu.tune_allocator()     # before the fork, so that the workers inherit the thresholds
        self._ids = [id(p) for p in params]
        dtype = next(iter(dtypes))
        total = sum(p.data.size for p in params)
        nbytes = max(1, total * dtype.itemsize)

        def views(block):
            flat, out, at = np.frombuffer(block, dtype=dtype, count=total), [], 0
            for p in params:
                out.append(flat[at:at + p.data.size].reshape(p.shape))
                at += p.data.size
            return out
        self._param_block = mmap.mmap(-1, nbytes)              # MAP_SHARED: seen by the workers
        self._views = views(self._param_block)
        for p, v in zip(params, self._views):
            v[...] = p.data
            p.data = v
        self._grad_blocks = [mmap.mmap(-1, nbytes) for _ in range(workers - 1)]
        self._grad_views = [views(b) for b in self._grad_blocks]
        self._pids, self._to, self._from = [], [], []
        self._clean = True
        # registered first, on the lists that the loop fills: a failed fork stops the others
        self._finalizer = weakref.finalize(self, _shutdown, os.getpid(), self._pids, self._to, self._from)
        with _fork_lock:         # one pool forks at a time: each worker closes every other pipe
            self._fork_workers(workers)

    def _fork_workers(self, workers: int) -> None:
        parent = os.getpid()
        freeze = gc.get_freeze_count() == 0    # leave a freeze made by the caller alone
        for k in range(1, workers):
            cmd_r, cmd_w = os.pipe()
            rep_r, rep_w = os.pipe()
            if freeze:
                gc.freeze()      # objects that exist now stay out of the worker's collections:
            try:                 # fewer of the parent's pages get copied into the worker
                pid = os.fork()
            except OSError:
                for fd in (cmd_r, cmd_w, rep_r, rep_w):
                    os.close(fd)
                raise
            finally:
                if freeze and os.getpid() == parent:
                    gc.unfreeze()
            if pid == 0:                                       # the worker
                try:
                    os.close(cmd_w)
                    os.close(rep_r)
                    for fd in list(_parent_fds):              # other workers' pipes (of any pool):
                        os.close(fd)                          # holding them would keep those open
                    self._serve(k, cmd_r, rep_w, parent)
                finally:
                    os._exit(0)
            os.close(cmd_r)
            os.close(rep_w)
            self._pids.append(pid)
            self._to.append(cmd_w)
            self._from.append(rep_r)
            _parent_fds.update((cmd_w, rep_r))

    # ------------------------------------------------------------------ the worker's side
    def _serve(self, k: int, cmd: int, reply: int, parent: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)        # Ctrl-C and SIGTERM (to the process group)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)       # are the parent's to handle; it ends the workers
        _die_with(parent)
        cpu.forked_child()
        modules = list(self.model.modules())
        index = {pid: i for i, pid in enumerate(self._ids)}       # parameter id -> its place
        with cpu.blas_threads(1):
            while True:
                try:
                    frame = _recv_frame(cmd)
                    if not frame:                              # quit
                        return
                    header = json.loads(frame)
                    arrays = [np.frombuffer(_recv_frame(cmd), dtype=dt).reshape(shape)
                              for shape, dt in header["arrays"]]
                except EOFError:
                    return
                try:
                    for m, flag in zip(modules, header["training"]):
                        object.__setattr__(m, "training", flag)
                    for p, flag in zip(self.params, header["requires_grad"]):
                        p.requires_grad = flag
                    pieces = [(arrays[2 * i], arrays[2 * i + 1], w, seed)
                              for i, (w, seed) in enumerate(header["shards"])]
                    # each gradient summed straight into the shared block as backward completes it
                    # (the same float sums as parallel.run_shards, without a second copy)
                    into = _IntoBlock(self._grad_views[k - 1], index)
                    with autograd.set_grad_enabled(header["grad_enabled"]):   # the parent's mode
                        _, loss = parallel.run_shards(self.model, pieces, "cpu", sink=into)
                    done = into.done
                    answer = {"ok": True, "loss": loss, "grads": done}
                except Exception as exc:                       # reported to the parent, which raises
                    answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                              "memory": isinstance(exc, MemoryError)}
                _send(reply, json.dumps(answer).encode())

    # ------------------------------------------------------------------ the parent's side
    def _check_params(self) -> None:
        if self._finalizer is None or not self._finalizer.alive:
            raise RuntimeError("ShardWorkers: closed")
        if [id(p) for p in self.model.parameters()] != self._ids:
            raise ValueError("ShardWorkers: the model's parameters changed since the workers started; "
                             "make a new ShardWorkers")
        for p, v in zip(self.params, self._views):
            if p.data is not v:
                if p.data.shape != v.shape or p.data.dtype != v.dtype or backend.device_of(p.data) != "cpu":
                    raise ValueError(f"ShardWorkers: a parameter became {p.data.dtype} {tuple(p.data.shape)} on "
                                     f"{backend.device_of(p.data)}; the workers hold {v.dtype} {tuple(v.shape)} "
                                     f"on the cpu. Make a new ShardWorkers")
                v[...] = p.data
                p.data = v

    def forward_backward(self, x, y, ignore_index: int = -1, shards=None) -> float:
        """``parallel.forward_backward(model, x, y, workers, ignore_index, shards)`` on the processes."""
        if self.workers == 1:
            return parallel.forward_backward(self.model, x, y, 1, ignore_index, shards)
        self._check_params()
        parallel.check_batch(x, y)
        if backend.device_of(x) != "cpu":
            raise ValueError("ShardWorkers: the batch must be on the cpu")
        x, y = np.ascontiguousarray(x), np.ascontiguousarray(y)
        _, n, pieces = parallel.plan_shards(x, y, self.workers, shards, ignore_index, "cpu")
        if n == 1:
            return parallel.forward_backward(self.model, x, y, 1, ignore_index, 1)
        return self._run(pieces, n)

    def run_pieces(self, pieces) -> float:
        """``parallel.run_pieces(model, pieces, workers)`` on the processes: pieces [(x, y, weight,
        seed)] from ``parallel.plan_shards`` (one rank's share of them, in distributed.step)."""
        n = min(self.workers, len(pieces))
        if n == 1:
            return parallel.run_pieces(self.model, pieces, 1, "cpu")
        self._check_params()
        pieces = [(np.ascontiguousarray(xi), np.ascontiguousarray(yi), w, seed) for xi, yi, w, seed in pieces]
        return self._run(pieces, n)

    def _run(self, pieces, n: int) -> float:
        training = [m.training for m in self.model.modules()]
        try:
            return self._exchange(pieces, n, training)
        except BaseException:
            # an interrupted exchange (Ctrl-C, a worker gone) leaves replies unread: the pipes
            # can no longer be trusted, so the workers are stopped
            if not self._clean:
                self.close()
            raise

    def _exchange(self, pieces, n: int, training: list) -> float:
        self._clean = False
        requires_grad = [p.requires_grad for p in self.params]
        error, busy, dead = None, [], False
        for k in range(1, n):
            mine = pieces[k::n]
            header = {"training": training, "requires_grad": requires_grad,
                      "grad_enabled": autograd.is_grad_enabled(),
                      "shards": [[w, seed] for _, _, w, seed in mine],
                      "arrays": [[list(a.shape), a.dtype.str] for xi, yi, _, _ in mine for a in (xi, yi)]}
            frames = [np.ascontiguousarray(a).tobytes() for xi, yi, _, _ in mine for a in (xi, yi)]
            try:
                _send(self._to[k - 1], json.dumps(header).encode(), *frames)
            except BrokenPipeError:
                error = error or RuntimeError(f"ShardWorkers: worker process {self._pids[k - 1]} exited")
                dead = True
                break
            busy.append(k)
        loss, pairs = 0.0, []
        with cpu.blas_threads(1):
            if error is None:
                try:
                    own, loss = parallel.run_shards(self.model, pieces[0::n], "cpu")
                    pairs = list(own)
                except Exception as exc:
                    error = exc
            for k in busy:
                try:
                    answer = json.loads(_recv_frame(self._from[k - 1]))
                except EOFError:
                    answer = {"ok": False, "error": f"worker process {self._pids[k - 1]} exited"}
                    dead = True
                if not answer["ok"]:           # a worker's MemoryError stays one (the caller may handle it)
                    kind = MemoryError if answer.get("memory") else RuntimeError
                    error = error or kind(f"ShardWorkers: worker {k}: {answer['error']}")
                    continue
                loss += answer["loss"]
                pairs += [(self.params[i], self._grad_views[k - 1][i]) for i in answer["grads"]]
            self._clean = not dead
            if error is not None:
                raise error
            # copies out of the shared blocks, in worker order; one thread: the operands are cold
            # in this core's caches and a second thread measured slower (0.6 against 1.3 ms on
            # the small benchmark config, the same on the large one)
            parallel.accumulate(pairs, 1)
        return float(loss)

    @property
    def pids(self) -> list:
        """Process ids of the forked workers."""
        return list(self._pids)

    def close(self) -> None:
        """Stop the workers (the parameters stay in shared memory and keep working)."""
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
