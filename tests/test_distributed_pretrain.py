"""``mpiexec -n 2 npformer pretrain`` (and ``finetune``): the commands over two ranks (a 1-layer GPT,
seconds a run).

Resumed over ranks it ends bit for bit where the uninterrupted run does, and that run equals
the single-process run with the same shards (float32, to rounding: here bit for bit); rank 0
alone writes; a mismatch or an error at start-up ends both ranks with one line; a rank that
dies ends the run and leaves the last checkpoint intact. (An indivisible --batch-size is refused by
distributed.share, test_distributed.py.) Fine-tuning over two ranks follows the single-process run's
losses to float32 rounding.
"""

import json
import os
import signal
import sys
import time

import numpy as np
import pytest

from npformer.training.checkpoint import load_checkpoint
from npformer.training.pretrain import PretrainConfig, pretrain
from tests.test_distributed_mpi import launch, skip_reason

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))

FLAGS = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32", "--batch-size", "8",
         "--eval-interval", "3", "--eval-iters", "2", "--samples", "0", "--dropout", "0.1",
         "--warmup-iters", "1", "--lr-decay-iters", "6"]
# `npformer` without matplotlib: drawing loss.png would take most of each run's few seconds
NPFORMER = [sys.executable, "-c", "import sys; sys.modules['matplotlib'] = None; import npformer.cli; "
                                  "sys.exit(npformer.cli.main())"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = "the cat dog sees a red boat near river small big runs sleeps".split()
    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    path.write_text(" ".join(rng.choice(words, 6000)))
    return str(path)


def pretrain_ranks(data, out, *extra, n=2, timeout=90):
    return launch(NPFORMER + ["pretrain", "--data", data, "--out", out] + FLAGS + list(extra), n, timeout)


def weights(out, step=6):
    z = np.load(os.path.join(out, f"ckpt-{step:06d}", "model.npz"))
    return {k: z[k] for k in z.files}


def test_two_ranks_resume_bit_for_bit_and_equal_one_process(data, tmp_path, monkeypatch):
    whole, halves = str(tmp_path / "whole"), str(tmp_path / "halves")
    r = pretrain_ranks(data, whole, "--max-iters", "6")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("done in") == 1 and r.stderr.count("step 6: train") == 1     # rank 0 alone logs
    assert "2 ranks (mpi), 2 shards of the global batch of 8" in r.stdout
    assert len(open(os.path.join(whole, "metrics.jsonl")).readlines()) == 2
    assert json.load(open(os.path.join(whole, "ckpt-000006", "meta.json")))["ranks"] == 2
    assert pretrain_ranks(data, halves, "--max-iters", "3").returncode == 0
    r = launch(NPFORMER + ["pretrain", "--resume", "--max-iters", "6", "--out", halves], 2, 90)
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stdout and r.stdout.count("resuming from") == 1
    a, b = weights(whole), weights(halves)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    single = dict(zip([f.lstrip("-").replace("-", "_") for f in FLAGS[::2]], FLAGS[1::2]))
    cfg = PretrainConfig(**{k: (float if k in ("dropout",) else int)(v) for k, v in single.items()},
                         data=data, out=str(tmp_path / "single"), max_iters=6, workers=1, shards=2)
    monkeypatch.setitem(sys.modules, "matplotlib", None)           # no loss.png (seconds)
    pretrain(cfg, log=lambda *args: None)
    c = weights(str(tmp_path / "single"))
    for k in a:
        np.testing.assert_allclose(a[k], c[k], rtol=1e-5, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("rank1, message", [
    (["--lr", "1e-3"], "npformer: error: the ranks disagree at start-up: rank 1 differs from rank 0 in config.lr "
                       "(rank 0: 0.002, rank 1: 0.001)"),
    (["--eval-iters", "0"], "npformer: error: rank 1: --eval-iters must be a positive integer; got 0"),
])
def test_a_mismatch_or_an_error_at_start_up_ends_both_ranks_in_one_line(data, tmp_path, rank1, message):
    out = str(tmp_path / "run")
    cmd = NPFORMER + ["pretrain", "--data", data, "--out", out] + FLAGS + ["--max-iters", "6"]
    r = launch(cmd + [":", "-n", "1"] + cmd + rank1, n=1, timeout=60)
    assert r.returncode == 2
    assert r.stderr.count("npformer: error:") == 1 and message in r.stderr, r.stderr
    assert not os.path.exists(out)                          # nothing written


def _rank_pid(out, rank):
    """The process id of rank `rank` of the run writing into `out` (from /proc)."""
    for pid in os.listdir("/proc"):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if out.encode() in cmd and any(b"npformer.cli" in c for c in cmd) and f"PMI_RANK={rank}".encode() in env:
            return int(pid)
    return None


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the rank's process in /proc")
def test_a_rank_that_dies_ends_the_run_and_leaves_the_last_checkpoint(data, tmp_path):
    import subprocess
    from tests.test_distributed_mpi import ROOT, mpiexec
    out = str(tmp_path / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.Popen([mpiexec(), "-n", "2"] + NPFORMER + ["pretrain", "--data", data, "--out", out] + FLAGS
                            + ["--max-iters", "100000", "--eval-interval", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(out, "latest.json")) and time.monotonic() < deadline:
            time.sleep(0.1)
        pid = _rank_pid(out, 1)
        assert pid is not None, "rank 1 not found"
        os.kill(pid, signal.SIGKILL)
        said = b"".join(proc.communicate(timeout=30)).decode()
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "Killed (signal 9)" in said or "BAD TERMINATION" in said, said
    ckpt = load_checkpoint(out)                             # the newest checkpoint loads, verified
    assert ckpt.step >= 2 and ckpt.step % 2 == 0


def test_finetune_over_two_ranks_follows_one_process(tmp_path, monkeypatch):
    from npformer.data.corpus import ToyLanguage
    from npformer.training.finetune import FinetuneConfig, finetune
    monkeypatch.setitem(sys.modules, "matplotlib", None)           # no loss.png (seconds)
    text = tmp_path / "toy.txt"
    text.write_text(ToyLanguage(seed=0).generate(20_000, seed=1))   # every character of the task
    pre = str(tmp_path / "pre")
    pretrain(PretrainConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, batch_size=4, max_iters=2, eval_iters=1,
                            samples=0, data=str(text), out=pre, workers=1), log=lambda *args: None)
    flags = dict(task="sentiment", max_iters=4, batch_size=8, lr=3e-3)
    r = launch(NPFORMER + ["finetune", "--ckpt", pre, "--out", str(tmp_path / "ranks")]
               + [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()], 2, 90)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("test accuracy:") == 1                    # rank 0 alone reports
    finetune(FinetuneConfig(ckpt=pre, out=str(tmp_path / "one"), **flags), log=lambda *args: None)
    runs = [json.load(open(tmp_path / d / "ckpt-000004" / "meta.json"))["run"]["recent"] for d in ("ranks", "one")]
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-6)         # the same losses, to float32 rounding
