"""The array backend: NumPy on "cpu", CuPy on "gpu".

Every array operation in npformer takes its array module ``xp`` from its inputs
(``get_array_module``), so one code path serves both devices. This is the only
module that imports CuPy, and it does so lazily: importing npformer never needs
a GPU. The few places where NumPy and CuPy differ (scatter-add, ``erf``, random
generators) are wrapped here.

Devices are named "cpu" and "gpu". The default device comes from the
environment variable ``NPFORMER_DEVICE`` ("cpu" when unset). There are no
implicit transfers: moving data between devices is always an explicit
``to_device`` call, and an op that mixes devices raises ``DeviceMismatchError``.
"""

from __future__ import annotations

import math
import os

import numpy as np

DEVICES = ("cpu", "gpu")

_cupy = None          # the cupy module once imported
_cupy_error = None    # why importing it failed, once tried


class DeviceMismatchError(RuntimeError):
    """An op received arrays that live on different devices."""


def _import_cupy():
    """Import CuPy on first use; return the module or None."""
    global _cupy, _cupy_error
    if _cupy is None and _cupy_error is None:
        try:
            import cupy
            _cupy = cupy
        except Exception as exc:  # ImportError, or a broken CUDA install
            _cupy_error = f"{type(exc).__name__}: {exc}"
    return _cupy


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    cp = _import_cupy()
    if cp is None:
        return False
    try:
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def gpu_unavailable_reason() -> str:
    """A sentence saying why the GPU cannot be used (for errors and test skips)."""
    cp = _import_cupy()
    if cp is None:
        return f"CuPy is not installed or failed to import ({_cupy_error}); pip install 'npformer[gpu]'"
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"CuPy is installed but no CUDA device is usable ({type(exc).__name__}: {exc})"
    return "a GPU is available" if n > 0 else "CuPy is installed but sees no CUDA device"


def check_device(device: str) -> str:
    """Validate a device name; raise a clear error for unknown or unusable ones."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; expected one of {DEVICES}")
    if device == "gpu" and not gpu_available():
        raise RuntimeError(f"device 'gpu' requested but {gpu_unavailable_reason()}")
    return device


def default_device() -> str:
    """The device named by NPFORMER_DEVICE, or "cpu" when it is unset."""
    return check_device(os.environ.get("NPFORMER_DEVICE", "cpu").strip().lower() or "cpu")


def xp_for(device: str):
    """The array module (numpy or cupy) of a device name."""
    if device == "cpu":
        return np
    check_device(device)
    return _cupy


def is_array(a) -> bool:
    """True for a NumPy or CuPy ndarray."""
    if isinstance(a, np.ndarray):
        return True
    return _cupy is not None and isinstance(a, _cupy.ndarray)


def get_array_module(*arrays):
    """numpy or cupy, whichever the arrays belong to (numpy for plain Python values).

    Raises DeviceMismatchError when the arrays live on different devices.
    """
    xp = None
    for a in arrays:
        m = _cupy if (_cupy is not None and isinstance(a, _cupy.ndarray)) else np
        if xp is None:
            xp = m
        elif m is not xp:
            raise DeviceMismatchError("arrays on different devices (cpu and gpu); move them with .to(device)")
    return np if xp is None else xp


def device_of(a) -> str:
    """"gpu" for a CuPy array, "cpu" for anything else."""
    return "gpu" if (_cupy is not None and isinstance(a, _cupy.ndarray)) else "cpu"


def to_device(a, device: str):
    """Copy an array to `device` ("cpu" or "gpu"); returns `a` itself when already there."""
    check_device(device)
    if device_of(a) == device:
        return a
    if device == "cpu":
        return _cupy.asnumpy(a)
    return _cupy.asarray(a)


def to_numpy(a) -> np.ndarray:
    """A NumPy array with the same contents (a device-to-host copy for CuPy arrays)."""
    if _cupy is not None and isinstance(a, _cupy.ndarray):
        return _cupy.asnumpy(a)
    return np.asarray(a)


# ----------------------------------------------------------------------------- helpers that differ

def scatter_add(target, index, values) -> None:
    """In place: target[index] += values, adding repeated indices once each.

    NumPy spells this ``np.add.at``; CuPy ``cupyx.scatter_add``.
    """
    if isinstance(target, np.ndarray):
        np.add.at(target, index, values)
    else:
        import cupyx
        cupyx.scatter_add(target, index, values)


def scatter_add_rows(target, index, values) -> None:
    """scatter_add for rows of `target` (V, ...) picked by `index`: target[index[n]] += values[n].

    The fast embedding backward's. On the CPU it goes through a 1-D ``np.add.at`` on element
    indices, NumPy's fast path for 1-D targets: 3x faster than add.at on rows, adding in the
    same order (so with the same result). Elsewhere, and for indices it cannot take, it is
    scatter_add.
    """
    if (isinstance(target, np.ndarray) and isinstance(index, np.ndarray) and target.ndim >= 2
            and index.dtype.kind in "iu" and index.size and target.flags.c_contiguous
            and np.shape(values) == index.shape + target.shape[1:]
            and 0 <= int(index.min()) and int(index.max()) < target.shape[0]):
        row = target[0].size
        flat = (index.reshape(-1).astype(np.intp)[:, None] * row + np.arange(row)).reshape(-1)
        np.add.at(target.reshape(-1), flat, np.asarray(values).reshape(-1))
    else:
        scatter_add(target, index, values)


# ----------------------------------------------------------------------------- for NCCL (distributed/nccl.py)

def nccl_module():
    """cupy.cuda.nccl, CuPy's NCCL bindings; RuntimeError saying what to install when CuPy or the
    NCCL library is missing."""
    cp = _import_cupy()
    if cp is None:
        raise RuntimeError(f"NCCL needs CuPy ({_cupy_error}): pip install 'npformer[gpu]'")
    from cupy.cuda import nccl
    if not getattr(nccl, "available", False):
        raise RuntimeError("CuPy cannot load the NCCL library: pip install nvidia-nccl-cu12")
    return nccl


def gpu_count() -> int:
    """The CUDA devices CuPy sees (CuPy must import)."""
    return _import_cupy().cuda.runtime.getDeviceCount()


def use_gpu(index: int) -> None:
    """Make GPU `index` this process's current device."""
    _import_cupy().cuda.Device(index).use()


def current_stream_ptr() -> int:
    """The raw handle of CuPy's current stream, for libraries that take one (NCCL)."""
    return _import_cupy().cuda.get_current_stream().ptr


def synchronize() -> None:
    """Wait for the work queued on CuPy's current stream."""
    _import_cupy().cuda.get_current_stream().synchronize()


def elementwise_pieces(size: int, device: str, piece: int) -> list:
    """Slices cutting `size` elements into runs of `piece` on the CPU, one slice on a GPU.

    For elementwise ops of many passes (GELU): on the CPU a piece's scratch arrays stay in the
    core's cache through all the passes; on a GPU each pass is one kernel over the whole array.
    """
    step = max(1, piece if device == "cpu" else size)
    return [slice(i, min(i + step, size)) for i in range(0, size, step)]


# erf: NumPy has none. For float64 we use a series/continued-fraction pair accurate
# to ~2e-15; for float32 a rational approximation good to ~5e-7 (a few float32 eps).

_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)


def _erf_series(x):
    """erf(x) = 2/sqrt(pi) exp(-x^2) sum_n 2^n x^(2n+1) / (1*3*...*(2n+1)); all terms positive."""
    x2 = x * x
    term = x.copy()
    total = x.copy()
    n = 0
    while True:
        n += 1
        term *= 2.0 * x2 / (2 * n + 1)
        total += term
        if n > 400 or not np.any(np.abs(term) > 1e-17 * np.abs(total)):
            break
    return _TWO_OVER_SQRT_PI * np.exp(-x2) * total


def _erfc_continued_fraction(x, depth=60):
    """erfc(x) for x >= 3 by the continued fraction exp(-x^2)/sqrt(pi) / (x + (1/2)/(x + 1/(x + (3/2)/(x + ...))))."""
    f = x.copy()
    for k in range(depth, 0, -1):
        f = x + (k / 2.0) / f
    return np.exp(-x * x) / math.sqrt(math.pi) / f


def _erf_float64(x):
    ax = np.abs(x)
    out = np.empty_like(x)
    small = ax < 3.0
    out[small] = _erf_series(x[small])
    big = ~small
    if big.any():
        out[big] = np.sign(x[big]) * (1.0 - _erfc_continued_fraction(ax[big]))
    return out


def _erf_float32(x):
    # Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7, evaluated in float32.
    s = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + np.float32(0.3275911) * a)
    poly = t * (np.float32(0.254829592) + t * (np.float32(-0.284496736) + t * (
        np.float32(1.421413741) + t * (np.float32(-1.453152027) + t * np.float32(1.061405429)))))
    return s * (1.0 - poly * np.exp(-a * a))


def erf(x):
    """The error function, elementwise, keeping the dtype of `x`."""
    if not isinstance(x, (np.ndarray, np.generic)):   # NumPy arithmetic on a 0-d array gives a scalar
        import cupyx.scipy.special
        return cupyx.scipy.special.erf(x)
    x = np.asarray(x)
    if x.dtype == np.float32:
        return _erf_float32(x)
    return _erf_float64(np.asarray(x, dtype=np.float64)).astype(x.dtype, copy=False)


# ----------------------------------------------------------------------------- random generators

def default_rng(seed=None, device: str = "cpu"):
    """A seeded random generator for `device` (numpy.random.Generator or cupy's)."""
    if device == "cpu":
        return np.random.default_rng(seed)
    check_device(device)
    return _cupy.random.default_rng(seed)


def rng_device(rng) -> str:
    """The device a generator draws on."""
    return "cpu" if isinstance(rng, np.random.Generator) else "gpu"


def generator_state(gen):
    """A JSON-safe snapshot of a NumPy generator's state; None for CuPy generators (not saved)."""
    if isinstance(gen, np.random.Generator):
        return gen.bit_generator.state
    return None


def set_generator_state(gen, state) -> None:
    """Restore a snapshot taken by generator_state (ignored for CuPy generators)."""
    if isinstance(gen, np.random.Generator) and state is not None:
        gen.bit_generator.state = state
