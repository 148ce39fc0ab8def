"""How much memory this process can still use: the cgroup's headroom, /proc/meminfo, CuPy's free
GPU memory, or NPFORMER_MEMORY_AVAILABLE; and byte counts written for people.

npformer.training.memory compares its estimate of a run's peak with these readings (and
re-exports every name here).
"""

from __future__ import annotations

import os
import re

from .. import backend

ENV_VAR = "NPFORMER_MEMORY_AVAILABLE"
MEMINFO = "/proc/meminfo"
CGROUP_ROOT = "/sys/fs/cgroup"
PROC_CGROUP = "/proc/self/cgroup"
_NO_LIMIT = 1 << 60             # cgroup v1 writes "no limit" as a number near 2^63


def format_bytes(n) -> str:
    """1536 -> '1.5 KiB'; binary units, one decimal."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def parse_bytes(text: str, name: str = ENV_VAR) -> int:
    """'512M' -> 536870912: bytes, or a number with K, M, G or T (powers of 1024; 'MiB', 'MB' too)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b)?\s*", str(text), re.IGNORECASE)
    if not m or (m.group(3) and not m.group(2) and m.group(3).lower() != "b"):
        raise ValueError(f"{name}={text!r} is not a size; give bytes or a number with K, M, G or T "
                         f"(e.g. 512M or 1.5G)")
    power = " kmgt".index(m.group(2).lower() or " ")
    return int(float(m.group(1)) * 1024 ** power)


def _read_int(path: str, key: str = None):
    """An integer file ("max" -> None), or the value of `key` in a "key value" file; None if absent."""
    with open(path, encoding="ascii") as f:
        if key is None:
            text = f.read().strip()
            return None if text == "max" else int(text)
        for line in f:
            parts = line.replace(":", " ").split()
            if parts and parts[0] == key:
                return int(parts[1]) * (1024 if parts[-1] == "kB" else 1)
    return None


_V2 = ("", ("memory.max", "memory.current", "inactive_file"))          # (under root, files, stat key)
_V1 = ("memory", ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"))


def _cgroup_dirs(root: str, proc_cgroup: str):
    """[(directory, limit file, usage file, inactive-file key)], this process's cgroup first, then
    its ancestors (the directories that exist: inside a container the root is its own cgroup)."""
    try:
        with open(proc_cgroup, encoding="ascii") as f:
            entries = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        entries = []
    paths = [(_V2 if e[1] == "" else _V1, e[2]) for e in entries
             if len(e) == 3 and (e[1] == "" or "memory" in e[1].split(","))]
    found = []
    for (sub, files), path in paths or [(_V2, "/"), (_V1, "/")]:     # unreadable: the mount points
        parts = [p for p in path.split("/") if p]
        for i in range(len(parts), -1, -1):
            d = os.path.join(root, sub, *parts[:i])
            if os.path.exists(os.path.join(d, files[0])):
                found.append((d,) + files)
    return found


def _cgroup_headroom(root: str, proc_cgroup: str):
    """(limit - usage, description) of the tightest cgroup memory limit, or None (no limit, unreadable).

    Usage leaves out the inactive file cache, which the kernel reclaims before it kills.
    """
    best = None
    for d, limit_file, usage_file, inactive_key in _cgroup_dirs(root, proc_cgroup):
        try:
            limit = _read_int(os.path.join(d, limit_file))
            if limit is None or limit >= _NO_LIMIT:
                continue
            used = _read_int(os.path.join(d, usage_file))
            try:
                used -= _read_int(os.path.join(d, "memory.stat"), inactive_key) or 0
            except OSError:
                pass
        except (OSError, ValueError, TypeError):
            continue
        used = max(0, used)
        if best is None or limit - used < best[0]:
            best = (max(0, limit - used), f"cgroup limit {format_bytes(limit)} less {format_bytes(used)} in use")
    return best


def available_memory(meminfo: str = None, cgroup_root: str = None, proc_cgroup: str = None, environ=None):
    """(bytes this process can still use, where that comes from), or (None, why not).

    The smaller of the cgroup's headroom (v2 memory.max - memory.current, v1
    memory.limit_in_bytes - memory.usage_in_bytes, of this cgroup and its ancestors; less the
    inactive file cache) and /proc/meminfo's MemAvailable. NPFORMER_MEMORY_AVAILABLE (bytes, or
    with a K/M/G/T suffix) overrides both. The paths default to MEMINFO, CGROUP_ROOT, PROC_CGROUP.
    """
    environ = os.environ if environ is None else environ
    text = environ.get(ENV_VAR, "").strip()
    if text:
        return parse_bytes(text), ENV_VAR
    readings = []
    headroom = _cgroup_headroom(cgroup_root or CGROUP_ROOT, proc_cgroup or PROC_CGROUP)
    if headroom is not None:
        readings.append(headroom)
    try:
        free = _read_int(meminfo or MEMINFO, "MemAvailable")
        if free is not None:
            readings.append((free, "MemAvailable"))
    except (OSError, ValueError, IndexError):
        pass
    if not readings:
        return None, "no reading of the free memory (no cgroup limit or MemAvailable could be read)"
    return min(readings, key=lambda r: r[0])


def gpu_available_memory():
    """(free bytes on the current CUDA device, 'free GPU memory'), or (None, why not).

    cudaMemGetInfo's free memory plus the blocks CuPy's pool holds free. Not exercised by the
    CPU test suite (no GPU there); every failure returns None, so the check is skipped.
    """
    try:
        cp = backend.xp_for("gpu")
        free, _ = cp.cuda.runtime.memGetInfo()
        return int(free) + int(cp.get_default_memory_pool().free_bytes()), "free GPU memory"
    except Exception as exc:                           # no CuPy, no device, a driver error
        return None, f"no reading of the GPU's free memory ({type(exc).__name__})"
