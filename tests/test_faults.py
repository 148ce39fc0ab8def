"""Pretraining when things go wrong: SIGINT/SIGTERM save and resume bit-exactly, a second signal
during the save leaves an intact checkpoint, a damaged newest checkpoint falls back to the
previous one, changed data is refused, memory is checked before the first step, evaluation runs
in pieces, MemoryError is one line, and short runs get defaults that fit them."""

import dataclasses
import os
import signal
import subprocess
import time
from types import SimpleNamespace

import numpy as np
import pytest

from npformer import cli
from npformer.training import checkpoint as checkpoint_module
from npformer.training import pretrain as pretrain_module
from npformer.training.checkpoint import CheckpointError, load_checkpoint
from npformer.training.objectives import CausalLM
from npformer.training.pretrain import PretrainConfig, pretrain
from npformer.training.stopping import Interrupted, StopNow
from tests.helpers import signal_at_steps
from tests.test_pretrain import CLI, CLI_ENV, assert_same_checkpoint, losses, quiet, read_metrics, tiny, write_corpus


def errors(stderr: str) -> list:
    """The CLI's error lines (stderr also carries the progress bar)."""
    return [line for line in stderr.splitlines() if line.startswith("npformer: error")]


# ----------------------------------------------------------------------------- Ctrl-C / SIGTERM

@pytest.mark.parametrize("dropout,workers,k", [(0.0, 1, 5), (0.2, 1, 7), (0.2, 2, 3), (0.0, 3, 10)])
def test_sigint_saves_the_step_and_resume_equals_uninterrupted(tmp_path, monkeypatch, dropout, workers, k):
    before = signal.getsignal(signal.SIGINT)          # pytest's own, or a test runner worker's
    straight = pretrain(tiny(tmp_path, "a", dropout=dropout, workers=workers), log=quiet)
    signal_at_steps(monkeypatch, {k})
    with pytest.raises(Interrupted) as info:
        pretrain(tiny(tmp_path, "b", dropout=dropout, workers=workers), log=quiet)
    assert (info.value.step, info.value.exit_code) == (k, 130)
    assert str(info.value) == f"saved step {k} to {tmp_path / 'b'}; continue with --resume"
    assert load_checkpoint(str(tmp_path / "b")).step == k
    monkeypatch.undo()
    resumed = pretrain(tiny(tmp_path, "b", dropout=dropout, workers=workers, resume=True), log=quiet)
    assert_same_checkpoint(str(tmp_path / "a"), str(tmp_path / "b"))
    assert resumed["val_loss"] == straight["val_loss"] and resumed["best_val"] == straight["best_val"]
    assert losses(read_metrics(tmp_path / "a")) == losses(read_metrics(tmp_path / "b"))
    assert signal.getsignal(signal.SIGINT) is before                            # handlers restored


def test_sigterm_on_an_evaluation_step_saves_once_and_exits_143(tmp_path, monkeypatch):
    signal_at_steps(monkeypatch, {4}, signal.SIGTERM)                # step 4 evaluates and checkpoints anyway
    saves = []
    save = pretrain_module.save_checkpoint
    monkeypatch.setattr(pretrain_module, "save_checkpoint", lambda *a, **kw: saves.append(a[1]) or save(*a, **kw))
    with pytest.raises(Interrupted) as info:
        pretrain(tiny(tmp_path), log=quiet)
    assert info.value.exit_code == 143 and saves == [4]


def test_second_sigint_during_the_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    signal_at_steps(monkeypatch, {6})                                 # step 4 was checkpointed; 6 is not
    write = checkpoint_module._write_file

    def interrupted_write(path, fn):
        write(path, fn)
        if "optimizer" in path and "ckpt-000006" in path:       # half of ckpt-000006 is on disk
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(checkpoint_module, "_write_file", interrupted_write)
    with pytest.raises(StopNow):
        pretrain(tiny(tmp_path), log=quiet)
    out = str(tmp_path / "run")
    assert load_checkpoint(out).step == 4                        # verified: intact
    assert sorted(d for d in os.listdir(out) if "ckpt" in d) == ["ckpt-000004"]      # no half-written one


def test_cli_sigint_and_sigterm_to_the_process_group_exit_codes_and_message(tmp_path):
    """As a terminal's Ctrl-C (or `kill -TERM -PGID`) does, the signal goes to the whole process
    group, forked workers included: only the parent acts on it, once."""
    data = write_corpus(tmp_path / "data.txt")
    for signum, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        out = str(tmp_path / f"run{signum}")
        proc = subprocess.Popen(CLI + ["pretrain", "--data", data, "--out", out, "--n-layer", "1", "--n-head", "2",
                                       "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
                                       "--max-iters", "1000000", "--eval-interval", "1000000", "--samples", "0",
                                       "--workers", "2"], env=CLI_ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            line = proc.stderr.readline()                       # the progress bar's first line: step 1 done
            while not line.startswith("["):
                assert proc.poll() is None and time.monotonic() < deadline, line
                line = proc.stderr.readline()
            os.killpg(proc.pid, signum)
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode == code, err
        assert err.count("finishing this step, then saving a checkpoint") == 1, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("npformer: saved step ") and last.endswith(f"to {out}; continue with --resume")
        step = int(last.split()[3])
        assert load_checkpoint(out).step == step >= 1


# ----------------------------------------------------------------------------- damaged checkpoints

def test_resume_falls_back_from_a_damaged_newest_checkpoint(tmp_path):
    pretrain(tiny(tmp_path, "a"), log=quiet)
    pretrain(tiny(tmp_path, "b", max_iters=8, lr_decay_iters=12), log=quiet)    # ckpt-000004, ckpt-000008
    newest = tmp_path / "b" / "ckpt-000008" / "model.npz"
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    newest.write_bytes(bytes(raw))
    lines = []
    pretrain(tiny(tmp_path, "b", resume=True), log=lines.append)
    text = "\n".join(lines)
    assert "ckpt-000008/model.npz is corrupt" in text and "damaged-ckpt-000008" in text
    assert f"continuing from the newest intact checkpoint, {tmp_path / 'b' / 'ckpt-000004'} (step 4)" in text
    assert (tmp_path / "b" / "damaged-ckpt-000008" / "model.npz").exists()      # kept for inspection
    assert_same_checkpoint(str(tmp_path / "a"), str(tmp_path / "b"))


def test_generate_on_a_damaged_checkpoint_names_the_intact_one(tmp_path, capsys):
    pretrain(tiny(tmp_path, max_iters=8), log=quiet)
    os.remove(tmp_path / "run" / "ckpt-000008" / "tokenizer.json")
    assert cli.main(["generate", "--ckpt", str(tmp_path / "run"), "--max-new-tokens", "3"]) == 2
    err = capsys.readouterr().err
    assert len(errors(err)) == 1
    assert f"the newest intact checkpoint is {tmp_path / 'run' / 'ckpt-000004'}" in err


def test_keep_sets_how_many_checkpoints_stay(tmp_path):
    for keep, left in ((1, ["ckpt-000012"]), (0, ["ckpt-000004", "ckpt-000008", "ckpt-000012"])):
        pretrain(tiny(tmp_path, f"k{keep}", keep=keep), log=quiet)
        assert sorted(d for d in os.listdir(tmp_path / f"k{keep}") if d.startswith("ckpt-")) == left


# ----------------------------------------------------------------------------- changed data

def test_resume_on_changed_data_is_refused_unless_allowed(tmp_path):
    pretrain(tiny(tmp_path, max_iters=4, lr_decay_iters=12), log=quiet)
    data = tmp_path / "data.txt"
    data.write_text(data.read_text().replace("cat", "dog", 1))   # same size, other contents
    before = load_checkpoint(str(tmp_path / "run")).meta["data_fingerprint"]
    with pytest.raises(CheckpointError, match=r"the training data changed: the checkpoint was made on .*data\.txt "
                                              r"\(1,\d{3} bytes, SHA-256 [0-9a-f]{16}\.\.\.\) and .*data\.txt is "
                                              r"1,\d{3} bytes, SHA-256 [0-9a-f]{16}\.\.\.; .*--allow-data-change"):
        pretrain(tiny(tmp_path, resume=True), log=quiet)
    lines = []
    pretrain(tiny(tmp_path, resume=True, allow_data_change=True), log=lines.append)
    assert any("the training data changed" in line for line in lines)
    after = load_checkpoint(str(tmp_path / "run")).meta["data_fingerprint"]
    assert after["bytes"] == before["bytes"] and after["sha256"] != before["sha256"]


# ----------------------------------------------------------------------------- memory

def test_memory_is_checked_before_the_first_step(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NPFORMER_MEMORY_AVAILABLE", "1M")
    data = write_corpus(tmp_path / "data.txt")
    out = tmp_path / "run"
    rc = cli.main(["pretrain", "--data", data, "--out", str(out), "--n-layer", "1", "--n-head", "2",
                   "--n-embd", "16", "--block-size", "64", "--samples", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "1.0 MiB is available (NPFORMER_MEMORY_AVAILABLE)" in err
    assert "--batch-size (16 now" in err and "--block-size (64 now" in err and "--shards" in err
    assert not out.exists()                                    # refused before anything was written


def test_a_huge_block_size_is_refused_at_once(tmp_path, capsys):
    t0 = time.perf_counter()
    rc = cli.main(["pretrain", "--block-size", "100000", "--out", str(tmp_path / "run")])
    assert rc == 2 and "--block-size (100000 now, " in capsys.readouterr().err
    assert time.perf_counter() - t0 < 20                       # no corpus window scan, no model built
    assert not (tmp_path / "run").exists()


def test_evaluation_runs_in_pieces_of_a_shard_and_agrees_with_the_whole_batch(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, batch_size=6, shards=3, workers=1).checked()
    model_rows = []
    import npformer.models.gpt as gpt_module
    forward = gpt_module.GPT.forward

    def recording(self, idx, targets=None, **kw):
        model_rows.append(idx.shape[0])
        return forward(self, idx, targets, **kw)
    model = gpt_module.GPT(gpt_module.GPTConfig(vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=16),
                           generator=np.random.default_rng(0), dtype=np.float64)
    ids = np.random.default_rng(0).integers(0, 20, 500)

    def evaluate(cfg):
        objective = CausalLM(dataclasses.replace(cfg, block_size=16), SimpleNamespace(vocab_size=20))
        objective.model = objective.saved = model               # float64, so that 1e-12 can hold
        return objective.evaluate(ids, seed=3)["loss"]
    whole = evaluate(dataclasses.replace(cfg, shards=1))
    monkeypatch.setattr(gpt_module.GPT, "forward", recording)
    pieces = evaluate(cfg)
    assert model_rows == [2, 2, 2] * cfg.eval_iters
    assert pieces == pytest.approx(whole, rel=1e-12)


def test_memory_error_in_the_loop_is_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    data = write_corpus(tmp_path / "data.txt")
    calls = {"n": 0}
    step = pretrain_module.parallel.forward_backward

    def failing(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 6:
            raise MemoryError()
        return step(*a, **kw)
    monkeypatch.setattr(pretrain_module.parallel, "forward_backward", failing)
    out = str(tmp_path / "run")
    rc = cli.main(["pretrain", "--data", data, "--out", out, "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
                   "--block-size", "16", "--batch-size", "4", "--eval-interval", "4", "--max-iters", "12",
                   "--samples", "0", "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and len(errors(err)) == 1
    assert f"out of memory in the training step of step 6; the last checkpoint (step 4) in {out} is intact" in err
    assert load_checkpoint(out).step == 4


# ----------------------------------------------------------------------------- defaults and flags

def test_resume_through_the_api_keeps_the_schedule_of_the_checkpoint(tmp_path):
    """warmup_iters=None and lr_decay_iters=None on resume mean the checkpoint's, not defaults
    derived from the new max_iters."""
    pretrain(tiny(tmp_path, max_iters=20, warmup_iters=None, eval_interval=10), log=quiet)
    assert load_checkpoint(str(tmp_path / "run")).meta["pretrain_config"]["warmup_iters"] == 2
    pretrain(tiny(tmp_path, max_iters=24, warmup_iters=None, eval_interval=10, resume=True), log=quiet)
    saved = load_checkpoint(str(tmp_path / "run")).meta["pretrain_config"]
    assert (saved["warmup_iters"], saved["lr_decay_iters"]) == (2, 20)


def test_resume_from_another_directory_with_a_relative_data_path(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    write_corpus(tmp_path / "work" / "data.txt")
    monkeypatch.chdir(tmp_path / "work")
    assert cli.main(["pretrain", "--data", "data.txt", "--out", "run", "--n-layer", "1", "--n-head", "2",
                     "--n-embd", "16", "--block-size", "16", "--batch-size", "4", "--max-iters", "4",
                     "--lr-decay-iters", "8", "--samples", "0"]) == 0
    monkeypatch.chdir(tmp_path)
    assert cli.main(["pretrain", "--out", "work/run", "--resume", "--max-iters", "6"]) == 0
    assert load_checkpoint(str(tmp_path / "work" / "run")).step == 6


def test_short_runs_get_a_schedule_that_fits(tmp_path):
    cfg = PretrainConfig(max_iters=30).checked()
    assert (cfg.warmup_iters, cfg.lr_decay_iters) == (3, 30)
    assert PretrainConfig(max_iters=5000).checked().warmup_iters == 100
    assert PretrainConfig(max_iters=1).checked().warmup_iters == 0
    with pytest.raises(ValueError, match=r"--max-iters \(30\) must exceed --warmup-iters \(50\)$"):
        PretrainConfig(max_iters=30, warmup_iters=50).checked()
    with pytest.raises(ValueError, match=r"--lr-decay-iters \(20\) must exceed the default --warmup-iters, "
                                         r"min\(100, --max-iters // 10\) \(50\)"):
        PretrainConfig(max_iters=500, lr_decay_iters=20).checked()


@pytest.mark.parametrize("flags,message", [(["--seed", "-1"], "--seed must be an integer >= 0; got -1"),
                                           (["--keep", "-1"], "--keep must be >= 0 (0 keeps all); got -1")])
def test_bad_run_flags_name_the_flag(tmp_path, capsys, flags, message):
    assert cli.main(["pretrain", "--out", str(tmp_path / "run"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_pretrain_help_shows_the_new_flags_and_no_none_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--keep KEEP" in text and "(default: 2)" in text and "--allow-data-change" in text
    assert "min(100, --max-iters // 10)" in text and "(default: None)" not in text


def test_training_runs_leave_the_global_generator_alone(tmp_path):
    """Each entry point draws dropout from its own seeded generator, scoped to its loop: the
    process's global generator (what `npformer.manual_seed` sets) is the same object, in the same
    state, afterwards."""
    import npformer as nf
    from npformer import random
    from npformer.training.seq2seq import Seq2SeqTrainConfig, train
    nf.manual_seed(7)
    before = random.default_generator("cpu")
    state = before.bit_generator.state
    pretrain(tiny(tmp_path, "p", dropout=0.2, max_iters=3), log=quiet)
    train(Seq2SeqTrainConfig(task="copy", d_model=16, nhead=2, num_layers=1, dim_feedforward=32, batch_size=4,
                             max_iters=2, n_test=4, out=str(tmp_path / "s"), device="cpu"), log=quiet)
    assert random.default_generator("cpu") is before and before.bit_generator.state == state
