"""Comparing npformer results with torch tensors, and reporting the worst difference seen.

Used by the interop and GPT-2 parity tests: ``Worst(title)`` keeps the worst relative
difference per (name, dtype); ``close`` asserts one comparison against a tolerance and records
it; ``report`` prints the table at the end of a module (call it from a module fixture).
"""

import contextlib

import numpy as np

from tests.helpers import host

TOL = {np.float64: 1e-9, np.float32: 1e-4}    # the parity targets, float64 and float32


class Worst:
    """Worst relative difference max|ours - theirs| / max|theirs| per name and dtype."""

    def __init__(self, title: str, other: str = "torch"):
        self.title, self.other, self.table = title, other, {}

    def close(self, name, what, ours, theirs, dtype):
        a = host(ours).astype(np.float64)
        b = theirs.detach().double().numpy()
        assert a.shape == b.shape, f"{name} {what}: shape {a.shape} vs {self.other} {b.shape}"
        d = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
        slot = self.table.setdefault(name, {})
        slot[dtype] = max(slot.get(dtype, 0.0), d)
        assert d <= TOL[dtype], f"{name} {what}: relative difference {d:.3g} > {TOL[dtype]:g}"

    def report(self):
        print(f"\n{self.title}")
        for name in sorted(self.table):
            print(f"  {name:26s} " + "  ".join(f"{np.dtype(d).name}: {v:.2e}" for d, v in sorted(
                self.table[name].items(), key=lambda kv: -np.dtype(kv[0]).itemsize)))


@contextlib.contextmanager
def one_torch_thread():
    """torch on one thread while the block runs: tiny ops slow down badly when threads contend."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def print_worst(title: str, worst: dict) -> None:
    """Print {name: {kind: worst relative difference}} under `title`."""
    print(f"\n{title}")
    for name, kinds in sorted(worst.items()):
        print(f"  {name:44s} " + "  ".join(f"{k} {v:.1e}" for k, v in kinds.items()))
