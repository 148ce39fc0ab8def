"""Tests for benchmarks/positions.py: every position scheme trains at 64 and runs at 128 (the learned
table refuses, naming its size), the position parameters get the gradients they should, and a --quick
run of the script prints the tables docs/positions.md shows. CPU only, a few seconds in all."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from npformer import Tensor, no_grad
from tests.helpers import DEVICE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "positions.py")
pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="benchmarks/positions.py runs on the CPU")

_spec = importlib.util.spec_from_file_location("positions_benchmark", SCRIPT)
positions = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(positions)

V = 11
SIZE = dict(n_layer=2, n_embd=16, n_head=2)


def tiny(scheme, seed=0):
    return positions.PositionLM(scheme, V, seed=seed, **SIZE)


def ids(B, T, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


@pytest.mark.parametrize("scheme", positions.SCHEMES)
def test_every_scheme_trains_at_64_and_runs_at_128_unless_learned(scheme):
    model = tiny(scheme)
    x, y = ids(2, 64)
    logits, loss = model(x, y)
    assert logits.shape == (2, 64, V) and np.isfinite(loss.item())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and np.abs(p.grad).sum() > 0, f"{scheme}: {name} got no gradient"
    x128, _ = ids(2, 128, seed=1)
    with no_grad():
        if scheme == "learned":
            with pytest.raises(positions.PositionsPastTable, match=r"64 rows .*128.*cannot extrapolate"):
                model(x128)
            return
        long, _ = model(x128)
        short, _ = model(x128[:, :64])
    assert long.shape == (2, 128, V) and np.isfinite(long.data).all()
    # causal, and the positions of the first 64 tokens do not depend on the length: the first 64 rows agree
    np.testing.assert_allclose(long.data[:, :64], short.data, rtol=1e-5, atol=1e-5)


def test_the_schemes_share_every_other_weight_and_differ_in_their_output():
    models = {s: tiny(s) for s in positions.SCHEMES}
    shared = dict(models["alibi"].named_parameters())
    assert not any(n.startswith(("pos", "rel", "rotary")) for n in shared)      # ALiBi adds no parameter
    for scheme, model in models.items():
        params = dict(model.named_parameters())
        for name, p in shared.items():
            np.testing.assert_array_equal(params[name].data, p.data, err_msg=f"{scheme}: {name}")
        assert set(params) - set(shared) == {"learned": {"pos.weight"}, "t5": {"rel.relative_attention_bias.weight"}
                                             }.get(scheme, set())
    x, _ = ids(1, 32)
    out = {s: m(x)[0].data for s, m in models.items()}
    for a in positions.SCHEMES:
        for b in positions.SCHEMES:
            if a < b:
                assert np.abs(out[a] - out[b]).max() > 1e-4, f"{a} and {b} give the same logits"


def test_t5_gradient_reaches_exactly_the_buckets_seen_in_training():
    model = tiny("t5")
    x, y = ids(2, 64)
    model(x, y)[1].backward()
    table = model.rel.relative_attention_bias.weight                           # (32, n_head)
    buckets = model.rel.buckets(64, 64)                                        # (64, 64)
    seen = np.unique(buckets[np.tril_indices(64)])                             # distances 0..63
    unseen = np.setdiff1d(np.arange(32), seen)
    assert set(range(16)) <= set(seen) and 31 in unseen                        # 16 exact buckets, then log ones
    assert (np.abs(table.grad[seen]).min(axis=1) > 0).all()
    np.testing.assert_array_equal(table.grad[unseen], 0)                       # longer distances: never trained
    # a longer evaluation uses them: bucket 31 holds every distance >= 128
    assert 31 in model.rel.buckets(256, 256)[np.tril_indices(256)]


def test_alibi_has_no_position_parameter_yet_the_bias_reaches_the_attention(monkeypatch):
    model = tiny("alibi")
    x, y = ids(2, 64)
    logits, loss = model(x, y)
    loss.backward()
    assert model.blocks[0].qkv.weight.grad is not None and np.abs(model.blocks[0].qkv.weight.grad).sum() > 0
    seen = []
    real = positions.ops.attention

    def spy(q, k, v, **kw):
        seen.append(kw["bias"])
        return real(q, k, v, **kw)
    monkeypatch.setattr(positions.ops, "attention", spy)
    with no_grad():
        again, _ = model(x)
    np.testing.assert_array_equal(again.data, logits.data)
    assert len(seen) == SIZE["n_layer"]
    bias = seen[0].data                                                         # (H, T, T)
    slopes = positions.nn.alibi_slopes(SIZE["n_head"])
    np.testing.assert_allclose(bias[:, 10, 3], -slopes * 7, rtol=1e-6)           # -m_h (i - j)
    assert bias.shape == (SIZE["n_head"], 64, 64) and bias.dtype == logits.dtype


def test_evaluate_reports_n_a_past_the_learned_table_and_raises_other_errors():
    class Args:
        eval_tokens = 512
    val = np.random.default_rng(0).integers(0, V, 2000)
    out = positions.evaluate(tiny("learned"), val, Args)
    assert out[128] == out[256] == "n/a (a 64-row table)"
    assert out[64].shape == (8, 64) and np.isfinite(out[64]).all()

    class Refuses:                                  # a model that raises ValueError past 64 characters
        def __init__(self, max_positions):
            self.max_positions = max_positions

        def eval(self):
            pass

        train = eval

        def __call__(self, x):
            if x.shape[1] > 64:
                raise ValueError(f"refused {x.shape[1]}")
            return Tensor(np.zeros(x.shape + (V,), dtype=np.float32)), None
    assert positions.evaluate(Refuses(64), val, Args)[128] == "n/a (a 64-row table)"
    with pytest.raises(ValueError, match="refused 128"):
        positions.evaluate(Refuses(None), val, Args)                           # no table: a real error
    with pytest.raises(ValueError, match="refused 128"):
        positions.evaluate(Refuses(128), val, Args)                            # within its table: a real error


def test_quick_run_prints_both_tables_and_writes_the_plot(tmp_path):
    plot = tmp_path / "positions.png"
    run = subprocess.run([sys.executable, SCRIPT, "--quick", "--plot", str(plot)], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    rows = {line.split("|")[1].strip(): line for line in run.stdout.splitlines() if line.startswith("| ")}
    for name in (*positions.SCHEMES, "GPT-style", "LLaMA-style"):
        assert name in rows, f"no row for {name} in:\n{run.stdout}"
        cells = [c.strip() for c in rows[name].split("|")[1:-1]]
        assert len(cells) == 9
        if name in ("learned", "GPT-style"):
            assert cells[5] == cells[7] == "n/a (a 64-row table)"
        else:
            assert all(float(cells[i]) > 0.5 for i in (3, 5, 7))                # a val loss, above any floor
    assert "the position table has 64 rows" in run.stderr and "block_size 64" in run.stderr   # learned, GPT
    pytest.importorskip("matplotlib")
    assert plot.stat().st_size > 10_000
