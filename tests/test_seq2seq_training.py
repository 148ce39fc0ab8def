"""Seq2seq training (npformer.training.seq2seq) and the ``seq2seq`` / ``translate`` commands: the
loss falls, checkpoints round-trip (weights, optimizer, config, tokenizer), runs are reproducible,
the metrics, attention maps, and one-line errors that leave every file as it was."""

import dataclasses
import hashlib
import os
import shutil

import numpy as np
import pytest

from npformer.cli import main
from npformer.data.tasks import BOS, EOS, PAD, TaskTokenizer, get_task, make_batch
from npformer.models import Seq2SeqTransformer
from npformer.models.decoding import beam_search
from npformer.training.checkpoint import load_checkpoint
from npformer.training.attention_maps import KINDS, attention_weights
from npformer.training.seq2seq import (Seq2SeqTrainConfig, evaluate, load_seq2seq, loss_fn, match_counts, model_config,
                                       train, translate)

from tests.helpers import signal_at_steps

TINY = dict(d_model=16, nhead=2, num_layers=1, dim_feedforward=32, dropout=0.0, batch_size=16, max_iters=40,
            warmup=10, lr_factor=0.2, n_test=40, device="cpu")
TINY_FLAGS = ["--d-model", "16", "--nhead", "2", "--num-layers", "1", "--dim-feedforward", "32", "--dropout", "0",
              "--batch-size", "16", "--max-iters", "40", "--warmup", "10", "--lr-factor", "0.2", "--n-test", "40",
              "--device", "cpu"]



@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(config, summary) of one finished 40-step copy run, made once; tests work on copies of it."""
    cfg = Seq2SeqTrainConfig(task="copy", out=str(tmp_path_factory.mktemp("s2s") / "run"), **TINY)
    return cfg, train(cfg, log=lambda *a: None)


@pytest.fixture
def run_copy(run, tmp_path):
    shutil.copytree(run[0].out, tmp_path / "run")
    return str(tmp_path / "run")


def tree_digest(path):
    """{relative path: SHA-256} of every file under path."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def fixed_batch_loss(model, task, tok, cfg):
    model.eval()
    src, tgt_in, tgt_out = make_batch(tok, task.test_set(64, seed=99))
    return loss_fn(model, src, tgt_in, tgt_out, cfg.label_smoothing).item()


# ----------------------------------------------------------------------------- training

def test_training_lowers_the_loss_and_the_checkpoint_round_trips(run):
    cfg, summary = run
    full = cfg.checked()
    task, tok = get_task("copy"), TaskTokenizer.for_task(get_task("copy"))
    untrained = Seq2SeqTransformer(model_config(full, task), generator=np.random.default_rng(cfg.seed))
    model, loaded_tok, meta = load_seq2seq(cfg.out)
    before, after = fixed_batch_loss(untrained, task, tok, cfg), fixed_batch_loss(model, task, tok, cfg)
    assert after < before - 0.25, (before, after)
    assert loaded_tok == tok and not model.training
    # the reloaded model reproduces the figures measured during the run
    assert evaluate(model, tok, task.test_set(cfg.n_test, seed=cfg.seed + 3)) == summary["greedy"]
    assert summary["steps"] == summary["step"] == 40 and summary["train_seconds"] > 0
    ckpt = load_checkpoint(cfg.out)
    assert ckpt.step == 40 and meta["train_config"] == dataclasses.asdict(full) and meta["task"] == "copy"
    assert meta["results"]["greedy"] == summary["greedy"] and meta["max_src_len"] == 10
    opt = ckpt.optimizer_state                                      # the paper's Adam, with its moments
    assert opt["group.0.betas"].tolist() == [0.9, 0.98] and float(opt["group.0.eps"]) == 1e-9
    assert int(opt["scalar.0.0.step"]) == 40 and "state.0.0.exp_avg_sq" in opt


def test_runs_are_reproducible_and_checkpoint_every_eval_interval(run, tmp_path):
    cfg = Seq2SeqTrainConfig(task="copy", out=str(tmp_path / "again"), eval_interval=20, **TINY)
    summary = train(cfg, log=lambda *a: None)
    assert summary["greedy"] == run[1]["greedy"] and summary["loss"] == run[1]["loss"]
    a, b = load_checkpoint(cfg.out).model_state, load_checkpoint(run[0].out).model_state
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert sorted(d for d in os.listdir(cfg.out) if d.startswith("ckpt-")) == ["ckpt-000020", "ckpt-000040"]


def test_match_counts():
    tgt_out = np.array([[5, 6, EOS, PAD], [7, EOS, PAD, PAD]])
    pred = np.array([[5, 6, EOS], [7, 7, EOS]])                     # row 0 exact; row 1 misses EOS
    assert match_counts(pred, tgt_out) == (1, 4, 5)
    assert match_counts(np.array([[5], [7]]), tgt_out) == (0, 2, 5)  # short predictions are padded
    assert match_counts(np.array([[5, 6, EOS, 9, 9], [7, EOS, 0, 0, 0]]), tgt_out) == (2, 5, 5)


def test_config_errors_name_the_flag():
    for kw, match in [(dict(task="sort"), "unknown task 'sort'"), (dict(d_model=10, nhead=4), "--d-model"),
                      (dict(max_iters=0), "--max-iters"), (dict(label_smoothing=1.0), "--label-smoothing"),
                      (dict(beam_size=0), "--beam-size"), (dict(lr_factor=-1.0), "--lr-factor"),
                      (dict(length_penalty=float("nan")), "--length-penalty must be a finite number"),
                      (dict(seed=-1), "--seed must be an integer >= 0; got -1"),
                      (dict(dropout=1.0), r"--dropout must be in \[0, 1\); got 1.0"),
                      (dict(dropout=True), r"--dropout must be in \[0, 1\); got True")]:
        with pytest.raises(ValueError, match=match):
            Seq2SeqTrainConfig(**kw).checked()
    assert Seq2SeqTrainConfig(task="numbers").checked().out == "out-seq2seq-numbers"


def test_attention_weights_are_the_models_and_leave_it_unchanged(run):
    model, tok, _ = load_seq2seq(run[0].out)
    src, tgt_in, _ = make_batch(tok, [("abcdefg", "abcdefg")])
    plain = model(src, tgt_in).data
    w = attention_weights(model, src, tgt_in)
    np.testing.assert_array_equal(model(src, tgt_in).data, plain)
    assert all("forward" not in vars(layer.self_attn) for layer in model.transformer.encoder.layers)
    assert [len(w[k]) for k in KINDS] == [1, 1, 1]
    enc, dec, cross = (w[k][0] for k in KINDS)
    assert enc.shape == (2, 7, 7) and dec.shape == (2, 8, 8) and cross.shape == (2, 8, 7)
    for a in (enc, dec, cross):
        np.testing.assert_allclose(a.sum(axis=-1), 1.0, rtol=1e-5)
    assert np.abs(np.triu(dec, k=1)).max() == 0.0                      # causal: no peeking ahead


def test_attention_maps_flag_writes_pngs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "maps"
    flags = [f if f != "40" else "5" for f in TINY_FLAGS]
    assert main(["seq2seq", "--task", "dates", *flags, "--attention-maps", "--out", str(out)]) == 0
    pngs = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    assert pngs == sorted(KINDS.values())
    for f in pngs:
        with open(out / f, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n" and 1000 < os.path.getsize(out / f) < 150_000


# ----------------------------------------------------------------------------- the commands

def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, match):
    assert rc == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("npformer: error: "), err
    assert match in lines[0], lines[0]


def test_seq2seq_command_trains_and_translate_decodes(tmp_path, capsys):
    out = tmp_path / "run"
    rc, stdout, err = cli(capsys, "seq2seq", "--task", "reverse", *TINY_FLAGS, "--beam-size", "2", "--out", out)
    assert rc == 0 and "done: 40 steps" in stdout and "beam exact match" in err
    model, tok, meta = load_seq2seq(str(out))
    assert meta["results"]["beam"]["beam_size"] == 2 and 0 <= meta["results"]["beam"]["exact_match"] <= 1
    for beam in (1, 3):
        rc, stdout, _ = cli(capsys, "translate", "--ckpt", out, "--beam-size", beam, "hgfe")
        assert rc == 0
        src = tok.encode("hgfe")[None]
        want = model.greedy_decode(src, BOS, 11, eos_id=EOS) if beam == 1 else \
            beam_search(model, src, BOS, EOS, beam_size=beam, max_new_tokens=11)[0]
        assert stdout == tok.decode(want[0, 1:]) + "\n" == translate(model, tok, meta, "hgfe", beam) + "\n"
        assert set(stdout.strip()) <= set(tok.tgt.chars)


def test_seq2seq_command_errors_are_one_line_and_touch_nothing(run_copy, tmp_path, capsys):
    rc, _, err = cli(capsys, "seq2seq", "--task", "sort", "--out", tmp_path / "new")
    assert_one_line_error(rc, err, "unknown task 'sort'; choose one of copy, reverse, numbers, dates")
    assert not (tmp_path / "new").exists()
    before = tree_digest(run_copy)
    rc, _, err = cli(capsys, "seq2seq", *TINY_FLAGS, "--out", run_copy)
    assert_one_line_error(rc, err, "already holds a checkpoint")
    assert tree_digest(run_copy) == before


def test_translate_errors_are_one_line_and_touch_nothing(run_copy, tmp_path, capsys):
    before = tree_digest(run_copy)
    for text, match in [("abcdefghijk", "the input has 11 characters; this copy model takes at most 10"),
                        ("abz1", "the input has 2 character(s) outside the vocabulary 'abcdefghij': '1', 'z'"),
                        ("", "the input text is empty")]:
        rc, _, err = cli(capsys, "translate", "--ckpt", run_copy, text)
        assert_one_line_error(rc, err, match)
    rc, _, err = cli(capsys, "translate", "--ckpt", run_copy, "--beam-size", "0", "abc")
    assert_one_line_error(rc, err, "--beam-size must be >= 1")
    rc, _, err = cli(capsys, "translate", "--ckpt", tmp_path / "missing", "abc")
    assert_one_line_error(rc, err, "checkpoint not found")
    assert tree_digest(run_copy) == before
    model_file = os.path.join(run_copy, "ckpt-000040", "model.npz")
    with open(model_file, "r+b") as f:                               # corrupt one byte of the weights
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    rc, _, err = cli(capsys, "translate", "--ckpt", run_copy, "abc")
    assert_one_line_error(rc, err, "is corrupt or truncated (checksum mismatch)")


# ----------------------------------------------------------------------------- Ctrl-C and --resume

def test_sigint_saves_and_resume_equals_the_uninterrupted_run(run, tmp_path, monkeypatch):
    """With dropout (its generator's state is in the checkpoint) and batches drawn from a seeded
    generator, a run stopped by SIGINT at step 13 and resumed ends bit for bit where the straight one does."""
    from npformer.training.stopping import Interrupted
    kw = {**TINY, "dropout": 0.1, "eval_interval": 20}
    straight = train(Seq2SeqTrainConfig(task="copy", out=str(tmp_path / "a"), **kw), log=lambda *a: None)
    signal_at_steps(monkeypatch, {13})
    with pytest.raises(Interrupted, match=f"saved step 13 to {tmp_path / 'b'}; continue with --resume"):
        train(Seq2SeqTrainConfig(task="copy", out=str(tmp_path / "b"), **kw), log=lambda *a: None)
    monkeypatch.undo()
    lines = []
    resumed = train(Seq2SeqTrainConfig(task="copy", out=str(tmp_path / "b"), resume=True, **kw), log=lines.append)
    assert any(f"resuming from {tmp_path / 'b' / 'ckpt-000013'} at step 13" in line for line in lines)
    a, b = load_checkpoint(str(tmp_path / "a")), load_checkpoint(str(tmp_path / "b"))
    assert a.step == b.step == 40 and a.meta["run"]["batch_rng"] == b.meta["run"]["batch_rng"]
    for k in a.model_state:
        np.testing.assert_array_equal(a.model_state[k], b.model_state[k], err_msg=k)
    assert resumed["greedy"] == straight["greedy"] and resumed["loss"] == straight["loss"]


def test_cli_resume_takes_the_stored_settings(run_copy, capsys):
    """--resume with only --out and a longer --max-iters: the model flags come from the checkpoint."""
    rc, stdout, err = cli(capsys, "seq2seq", "--out", run_copy, "--resume", "--max-iters", "44")
    assert rc == 0, err
    assert f"resuming from {os.path.join(run_copy, 'ckpt-000040')} at step 40" in stdout
    assert load_checkpoint(run_copy).step == 44
    assert load_checkpoint(run_copy).meta["train_config"]["d_model"] == 16
    rc, _, err = cli(capsys, "seq2seq", "--out", run_copy, "--resume", "--d-model", "32", "--max-iters", "48")
    assert_one_line_error(rc, err, "d_model (checkpoint 16, now 32)")
