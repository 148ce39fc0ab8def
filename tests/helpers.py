"""Helpers shared by the tests: tensors on the device under test, host copies, shared data."""

import os

import numpy as np
import pytest

import npformer as nf
from npformer import backend

DEVICE = os.environ.get("NPFORMER_DEVICE", "cpu").strip().lower() or "cpu"
SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def T(data, requires_grad=False, dtype=None):
    """A tensor on the device under test from host data (float64 stays float64)."""
    arr = np.asarray(data)
    if dtype is not None:
        arr = arr.astype(dtype)
    if DEVICE == "gpu":
        arr = backend.to_device(arr, "gpu")
    return nf.Tensor(arr, requires_grad=requires_grad)


def host(a):
    """A NumPy copy of a Tensor's data or of an array on any device."""
    if isinstance(a, nf.Tensor):
        a = a.data
    return backend.to_numpy(a)


def shared_data_path(name="tinyshakespeare.txt"):
    """Path of a file in ../shared/data, or skip the test saying it is absent."""
    path = os.path.normpath(os.path.join(SHARED_DATA, name))
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent (tests that need ../shared/data skip without it)")
    return path


def signal_at_steps(monkeypatch, steps, signum=None):
    """Send `signum` (SIGINT by default) to this process as a training loop's progress bar reports
    each step in `steps` (pretrain, seq2seq and finetune all report through ProgressBar.update)."""
    import signal

    from npformer.training.progress import ProgressBar
    update = ProgressBar.update

    def update_and_signal(self, step, *args):
        update(self, step, *args)
        if step in steps:
            os.kill(os.getpid(), signal.SIGINT if signum is None else signum)
    monkeypatch.setattr(ProgressBar, "update", update_and_signal)
