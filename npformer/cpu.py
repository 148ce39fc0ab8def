"""Host (CPU) tuning: the C allocator's thresholds and the BLAS library's thread count.

Two things outside NumPy decide how fast a NumPy training step runs:

- **The allocator.** A training step allocates and frees hundreds of arrays of 0.1-30 MB.
  glibc's malloc serves such sizes with fresh ``mmap`` pages and returns them to the kernel
  when freed (and trims the heap top above 128 KB), so every step page-faults its
  activations back in: about 60,000 page faults and 15% of a step on the large benchmark
  config. ``tune_allocator()`` raises the mmap threshold to 32 MB (glibc's maximum) and the
  trim threshold to 256 MB, so freed arrays are reused from the heap. It changes no
  result, only how soon freed memory goes back to the kernel. It is a setting of the whole
  process, so ``import npformer`` does not call it: the ``npformer`` command, ``pretrain()`` and
  the data-parallel training step (``npformer.training.parallel``, ``.workers``) do, on glibc
  systems; set ``NPFORMER_TUNE_MALLOC=0`` to keep the system's settings. ``allocator_tuned()``
  says whether it ran.

- **BLAS threads.** OpenBLAS splits each GEMM over its own threads, whose workers spin for
  a while after every call. npformer's data-parallel step
  (``npformer.training.parallel``) runs whole forward/backward passes on several threads
  instead, each of which must call a single-threaded BLAS. ``blas_threads(n)`` sets
  OpenBLAS's thread count for the duration of a ``with`` block and restores it after.
  Other BLAS libraries (MKL, Accelerate) are not controlled: ``blas_controllable()``
  says whether the loaded one is.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading

_M_TRIM_THRESHOLD = -1   # mallopt parameter numbers, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024    # glibc's maximum on 64-bit systems
TRIM_THRESHOLD = 256 * 1024 * 1024

_allocator_tuned = False


def tune_allocator() -> bool:
    """Make glibc's malloc keep freed arrays for reuse (see the module docstring).

    Returns True when the thresholds were set, False on other C libraries or when
    NPFORMER_TUNE_MALLOC=0. Safe to call more than once.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if os.environ.get("NPFORMER_TUNE_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):       # musl and others: no mallopt to call
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    _allocator_tuned = ok
    return ok


def allocator_tuned() -> bool:
    """True once tune_allocator() has set glibc's thresholds in this process."""
    return _allocator_tuned


# OpenBLAS's thread-count functions under the names NumPy's builds export them.
_SET_NAMES = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
              "openblas_set_num_threads64_", "openblas_set_num_threads")
_GET_NAMES = ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
              "openblas_get_num_threads64_", "openblas_get_num_threads")

_blas = None              # (set, get) once found, False when there is none
_blas_lock = threading.Lock()
_blas_users = 0           # nesting depth of blas_threads blocks
_blas_saved = None        # the count to restore when the outermost block ends


def _loaded_libraries() -> list:
    """Paths of the shared libraries mapped into this process (Linux: /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if ".so" in line}
    except OSError:
        return []
    return sorted(p for p in paths if p.startswith("/"))


_find_lock = threading.Lock()


def _find_blas():
    global _blas
    if _blas is None:
        with _find_lock:               # one scan; other threads wait for its result
            if _blas is None:
                import numpy  # noqa: F401  (loads NumPy's BLAS, so that it is mapped)
                found = False
                for path in _loaded_libraries():
                    if "blas" not in os.path.basename(path).lower():
                        continue
                    try:
                        lib = ctypes.CDLL(path)
                    except OSError:
                        continue
                    set_fn = next((getattr(lib, n) for n in _SET_NAMES if hasattr(lib, n)), None)
                    get_fn = next((getattr(lib, n) for n in _GET_NAMES if hasattr(lib, n)), None)
                    if set_fn is not None and get_fn is not None:
                        set_fn.argtypes, set_fn.restype = [ctypes.c_int], None
                        get_fn.argtypes, get_fn.restype = [], ctypes.c_int
                        found = (set_fn, get_fn)
                        break
                _blas = found
    return _blas


def blas_controllable() -> bool:
    """True when the BLAS library NumPy uses is OpenBLAS and its thread count can be set."""
    return bool(_find_blas())


def blas_num_threads():
    """OpenBLAS's current thread count, or None when it cannot be read."""
    found = _find_blas()
    return found[1]() if found else None


@contextlib.contextmanager
def blas_threads(n: int):
    """Run the block with OpenBLAS limited to `n` threads; the previous count comes back after.

    Nested and concurrent blocks share one setting (the first block's `n`); the count is
    restored when the last of them exits. Does nothing when the BLAS is not controllable.
    """
    global _blas_users, _blas_saved
    found = _find_blas()
    if not found:
        yield
        return
    set_fn, get_fn = found
    with _blas_lock:
        if _blas_users == 0:
            _blas_saved = get_fn()
            set_fn(int(n))
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                set_fn(_blas_saved)


_pool = None
_pool_size = 0
_pool_lock = threading.Lock()
_in_worker = threading.local()     # set in the pool's threads: nested calls run serially


def _mark_worker():
    _in_worker.flag = True


def run_in_threads(tasks) -> list:
    """Call every zero-argument callable in `tasks` concurrently; return their results in order.

    The first task runs on the calling thread, the others on a shared pool of worker threads.
    All tasks finish before this returns; if any raised, the first exception (in task order)
    is raised then (a KeyboardInterrupt first of all, once the pool's tasks are done). Pure-Python work does not overlap (the GIL); NumPy loops do. Called from
    inside one of the pool's own tasks, it runs the tasks one after another on that thread
    (waiting for the pool there could deadlock).
    """
    global _pool, _pool_size
    tasks = list(tasks)
    if len(tasks) <= 1 or getattr(_in_worker, "flag", False):
        return [t() for t in tasks]      # nothing to share, or called from a pool task: run here
    with _pool_lock:
        if _pool is None or _pool_size < len(tasks) - 1:
            # a larger pool replaces the old one, which is not shut down: another caller may still
            # be submitting to it (its idle threads exit once it is garbage collected)
            from concurrent.futures import ThreadPoolExecutor
            _pool_size = len(tasks) - 1
            _pool = ThreadPoolExecutor(_pool_size, thread_name_prefix="npformer", initializer=_mark_worker)
        pool = _pool
    futures = [pool.submit(t) for t in tasks[1:]]
    results, errors = [], []
    for run in [tasks[0]] + [f.result for f in futures]:
        try:
            results.append(run())
        except BaseException as exc:   # wait for the other tasks before raising
            results.append(None)
            errors.append(exc)
    if errors:
        interrupt = next((e for e in errors if isinstance(e, KeyboardInterrupt)), None)
        if interrupt is not None:      # Ctrl-C while waiting: the tasks may still be running
            from concurrent.futures import wait
            while True:
                try:
                    wait(futures)
                    break
                except KeyboardInterrupt:
                    pass
            raise interrupt
        raise errors[0]
    return results


def forked_child() -> None:
    """Reset this module's thread state in a freshly forked child process.

    Only the forking thread survives a fork: the pool's threads are gone and a lock another
    thread held stays locked. The child gets new locks and runs run_in_threads serially.
    """
    global _pool, _pool_size, _blas_lock, _blas_users, _pool_lock
    _pool, _pool_size, _blas_users = None, 0, 0
    _blas_lock, _pool_lock = threading.Lock(), threading.Lock()
    _in_worker.flag = True


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
