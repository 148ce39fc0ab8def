"""``mpiexec -n 2 npformer seq2seq``: the seq2seq loop over two ranks (seq2seq_ranks.py; a 1-layer
model, about a second a launch).

The step over two ranks gives one process's gradient of the whole batch, for every --arch, in
float64 through the library (each rank's mean loss weighted by its share of the batch's target
tokens); the command over two ranks follows the single-process run to float32 rounding, repeats
bit for bit, resumes bit for bit, stops together on Ctrl-C; rank 0 alone logs and writes; an
indivisible --batch-size or ranks that disagree end the run with one line. Skipped without MPI.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.test_distributed_mpi import ROOT, launch, mpiexec, skip_reason

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))

TINY = dict(task="copy", d_model=16, nhead=2, num_layers=1, dim_feedforward=32, batch_size=16, warmup=10,
            lr_factor=0.2, n_test=20, device="cpu", eval_interval=2)
FLAGS = [a for k, v in TINY.items() for a in (f"--{k.replace('_', '-')}", str(v))]
# `npformer` without matplotlib (no attention maps are asked for; importing it costs a second)
NPFORMER = [sys.executable, "-c", "import sys; sys.modules['matplotlib'] = None; import npformer.cli; "
                                  "sys.exit(npformer.cli.main())"]


def seq2seq_ranks(out, *extra, n=2, timeout=60):
    return launch(NPFORMER + ["seq2seq", "--out", out] + FLAGS + list(extra), n, timeout)


def arrays(out, step, name="model.npz"):
    z = np.load(os.path.join(out, f"ckpt-{step:06d}", name))
    return {k: z[k] for k in z.files}


def fixed_loss(out):
    """The loss of the model in `out` on 64 held-out pairs (eval mode)."""
    from npformer.data.tasks import get_task, make_batch
    from npformer.training.seq2seq import load_seq2seq, loss_fn
    model, tok, _ = load_seq2seq(out, device="cpu")
    return loss_fn(model, *make_batch(tok, get_task("copy").test_set(64, seed=99)), 0.0).item()


def same_bits(a, b):
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ what each rank runs (library check)
def _rel(pairs):
    """max |a - b| / max |b| over all the arrays (pairs): relative to the largest gradient, since a key
    bias's whole gradient is rounding noise (~1e-22 here), which no elementwise tolerance fits."""
    pairs = list(pairs)
    return max(float(np.abs(a - b).max()) for a, b in pairs) / max(float(np.abs(b).max()) for _, b in pairs)


def rank_main():
    """On each rank, for every --arch: three Adam steps of one float64 model through rank_step and of
    another through one process's loss_fn on the whole batch; print the worst differences."""
    from npformer import distributed
    from npformer.data.tasks import PAD, TaskTokenizer, get_task, make_batch
    from npformer.optim import Adam
    from npformer.training.seq2seq import Seq2SeqTrainConfig, build_model, loss_fn
    from npformer.training.seq2seq_ranks import rank_step
    comm = distributed.communicator("mpi")
    for arch in ("transformer", "bart", "t5", "rnn"):
        cfg = Seq2SeqTrainConfig(**{**TINY, "arch": arch, "dropout": 0.0}).checked()
        task = get_task(cfg.task)
        tok = TaskTokenizer.for_task(task)
        ranked, alone = (build_model(cfg, task, np.random.default_rng(0))[0].double() for _ in range(2))
        opt_r, opt_a = (Adam(m.parameters(), lr=1e-2, betas=(0.9, 0.98), eps=1e-9) for m in (ranked, alone))
        rng, worst, moved = np.random.default_rng(1), 0.0, 0.0
        for _ in range(3):
            batch = make_batch(tok, task.batch(rng, 6))             # (6, S), (6, T), (6, T)
            counts = [(batch[2][rows] != PAD).sum() for rows in (slice(0, 3), slice(3, 6))]
            assert counts[0] != counts[1], counts                   # the ranks' shares of tokens differ
            value = rank_step(ranked, batch, cfg.label_smoothing, comm, "cpu")
            loss = loss_fn(alone, *batch, cfg.label_smoothing)
            loss.backward()
            worst = max(worst, abs(value - loss.item()) / loss.item())
            worst = max(worst, _rel((p.grad, q.grad) for p, q in zip(ranked.parameters(), alone.parameters())))
            for opt in (opt_r, opt_a):
                opt.step()
                opt.zero_grad()
        for p, q in zip(ranked.parameters(), alone.parameters()):
            moved = max(moved, float(np.abs(p.data - q.data).max()))
        assert worst < 1e-12 and moved < 1e-9, (arch, worst, moved)
        if comm.gather_json([worst, moved]) is not None:
            print(f"{arch} ok: gradients, losses {worst:.1e} relative; weights {moved:.1e}")


# ------------------------------------------------------------------ the tests
def test_step_over_two_ranks_is_one_process_step_in_float64_for_every_arch():
    # the whole batch's gradient and loss, three steps running, to 1e-12 relative: only the order of
    # the float64 sums differs (a rank's products run over 3 rows, not 6); an unweighted mean of the
    # ranks' losses would miss by the share of tokens (the batch's rows differ in length). The weights
    # after three Adam steps agree to 1e-9 absolute, not 1e-12 relative: the attention's key bias has
    # gradient 0 in exact arithmetic (softmax ignores a shift of every score), so its float64 gradient
    # is rounding noise (~1e-17 to 1e-22), which Adam divides by eps = 1e-9 into steps that differ
    # with the order of the sums (measured: 4e-11); a real error would move a weight by ~lr = 1e-2
    r = launch([sys.executable, "-c", "import tests.test_distributed_seq2seq as t; t.rank_main()"], 2, 90)
    assert r.returncode == 0, r.stderr
    assert [line.split()[:2] for line in r.stdout.splitlines()] == [[a, "ok:"] for a in ("transformer", "bart", "t5",
                                                                                         "rnn")], r.stdout


def test_two_ranks_follow_one_process_in_float32(tmp_path, monkeypatch):
    from npformer.training.seq2seq import Seq2SeqTrainConfig, train
    ranks = str(tmp_path / "ranks")
    r = seq2seq_ranks(ranks, "--dropout", "0", "--max-iters", "4")
    assert r.returncode == 0, r.stderr
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    one = str(tmp_path / "one")
    train(Seq2SeqTrainConfig(**TINY, dropout=0.0, max_iters=4, out=one), log=lambda *a: None)
    # float32: each step's sums run in another order (per rank, then across the ranks), so the runs
    # part by float32 rounding (6e-8 relative an operation; measured 1e-8 to 1e-7 on these losses). The
    # weights are compared through what they compute, not one by one: the key bias's gradient is
    # float32 rounding noise (see the float64 test), which Adam turns into steps of ~lr in either
    # direction (measured: 3e-3 on those entries, which change no output, and 3e-5 on a few weights
    # whose gradients are as small)
    for step in (2, 4):
        losses = [json.load(open(os.path.join(d, f"ckpt-{step:06d}", "meta.json")))["results"]["loss"]
                  for d in (ranks, one)]
        np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
    held_out = [fixed_loss(d) for d in (ranks, one)]
    np.testing.assert_allclose(held_out[0], held_out[1], rtol=1e-6)


def test_two_rank_run_repeats_and_resumes_bit_for_bit_and_rank_0_alone_writes(tmp_path):
    whole, again, halves = (str(tmp_path / d) for d in ("whole", "again", "halves"))
    r = seq2seq_ranks(whole, "--max-iters", "4")                    # dropout 0.1: each rank its own seed
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("task copy:") == 1 and r.stdout.count("done: 4 steps") == 1     # rank 0 alone logs
    assert "2 ranks (mpi), 8 rows each of the global batch of 16" in r.stdout
    assert r.stderr.count("step 4: greedy exact match") == 1
    assert sorted(os.listdir(whole)) == [".lock", "ckpt-000002", "ckpt-000004", "latest.json", "run.json"]
    assert seq2seq_ranks(again, "--max-iters", "4").returncode == 0
    for name in ("model.npz", "optimizer.npz"):
        assert same_bits(arrays(whole, 4, name), arrays(again, 4, name)), name
    assert seq2seq_ranks(halves, "--max-iters", "2").returncode == 0
    r = launch(NPFORMER + ["seq2seq", "--resume", "--max-iters", "4", "--out", halves], 2, 60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("resuming from") == 1 and "note:" not in r.stdout
    for name in ("model.npz", "optimizer.npz"):
        assert same_bits(arrays(whole, 4, name), arrays(halves, 4, name)), name


@pytest.mark.parametrize("rank1, message", [
    (["--batch-size", "15"], "npformer: error: --batch-size (15) must be divisible by the rank count (2): it is "
                             "the global batch, split evenly across the ranks"),
    (["--lr-factor", "0.3"], "npformer: error: the ranks disagree at start-up: rank 1 differs from rank 0 in "
                             "config.lr_factor (rank 0: 0.2, rank 1: 0.3)"),
])
def test_an_indivisible_batch_or_a_mismatch_ends_both_ranks_in_one_line(tmp_path, rank1, message):
    out = str(tmp_path / "run")
    cmd = NPFORMER + ["seq2seq", "--out", out] + FLAGS + ["--max-iters", "4"]
    both = rank1[0] == "--batch-size"                               # the batch: on both ranks
    r = launch(cmd + rank1 if both else cmd + [":", "-n", "1"] + cmd + rank1, n=2 if both else 1, timeout=60)
    assert r.returncode == 2
    assert r.stderr.count("npformer: error:") == 1 and message in r.stderr, r.stderr
    assert not os.path.exists(out)                                  # nothing written


def test_ctrl_c_stops_both_ranks_at_one_step_that_rank_0_saves(tmp_path):
    out = str(tmp_path / "run")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "MV2_"))},
           "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.Popen([mpiexec(), "-n", "2"] + NPFORMER + ["seq2seq", "--out", out] + FLAGS
                            + ["--max-iters", "100000", "--eval-interval", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(out, "latest.json")) and time.monotonic() < deadline:
            time.sleep(0.05)                                        # step 3 saved: both ranks in the loop
        proc.send_signal(signal.SIGINT)                             # mpiexec forwards it to the ranks
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert stderr.count("npformer: saved step") == 1, stderr        # rank 0 alone reports it
    step = int(stderr.split("npformer: saved step ")[1].split()[0])
    assert step >= 3 and os.path.isdir(os.path.join(out, f"ckpt-{step:06d}"))
    r = launch(NPFORMER + ["seq2seq", "--resume", "--max-iters", str(step + 1), "--out", out], 2, 60)
    assert r.returncode == 0, r.stderr
    assert f"resuming from {out}" in r.stdout and r.stdout.count(f"done: {step + 1} steps") == 1
