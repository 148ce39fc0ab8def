"""Pretraining: bit-exact resume (in process, and after SIGKILL of the CLI), the original
schedule on resume, refusing to overwrite a run, metrics.jsonl and loss.png."""

import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from npformer.data import DataError
from npformer.training.checkpoint import CheckpointError, load_checkpoint
from npformer.training import pretrain as pretrain_module
from npformer.training.pretrain import PretrainConfig, pretrain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the cat sat on a mat and dog ran far away with big red ball to my house".split()
METRIC_FIELDS = {"step", "train_loss", "val_loss", "lr", "elapsed_s"}


def write_corpus(path, n_words=400, seed=0):
    """A small deterministic text file (about 1,700 characters, 18 distinct characters)."""
    rng = np.random.default_rng(seed)
    words = rng.choice(WORDS, n_words)
    text = "".join(w + ("." if i % 9 == 8 else "") + ("\n" if i % 27 == 26 else " ") for i, w in enumerate(words))
    path = str(path)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


CLI = [sys.executable, "-m", "npformer.cli"]
CLI_ENV = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}


def start_until_checkpoint(flags, out):
    """A `npformer pretrain` process on `flags` into `out`, returned once its first checkpoint is written."""
    proc = subprocess.Popen(CLI + ["pretrain", *flags, "--out", out], env=CLI_ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(out, "latest.json")):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no checkpoint within 60 s: {proc.communicate()[1].decode()}")
        time.sleep(0.01)
    return proc


def tiny(tmp_path, out="run", **kw):
    """A PretrainConfig that trains in well under a second."""
    data = tmp_path / "data.txt"
    if not data.exists():
        write_corpus(data)
    base = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, max_iters=12, warmup_iters=2,
                eval_interval=4, eval_iters=2, samples=0, device="cpu", data=str(data), out=str(tmp_path / out))
    return PretrainConfig(**{**base, **kw})


def quiet(*args):
    pass


def tree_digest(root):
    """{relative path: sha256} of every file under root, and every directory (value None)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in filenames:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def losses(records):
    return [(r["step"], r["train_loss"], r["val_loss"], r["lr"]) for r in records]


def assert_same_checkpoint(out_a, out_b):
    a, b = load_checkpoint(out_a), load_checkpoint(out_b)
    assert a.step == b.step
    for state_a, state_b in ((a.model_state, b.model_state), (a.optimizer_state, b.optimizer_state)):
        assert set(state_a) == set(state_b)
        for k in state_a:
            assert state_a[k].dtype == state_b[k].dtype, k
            np.testing.assert_array_equal(state_a[k], state_b[k], err_msg=k)   # bit for bit
    assert a.meta["run"] == b.meta["run"]


# ----------------------------------------------------------------------------- exact resume

@pytest.mark.parametrize("dropout,k", [(0.0, 8), (0.2, 6)])
def test_stop_and_resume_is_bit_exact(tmp_path, dropout, k):
    full = pretrain(tiny(tmp_path, "a", dropout=dropout), log=quiet)
    # run b: stopped after k steps (schedule given explicitly), resumed to the end with the
    # schedule taken from its checkpoint
    pretrain(tiny(tmp_path, "b", dropout=dropout, max_iters=k, lr_decay_iters=12), log=quiet)
    assert load_checkpoint(str(tmp_path / "b")).step == k
    resumed = pretrain(tiny(tmp_path, "b", dropout=dropout, resume=True), log=quiet)
    assert_same_checkpoint(str(tmp_path / "a"), str(tmp_path / "b"))
    assert resumed["val_loss"] == full["val_loss"] and resumed["best_val"] == full["best_val"]
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in a] == [4, 8, 12]
    assert [r["step"] for r in b] == sorted({4, 8, 12, k})      # b also evaluated where it stopped
    assert losses(a) == losses([r for r in b if r["step"] in (4, 8, 12)])


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_resume_is_bit_exact_for_each_worker_count(tmp_path, workers):
    full = pretrain(tiny(tmp_path, "a", dropout=0.2, workers=workers), log=quiet)
    pretrain(tiny(tmp_path, "b", dropout=0.2, workers=workers, max_iters=6, lr_decay_iters=12), log=quiet)
    resumed = pretrain(tiny(tmp_path, "b", dropout=0.2, workers=workers, resume=True), log=quiet)
    assert_same_checkpoint(str(tmp_path / "a"), str(tmp_path / "b"))
    assert resumed["val_loss"] == full["val_loss"]


def test_resume_with_another_worker_count_says_so(tmp_path):
    pretrain(tiny(tmp_path, "b", workers=2, max_iters=6, lr_decay_iters=12), log=quiet)
    lines = []
    pretrain(tiny(tmp_path, "b", workers=1, resume=True), log=lines.append)
    assert any("used 2 workers and this one uses 1" in line and "--workers 2" in line for line in lines)


def test_worker_counts_agree_without_dropout(tmp_path):
    one = pretrain(tiny(tmp_path, "one", workers=1), log=quiet)
    three = pretrain(tiny(tmp_path, "three", workers=3), log=quiet)
    a, b = load_checkpoint(str(tmp_path / "one")), load_checkpoint(str(tmp_path / "three"))
    for k in a.model_state:         # float32, 12 steps: only the summation order differs
        np.testing.assert_allclose(a.model_state[k], b.model_state[k], rtol=1e-3, atol=1e-5, err_msg=k)
    assert three["val_loss"] == pytest.approx(one["val_loss"], rel=1e-4)


@pytest.mark.parametrize("workers,device,match", [(0, "cpu", "--workers must be a positive integer; got 0"),
                                                  (True, "cpu", "--workers must be a positive integer"),
                                                  (2, "gpu", "--workers 2 splits the batch over CPU workers")])
def test_bad_worker_counts_are_refused(tmp_path, workers, device, match):
    with pytest.raises(ValueError, match=match):
        pretrain(tiny(tmp_path, workers=workers, device=device), log=quiet)


def test_shards_accumulate_gradients_and_resume_keeps_them(tmp_path):
    """--shards 4 (2 per worker): same training as the default cut up to float rounding; the
    checkpoint records the shards (so `npformer pretrain --resume` keeps them) and a resume
    with them is bit-exact with the uninterrupted run."""
    from npformer.cli import _saved_settings
    base = pretrain(tiny(tmp_path, "base", workers=2), log=quiet)
    full = pretrain(tiny(tmp_path, "a", workers=2, shards=4, dropout=0.2), log=quiet)
    pretrain(tiny(tmp_path, "b", workers=2, shards=4, dropout=0.2, max_iters=6, lr_decay_iters=12), log=quiet)
    assert _saved_settings("pretrain", str(tmp_path / "b"), ["shards"]) == {"shards": 4}
    resumed = pretrain(tiny(tmp_path, "b", workers=2, shards=4, dropout=0.2, resume=True), log=quiet)
    assert_same_checkpoint(str(tmp_path / "a"), str(tmp_path / "b"))
    assert resumed["val_loss"] == full["val_loss"]
    no_dropout = pretrain(tiny(tmp_path, "c", workers=2, shards=4), log=quiet)
    assert no_dropout["val_loss"] == pytest.approx(base["val_loss"], rel=1e-4)


@pytest.mark.parametrize("shards", [0, -1, True, 2.0])
def test_bad_shard_counts_are_refused(tmp_path, shards):
    with pytest.raises(ValueError, match="--shards must be a positive integer"):
        pretrain(tiny(tmp_path, shards=shards), log=quiet)


def test_resume_keeps_the_original_schedule(tmp_path):
    """lr_decay_iters defaults to max_iters; a resume with a larger --max-iters keeps the old decay."""
    pretrain(tiny(tmp_path, "a", lr_decay_iters=8), log=quiet)
    pretrain(tiny(tmp_path, "b", max_iters=8), log=quiet)           # lr_decay_iters -> 8
    pretrain(tiny(tmp_path, "b", max_iters=12, resume=True), log=quiet)
    assert_same_checkpoint(str(tmp_path / "a"), str(tmp_path / "b"))
    assert load_checkpoint(str(tmp_path / "b")).meta["pretrain_config"]["lr_decay_iters"] == 8
    assert losses(read_metrics(tmp_path / "a")) == losses(read_metrics(tmp_path / "b"))
    # an explicit --lr-decay-iters on resume still wins
    pretrain(tiny(tmp_path, "c", max_iters=8), log=quiet)
    pretrain(tiny(tmp_path, "c", max_iters=12, lr_decay_iters=12, resume=True), log=quiet)
    assert read_metrics(tmp_path / "c")[-1]["lr"] != read_metrics(tmp_path / "b")[-1]["lr"]


def test_resume_drops_metrics_written_after_the_checkpoint(tmp_path):
    """A run killed between appending a metrics record (or half of one) and saving its checkpoint."""
    pretrain(tiny(tmp_path, "a"), log=quiet)
    pretrain(tiny(tmp_path, "b", max_iters=8, lr_decay_iters=12), log=quiet)
    with open(tmp_path / "b" / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 12, "train_loss": 9.0, "val_loss": 9.0, "lr": 0.0, "elapsed_s": 1.0}) + "\n")
        f.write('{"step": 16, "train_lo')                            # torn by the kill
    pretrain(tiny(tmp_path, "b", resume=True), log=quiet)
    assert losses(read_metrics(tmp_path / "a")) == losses(read_metrics(tmp_path / "b"))


def test_resume_of_a_finished_run(tmp_path):
    cfg = tiny(tmp_path)
    pretrain(cfg, log=quiet)
    before = tree_digest(cfg.out)
    lines = []
    summary = pretrain(tiny(tmp_path, resume=True), log=lines.append)   # nothing left to do
    assert summary["step"] == 12 and any("nothing to do" in line for line in lines)
    assert {k: v for k, v in tree_digest(cfg.out).items() if k != "loss.png"} == \
           {k: v for k, v in before.items() if k != "loss.png"}
    with pytest.raises(ValueError, match="--max-iters 8 .* step 12"):
        pretrain(tiny(tmp_path, max_iters=8, resume=True), log=quiet)


def test_resume_refuses_other_settings(tmp_path):
    cfg = tiny(tmp_path)
    pretrain(cfg, log=quiet)
    before = tree_digest(cfg.out)
    for change, name in (({"n_embd": 32}, "n_embd"), ({"n_head": 4}, "n_head"), ({"seed": 1}, "seed"),
                         ({"block_size": 8}, "block_size"), ({"batch_size": 2}, "batch_size")):
        with pytest.raises(CheckpointError, match=f"other settings: {name} \\(checkpoint"):
            pretrain(tiny(tmp_path, resume=True, **change), log=quiet)
    with pytest.raises(CheckpointError, match="nothing to resume: .*nothing-here does not exist"):
        pretrain(tiny(tmp_path, "nothing-here", resume=True), log=quiet)
    assert not (tmp_path / "nothing-here").exists()
    assert tree_digest(cfg.out) == before


# ----------------------------------------------------------------------------- never overwrite

@pytest.mark.parametrize("damage", ["none", "corrupt latest.json", "no latest.json"])
def test_new_run_refuses_an_out_dir_with_a_checkpoint(tmp_path, damage):
    cfg = tiny(tmp_path, max_iters=4)
    pretrain(cfg, log=quiet)
    if damage == "corrupt latest.json":
        (tmp_path / "run" / "latest.json").write_text("{")
    elif damage == "no latest.json":          # killed before the first latest.json was written
        os.remove(tmp_path / "run" / "latest.json")
    before = tree_digest(cfg.out)
    with pytest.raises(CheckpointError, match="already holds a checkpoint.*--resume"):
        pretrain(cfg, log=quiet)
    assert tree_digest(cfg.out) == before


def test_fresh_run_starts_a_new_metrics_file(tmp_path):
    """An out dir left by a run killed before its first checkpoint: its marker and a metrics.jsonl."""
    cfg = tiny(tmp_path)
    os.makedirs(cfg.out)
    with open(os.path.join(cfg.out, "run.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps({"format": "npformer-run", "command": "pretrain"}))
    with open(os.path.join(cfg.out, "metrics.jsonl"), "w", encoding="utf-8") as f:
        f.write(json.dumps({"step": 4, "train_loss": 9.0, "val_loss": 9.0, "lr": 0.1, "elapsed_s": 0.1}) + "\n")
    pretrain(cfg, log=quiet)
    assert [r["step"] for r in read_metrics(cfg.out)] == [4, 8, 12]
    assert read_metrics(cfg.out)[0]["val_loss"] != 9.0


def test_corpus_shorter_than_a_block(tmp_path):
    (tmp_path / "short.txt").write_text("the cat sat on the mat")
    with pytest.raises(DataError, match="shorter than one block"):
        pretrain(tiny(tmp_path, data=str(tmp_path / "short.txt")), log=quiet)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- metrics, plot, samples

def test_metrics_records_and_summary(tmp_path):
    lines = []
    summary = pretrain(tiny(tmp_path, max_iters=10, samples=1, sample_tokens=7), log=lines.append)
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [4, 8, 10]              # every eval_interval, and the end
    for field in METRIC_FIELDS:                                     # the fields the module documents
        assert f"\n    {field} " in pretrain_module.__doc__, field
    for r in records:
        assert set(r) == METRIC_FIELDS
        assert all(isinstance(r[f], float) and np.isfinite(r[f]) for f in METRIC_FIELDS - {"step"})
        assert 0 < r["train_loss"] < 4 and 0 < r["val_loss"] < 4 and r["elapsed_s"] >= 0
    assert [r["elapsed_s"] for r in records] == sorted(r["elapsed_s"] for r in records)
    assert summary["step"] == 10 and summary["val_loss"] == records[-1]["val_loss"]
    assert summary["best_val"] == min(r["val_loss"] for r in records)
    assert records[0]["lr"] > records[-1]["lr"] >= 2e-4            # cosine decay towards min_lr
    sample = [line for line in lines if line.startswith("--- sample 1 ---")]
    assert len(sample) == 1 and len(sample[0].split("\n", 1)[1]) == 1 + 7
    assert load_checkpoint(str(tmp_path / "run")).meta["run"]["best_val"] == summary["best_val"]


def test_loss_png_written_when_matplotlib_is_importable(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    pretrain(tiny(tmp_path, "with", max_iters=4), log=quiet)
    with open(tmp_path / "with" / "loss.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib -> ImportError
    lines = []
    pretrain(tiny(tmp_path, "without", max_iters=4), log=lines.append)
    assert "no loss.png: matplotlib is not installed" in "\n".join(lines)       # said, not skipped silently
    assert os.path.exists(tmp_path / "without" / "metrics.jsonl")
    assert not os.path.exists(tmp_path / "without" / "loss.png")


def test_bpe_tokenizer_run_and_resume(tmp_path):
    pretrain(tiny(tmp_path, "a", tokenizer="bpe", vocab_size=270), log=quiet)
    pretrain(tiny(tmp_path, "b", tokenizer="bpe", vocab_size=270, max_iters=4, lr_decay_iters=12), log=quiet)
    pretrain(tiny(tmp_path, "b", tokenizer="bpe", vocab_size=270, resume=True), log=quiet)
    ck = load_checkpoint(str(tmp_path / "b"))
    assert ck.tokenizer.vocab_size == 270 and ck.model_state["transformer.wte.weight"].shape == (270, 16)
    assert_same_checkpoint(str(tmp_path / "a"), str(tmp_path / "b"))


# ----------------------------------------------------------------------------- SIGKILL

def test_sigkill_mid_training_then_resume_is_bit_exact(tmp_path):
    data = write_corpus(tmp_path / "data.txt")
    killed = str(tmp_path / "killed")
    flags = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
             "--warmup-iters", "2", "--lr-decay-iters", "40", "--eval-interval", "4", "--eval-iters", "2",
             "--samples", "0", "--device", "cpu", "--data", data]
    proc = start_until_checkpoint(flags + ["--max-iters", "1000000"], killed)
    try:
        time.sleep(0.05)                       # well into the steps after the first checkpoint
    finally:
        proc.kill()                            # SIGKILL
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -9               # killed mid-training, not finished
    end = load_checkpoint(killed).step + 6     # resume for 6 more steps (not a multiple of 4)
    done = subprocess.run(CLI + ["pretrain", "--out", killed, "--resume", "--max-iters", str(end), "--device", "cpu"],
                          env=CLI_ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stdout
    # the uninterrupted run to the same step, with the same flags, in this process
    pretrain(PretrainConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, warmup_iters=2,
                            lr_decay_iters=40, eval_interval=4, eval_iters=2, samples=0, device="cpu",
                            data=data, max_iters=end, out=str(tmp_path / "straight")), log=quiet)
    assert_same_checkpoint(killed, str(tmp_path / "straight"))
    assert losses(read_metrics(killed)) == losses(read_metrics(tmp_path / "straight"))
