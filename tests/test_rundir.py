"""Run directories: the exclusive lock (in process, across processes, released by SIGKILL), and the
paths a command refuses for --out (a file, a checkpoint inside a run, another command's run, an
unrelated folder), each before anything is written."""

import json
import os
import re
import subprocess
import time

import numpy as np
import pytest

from npformer import cli
from npformer.data import CharTokenizer
from npformer.training.checkpoint import save_checkpoint
from npformer.training.rundir import LOCK, MARKER, RunDir, RunDirError, command_of
from tests.test_pretrain import CLI, CLI_ENV, start_until_checkpoint, tree_digest, write_corpus


def fake_run(path, model="gpt", step=4, marker=True):
    """A run directory holding one checkpoint whose meta names `model` (no run.json when not marker)."""
    save_checkpoint(str(path), step, {"w": np.zeros(2, np.float32)}, {"m": np.zeros(2)}, CharTokenizer("ab"),
                    {"model": model})
    if marker:
        with open(os.path.join(path, MARKER), "w", encoding="utf-8") as f:
            json.dump({"format": "npformer-run", "command": {"gpt": "pretrain", "seq2seq": "seq2seq"}[model]}, f)
    return str(path)


def test_claim_marks_locks_and_refuses_a_second_claim(tmp_path):
    out = str(tmp_path / "run")
    with RunDir.claim(out, "pretrain") as run:
        assert run.created
        with open(os.path.join(out, MARKER), encoding="utf-8") as f:
            assert json.load(f) == {"format": "npformer-run", "command": "pretrain"}
        with open(os.path.join(out, LOCK), encoding="utf-8") as f:
            assert f.read().strip() == str(os.getpid())
        with pytest.raises(RunDirError, match=rf"^{out} is in use by process {os.getpid()};"):
            RunDir.claim(out, "pretrain", resume=True)
    with RunDir.claim(out, "pretrain", resume=True) as again:      # released by close
        assert not again.created
    assert command_of(out) == "pretrain"


def test_a_failed_run_that_wrote_nothing_leaves_no_directory(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ZeroDivisionError):
        with RunDir.claim(str(out), "seq2seq"):
            1 / 0
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(RunDirError, match="holds no npformer run and is not empty"):
        RunDir.claim(str(out), "seq2seq")
    assert sorted(os.listdir(out)) == ["keep.txt"]


def test_refused_paths_name_what_they_are_and_what_to_pass(tmp_path):
    run = fake_run(tmp_path / "run")
    file = tmp_path / "file.txt"
    file.write_text("hello")
    other = fake_run(tmp_path / "other", model="seq2seq")
    legacy = fake_run(tmp_path / "legacy", marker=False)            # a run from before run.json
    before = tree_digest(tmp_path)
    cases = [
        (str(file), "pretrain", True, f"{file} is a file, not a run directory"),
        (os.path.join(run, "ckpt-000004"), "pretrain", True,
         f"is a checkpoint directory inside the run {os.path.relpath(run)}, not a run directory; "
         f"pass --out {os.path.relpath(run)}"),
        (other, "pretrain", True, "is a run directory of `npformer seq2seq`, not of `npformer pretrain`"),
        (legacy, "seq2seq", False, "is a run directory of `npformer pretrain`, not of `npformer seq2seq`"),
        (run, "pretrain", False, "already holds a checkpoint; pass --resume to continue it"),
        (other, "seq2seq", False, "already holds a checkpoint; pass --resume to continue it or choose another"),
        (os.path.join(run, "ckpt-000020"), "pretrain", False, "is a checkpoint directory inside the run"),
        (os.path.join(run, "sub", "deeper"), "pretrain", False,
         f"is inside the run directory {os.path.relpath(run)}, whose checkpoints it would mix with"),
    ]
    for path, command, resume, message in cases:
        with pytest.raises(RunDirError, match=re.escape(message)):
            RunDir.claim(path, command, resume=resume)
    assert tree_digest(tmp_path) == before                          # nothing written, not even a lock
    assert command_of(legacy) == "pretrain"


def test_out_that_cannot_be_created_is_one_line_without_errno(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    data = write_corpus(tmp_path / "data.txt")
    rc = cli.main(["pretrain", "--data", data, "--out", str(blocker / "run"), "--max-iters", "2",
                   "--n-layer", "1", "--n-embd", "8", "--n-head", "2", "--block-size", "8", "--samples", "0"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "Errno" not in err
    assert f"--out {blocker / 'run'} cannot be written: a part of the path is a file" in err


def test_concurrent_runs_one_refused_at_once_and_no_stale_lock_after_sigkill(tmp_path):
    """A second pretrain into a directory a live run holds exits 2 at once naming the holder;
    after the holder is SIGKILLed the kernel has dropped its lock and --resume goes on."""
    data = write_corpus(tmp_path / "data.txt")
    out = str(tmp_path / "run")
    flags = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
             "--eval-interval", "4", "--eval-iters", "2", "--samples", "0", "--device", "cpu", "--data", data,
             "--workers", "2", "--lr-decay-iters", "1000000"]
    env, cmd = CLI_ENV, CLI + ["pretrain"]
    first = start_until_checkpoint(flags + ["--max-iters", "1000000"], out)
    try:
        for extra in ([], ["--resume"]):
            t0 = time.monotonic()
            second = subprocess.run(cmd + flags + ["--max-iters", "8", "--out", out] + extra, env=env,
                                    capture_output=True, text=True, timeout=60)
            assert second.returncode == 2, second.stderr
            assert f"{out} is in use by process {first.pid}" in second.stderr
            assert time.monotonic() - t0 < 30
    finally:
        first.kill()
        first.wait(timeout=30)
        first.stderr.close()
    step = json.load(open(os.path.join(out, "latest.json")))["checkpoint"]
    done = subprocess.run(cmd + ["--out", out, "--resume", "--max-iters", str(int(step[5:]) + 2)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stdout


def test_resume_into_a_run_in_use_is_refused_before_its_checkpoint_is_read(tmp_path, monkeypatch, capsys):
    run = fake_run(tmp_path / "run")
    read = []
    monkeypatch.setattr(cli, "_saved_settings", lambda *a: read.append(a) or {})
    with RunDir.claim(run, "pretrain", resume=True):
        assert cli.main(["pretrain", "--out", run, "--resume"]) == 2
    assert f"{run} is in use by process {os.getpid()}" in capsys.readouterr().err and not read
