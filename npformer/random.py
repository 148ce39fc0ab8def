"""Seeded random generators, one global generator per device (like torch.manual_seed).

Everything random in npformer (initialisation, dropout, sampling) takes an
optional ``generator``; when it is None the global generator of the device is
used. ``manual_seed(s)`` reseeds all of them.
"""

from __future__ import annotations

import contextlib
import threading

from . import backend

_generators: dict = {}
_seed = 0
_local = threading.local()   # per-thread overrides of the global generators


def manual_seed(seed: int) -> None:
    """Reseed the global generator of every device."""
    global _seed
    _seed = int(seed)
    _generators.clear()


def default_generator(device: str = "cpu"):
    """The global generator of `device`, created from the last manual_seed on first use.

    Inside ``thread_default_generator`` on this thread, that block's generator instead.
    """
    override = getattr(_local, "generators", None)
    if override and device in override:
        return override[device]
    if device not in _generators:
        _generators[device] = backend.default_rng(_seed, device)
    return _generators[device]


def Generator(seed=None, device: str = "cpu"):
    """A new independent generator (numpy.random.Generator on cpu, cupy's on gpu)."""
    return backend.default_rng(seed, device)


def set_default_generator(device: str, generator) -> None:
    """Make `generator` the global generator of `device` (used when an op gets generator=None)."""
    _generators[device] = generator


@contextlib.contextmanager
def thread_default_generator(generator, device: str = "cpu"):
    """Within the block, ops on this thread that get generator=None draw from `generator`.

    Other threads keep the global generator. The data-parallel training step gives each
    thread its own generator this way, so dropout masks do not depend on thread timing.
    """
    prev = getattr(_local, "generators", None)
    _local.generators = {**(prev or {}), device: generator}
    try:
        yield generator
    finally:
        _local.generators = prev
