"""Shared test set-up: the device under test, hypothesis profiles, and tensor helpers.

The suite runs on the device named by NPFORMER_DEVICE ("cpu" when unset); with
NPFORMER_DEVICE=gpu every test runs on CuPy, or the session is skipped with
the reason when no GPU is usable.
"""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import npformer
from npformer import backend

settings.register_profile(
    "ci", deadline=None, derandomize=True, max_examples=25, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "dev", deadline=None, derandomize=True, max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "thorough", deadline=None, max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

from tests.helpers import DEVICE


def pytest_collection_modifyitems(config, items):
    if DEVICE == "gpu" and not backend.gpu_available():
        skip = pytest.mark.skip(reason=f"NPFORMER_DEVICE=gpu but {backend.gpu_unavailable_reason()}")
        for item in items:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    """NPFORMER_DEBUG unset: the CLI's errors are one line, never a traceback, in every test."""
    monkeypatch.delenv("NPFORMER_DEBUG", raising=False)


@pytest.fixture(params=["reference", "fast"])
def ops_path(request):
    """Each test that uses it runs twice: under npformer.ops.use("reference") and use("fast")."""
    with npformer.ops.use(request.param):
        yield request.param


@pytest.fixture(scope="module")
def fast_ops():
    """The fast path for a whole module, here and in the interpreters it starts (NPFORMER_OPS=fast):
    for tests that measure what the fast ops hold, such as the memory estimate's."""
    with pytest.MonkeyPatch.context() as mp, npformer.ops.use("fast"):
        mp.setenv("NPFORMER_OPS", "fast")
        yield


@pytest.fixture
def device():
    """The device under test: "cpu" or "gpu"."""
    return DEVICE


@pytest.fixture
def xp():
    """The array module of the device under test."""
    return backend.xp_for(DEVICE) if DEVICE == "cpu" or backend.gpu_available() else np




def pytest_configure(config):
    # CI sets NPFORMER_REQUIRE_VERIFY=1: the PyTorch comparisons must run there, never skip.
    if os.environ.get("NPFORMER_REQUIRE_VERIFY"):
        try:
            import torch  # noqa: F401  (imported to prove it is installed)
            import transformers  # noqa: F401
        except ImportError as exc:
            raise pytest.UsageError(f"NPFORMER_REQUIRE_VERIFY is set but {exc}; install '.[verify]'")
