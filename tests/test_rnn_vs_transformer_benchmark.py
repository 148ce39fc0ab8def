"""Tests for benchmarks/rnn_vs_transformer.py: the LSTM, the GRU and the GPT it compares have equal parameter
counts, and a --quick run prints every table with sane values. CPU only, a few seconds in all."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import DEVICE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "rnn_vs_transformer.py")
pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="benchmarks/rnn_vs_transformer.py runs on the CPU")

_spec = importlib.util.spec_from_file_location("rnn_vs_transformer_benchmark", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def expected_params(kind: str, V: int, T: int = 128) -> int:
    """The count from the layer shapes, written out independently of the models' code."""
    s = bench.SIZES[kind]
    L, C = s["n_layer"], s["n_embd"]
    if kind == "gpt":     # per block: qkv 3C^2 + 3C, proj C^2 + C, fc 4C^2 + 4C, fc_proj 4C^2 + C, two layer norms 4C
        return L * (12 * C * C + 13 * C) + V * C + T * C + 2 * C           # + tied wte, wpe, ln_f
    G = {"lstm": 4, "gru": 3}[kind]
    return L * (2 * G * C * C + 2 * G * C) + V * C + V                      # + tied encoder, decoder bias


@pytest.mark.parametrize("V", [32, 65])           # the toy language's and tiny Shakespeare's characters
def test_the_three_models_have_equal_parameter_counts(V):
    counts = {}
    for kind in bench.MODELS:
        model = bench.build_lm(kind, V, 128, seed=0)
        counts[kind] = bench.n_params(model)
        assert counts[kind] == expected_params(kind, V), kind
    assert bench.param_spread(counts.values()) < bench.PARAM_TOLERANCE, counts
    assert 250_000 < min(counts.values())                                  # the sizes the docs describe
    # the recurrent models are what `npformer pretrain --model lstm|gru` builds: tied, no dropout, biases
    rnn = bench.build_lm("lstm", V, 128, seed=0)
    assert rnn.decoder.weight is rnn.encoder.weight and rnn.config.dropout == 0 and rnn.config.bias


def test_param_spread_would_catch_a_drifted_size(monkeypatch):
    monkeypatch.setitem(bench.SIZES, "gpt", dict(n_layer=4, n_embd=128, n_head=4))   # pretrain's default GPT
    counts = [bench.n_params(bench.build_lm(k, 32, 128, seed=0)) for k in bench.MODELS]
    assert bench.param_spread(counts) > bench.PARAM_TOLERANCE


def test_position_windows_run_each_window_from_a_fresh_state():
    ids = np.random.default_rng(0).integers(0, 32, 3000)
    x, y = bench.windows(ids, 128, 5, 32)
    assert x.shape == y.shape == (5, 128) and (x[1, :96] == x[0, 32:]).all() and (y[:, :-1] == x[:, 1:]).all()
    model = bench.build_lm("lstm", 32, 128, seed=0)
    both = bench.window_losses(model, x, y)                                   # (5, 128)
    alone = bench.window_losses(model, x[1:2], y[1:2])
    np.testing.assert_allclose(both[1], alone[0], rtol=1e-5, atol=1e-6)     # no state carried from window 0


def table(stdout: str, title: str) -> list:
    """The rows (lists of cells) of the markdown table under the heading containing `title`."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("### ") and title in line)
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("### "):
            break
        if line.startswith("| ") and not line.startswith("| ---"):
            rows.append([c.strip() for c in line.split("|")[1:-1]])
    assert rows, f"no table under {title!r}"
    return rows[1:]                                                          # without the header


def number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("%"))


def test_quick_run_prints_every_table_with_sane_values(tmp_path):
    run = subprocess.run([sys.executable, SCRIPT, "--quick"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    corpora = ["built-in toy language"] + (["tiny Shakespeare"] if os.path.exists(bench.SHAKESPEARE) else [])
    if len(corpora) == 1:
        assert "tiny Shakespeare: skipped" in out
    for corpus in corpora:
        rows = table(out, f"{corpus}: after")
        assert [r[0] for r in rows] == list(bench.MODELS)
        params = [number(r[1]) for r in rows]
        assert bench.param_spread(params) < bench.PARAM_TOLERANCE
        for r in rows:
            assert number(r[2]) > 0 and 0.5 < number(r[5]) < 5                # s/step, a val loss above any floor
        assert rows[2][3] == "1.00"                                          # GPT's step time / its own
        if corpus == corpora[0]:
            assert len(rows[0]) == 8 and all(number(r[6]) > 0 for r in rows)  # above the context floor
        curve = table(out, f"{corpus}: validation loss during training")
        assert [int(r[0]) for r in curve] == [0, 1, 2]
        assert all(np.isfinite(number(c)) for r in curve for c in r[1::2])
        positions = table(out, f"{corpus}: loss at each position")
        assert [r[0] for r in positions][:3] == ["0", "1", "2"] and positions[-1][0] == "mean of all 128"
        assert all(0 < number(c) < 10 for r in positions for c in r[1:] if not c.endswith("%"))
        means = [c for c in positions[-1][1:] if not c.endswith("%")]       # (floor,) lstm, gru, gpt
        assert means[-3:] == [r[5] for r in rows]                            # the mean over positions is the val loss
    speed = table(out, "training speed")
    assert [int(r[0]) for r in speed] == [8, 16]
    for r in speed:
        assert int(r[0]) * int(r[1]) == 32 and all(number(c) > 0 for c in r[2:7])
        lstm_ops, gru_ops, gpt_ops = (number(c) for c in r[7:10])
        assert lstm_ops > 10 * int(r[0]) and gpt_ops < 100                   # T sequential cells against a few ops
    assert number(speed[1][7]) > 1.9 * number(speed[0][7])                   # the recurrent graph grows with T
    assert speed[0][9] == speed[1][9]                                        # the GPT's does not
    seq2seq = table(out, "seq2seq")
    assert [r[0] for r in seq2seq] == ["copy", "dates"]
    for r in seq2seq:
        assert int(r[1]) == bench.DEFAULT_ITERS[r[0]] and all(number(c) > 0 for c in r[2:])
