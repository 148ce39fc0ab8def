"""Fine-tuning: a tiny pretrain -> finetune run end to end, the checkpoint round trip, the frozen
backbone of a linear probe, the from-scratch baseline, and one-line errors that lose no file."""

import os
import shutil

import numpy as np
import pytest

from npformer.cli import main
from npformer.data import ToyLanguage
from npformer.data.sentiment import sentiment_splits
from npformer.training.checkpoint import CheckpointError, load_checkpoint
from npformer.training.finetune import (FinetuneConfig, accuracy, encode_split, finetune, load_classifier,
                                        make_batch)
from npformer.training.loading import load_gpt
from npformer.training.pretrain import PretrainConfig, pretrain
from tests.helpers import DEVICE, host, signal_at_steps
from tests.test_pretrain import tree_digest, write_corpus

TINY_MODEL = dict(n_layer=1, n_head=2, n_embd=16, block_size=64, batch_size=4, max_iters=4, warmup_iters=1,
                  eval_interval=4, eval_iters=1, samples=0, device=DEVICE)


def quiet(*args):
    pass


def tiny_pretrain(root, name, data_text, **kw):
    data = os.path.join(root, f"{name}.txt")
    with open(data, "w", encoding="utf-8") as f:
        f.write(data_text)
    out = os.path.join(root, name)
    pretrain(PretrainConfig(**{**TINY_MODEL, "data": data, "out": out, **kw}), log=quiet)
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny model pretrained for 4 steps on toy-language text (every character of the task)."""
    root = tmp_path_factory.mktemp("finetune")
    tiny_pretrain(str(root), "pre", ToyLanguage(seed=0).generate(20_000, seed=1))
    return root


def run(root, out, **kw):
    cfg = FinetuneConfig(**{**dict(ckpt=str(root / "pre"), max_iters=3, batch_size=8, lr=3e-3, device=DEVICE,
                                   out=str(root / out)), **kw})
    return finetune(cfg, log=quiet)


@pytest.fixture(scope="module")
def full(root):
    return run(root, "full")



def test_full_finetuning_end_to_end_and_round_trip(root, full):
    assert full["init"] == "pretrained" and full["steps"] == 3 and full["n_test"] == 1000
    assert 0.0 <= full["test_accuracy"] <= 1.0 and np.isfinite(full["train_loss"])
    ckpt = load_checkpoint(str(root / "full"))
    assert ckpt.meta["model"] == "sequence_classifier" and ckpt.meta["task"] == "sentiment"
    assert ckpt.meta["metrics"]["test_accuracy"] == full["test_accuracy"]
    model, tok, meta = load_classifier(str(root / "full"), device=DEVICE)
    for k, v in model.state_dict().items():                       # weights round-trip bit for bit
        np.testing.assert_array_equal(host(v), ckpt.model_state[k])
    texts, labels = sentiment_splits()["test"]
    ids, lengths = encode_split(tok, texts, model.backbone.config.block_size, "test")
    assert accuracy(model, ids, lengths, labels, DEVICE) == full["test_accuracy"]   # the stored figure
    pre = load_checkpoint(str(root / "pre")).model_state
    moved = [k for k in pre if not np.array_equal(pre[k], ckpt.model_state["backbone." + k])]
    assert moved                                                   # full fine-tuning changed the backbone
    with pytest.raises(CheckpointError, match="not a sequence_classifier"):
        load_classifier(str(root / "pre"))


def test_linear_probe_keeps_the_backbone(root, full):
    probe = run(root, "probe", freeze=True)
    pre = load_checkpoint(str(root / "pre")).model_state
    state = load_checkpoint(str(root / "probe")).model_state
    for k in pre:
        np.testing.assert_array_equal(state["backbone." + k], pre[k], err_msg=k)
    assert probe["trainable"] == 16 * 2 + 2                        # the head only
    full_state = load_checkpoint(str(root / "full")).model_state
    # the same seed gives the same initial head; the probe trained it
    assert not np.array_equal(state["head.weight"], full_state["head.weight"])


def test_from_scratch_same_architecture_other_weights(root, full):
    scratch = run(root, "scratch", from_scratch=True)
    assert scratch["init"] == "scratch"
    a, b = load_checkpoint(str(root / "scratch")), load_checkpoint(str(root / "full"))
    assert a.meta["model_config"] == b.meta["model_config"]
    assert {k: v.shape for k, v in a.model_state.items()} == {k: v.shape for k, v in b.model_state.items()}
    assert not np.allclose(a.model_state["backbone.transformer.wte.weight"],
                           b.model_state["backbone.transformer.wte.weight"], atol=1e-2)


def test_seeded_runs_repeat_exactly(root, full):
    again = run(root, "again")
    assert again["test_accuracy"] == full["test_accuracy"] and again["train_loss"] == full["train_loss"]
    a, b = load_checkpoint(str(root / "again")).model_state, load_checkpoint(str(root / "full")).model_state
    if DEVICE == "cpu":
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_right_padding_does_not_change_predictions(root):
    model, tok = load_gpt(str(root / "pre"), device=DEVICE)
    from npformer.models.classifier import SequenceClassifier
    clf = SequenceClassifier(model, 2, generator=np.random.default_rng(0))
    texts, labels = sentiment_splits()["val"]
    ids, lengths = encode_split(tok, texts[:40], 64, "val")
    idx, pad = make_batch(ids, lengths, np.arange(40), DEVICE)
    assert np.array_equal(host(pad).sum(1), lengths.max() - lengths)
    batched = host(clf(idx, pad_mask=pad)[0])
    single = np.concatenate([host(clf(make_batch(ids, lengths, np.array([i]), DEVICE)[0])[0]) for i in range(40)])
    np.testing.assert_allclose(batched, single, rtol=1e-4, atol=1e-5)


def test_cli_prints_test_accuracy(root, capsys):
    rc = main(["finetune", "--ckpt", str(root / "pre"), "--task", "sentiment", "--freeze", "--max-iters", "2",
               "--batch-size", "4", "--device", DEVICE, "--out", str(root / "cli")])
    out = capsys.readouterr().out
    assert rc == 0 and out.splitlines()[-1].startswith("test accuracy: ")
    assert float(out.splitlines()[-1].split()[2]) == load_checkpoint(str(root / "cli")).meta["metrics"]["test_accuracy"]


# ----------------------------------------------------------------------------- bad input

def assert_one_line_error(capsys, argv, match, root):
    before = tree_digest(str(root))
    rc = main(["finetune", *argv, "--max-iters", "2", "--device", DEVICE])
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("npformer: error: "), err
    assert match in lines[0], lines[0]
    assert tree_digest(str(root)) == before                       # nothing written, nothing lost


@pytest.mark.parametrize("flags, match", [
    (["--max-iters", "0"], "--max-iters must be a positive integer"),
    (["--batch-size", "-3"], "--batch-size must be a positive integer"),
    (["--lr", "0"], "--lr must be a positive number"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--seed", "-1"], "--seed must be an integer >= 0"),
])
def test_impossible_flags(root, capsys, flags, match):
    argv = ["--ckpt", str(root / "pre"), "--out", str(root / "never"), "--max-iters", "2", *flags]
    before = tree_digest(str(root))
    rc = main(["finetune", *argv, "--device", DEVICE])
    lines = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(lines) == 1 and match in lines[0], lines
    assert tree_digest(str(root)) == before and not (root / "never").exists()


def test_unknown_task_is_refused_by_the_parser(root, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "--ckpt", str(root / "pre"), "--task", "topic"])
    assert exc.value.code == 2 and "invalid choice: 'topic'" in capsys.readouterr().err


def test_missing_and_corrupt_and_wrong_kind_of_checkpoint(root, full, tmp_path, capsys):
    out = ["--out", str(tmp_path / "never")]
    assert_one_line_error(capsys, ["--ckpt", str(tmp_path / "nope"), *out], "checkpoint not found", tmp_path)
    assert_one_line_error(capsys, ["--ckpt", str(root / "full"), *out], "not a GPT", root)
    shutil.copytree(root / "pre", tmp_path / "bad")
    ckpt_dir = load_checkpoint(str(tmp_path / "bad")).path
    with open(os.path.join(ckpt_dir, "model.npz"), "r+b") as f:
        f.truncate(100)
    assert_one_line_error(capsys, ["--ckpt", str(tmp_path / "bad"), *out], "corrupt or truncated", tmp_path)
    assert not (tmp_path / "never").exists()


def test_out_holding_a_checkpoint_is_refused(root, full, capsys):
    for target, match in (("full", "already holds a checkpoint"),                  # another fine-tuning run
                          ("pre", "is a run directory of `npformer pretrain`")):     # the pretraining run
        assert_one_line_error(capsys, ["--ckpt", str(root / "pre"), "--out", str(root / target)], match, root)


def test_tokenizer_that_cannot_encode_the_task(tmp_path, capsys):
    """A model pretrained on text without capitals, 'k', 'p', ...: the error names the characters."""
    text = open(write_corpus(tmp_path / "words.txt"), encoding="utf-8").read()
    ckpt = tiny_pretrain(str(tmp_path), "narrow", text)
    capsys.readouterr()                                            # the pretraining progress bar
    assert_one_line_error(capsys, ["--ckpt", ckpt, "--out", str(tmp_path / "never")],
                          "cannot encode the task's text", tmp_path)
    main(["finetune", "--ckpt", ckpt, "--out", str(tmp_path / "never"), "--device", DEVICE])
    err = capsys.readouterr().err
    assert "'T'" in err and "'k'" in err and "'p'" in err and "not in the vocabulary" in err


def test_block_size_shorter_than_the_examples(tmp_path, capsys):
    ckpt = tiny_pretrain(str(tmp_path), "short", ToyLanguage(seed=0).generate(20_000, seed=1), block_size=16)
    capsys.readouterr()
    assert_one_line_error(capsys, ["--ckpt", ckpt, "--out", str(tmp_path / "never")],
                          "reads at most 16 tokens (block_size)", tmp_path)


def test_sigint_saves_and_resume_equals_the_uninterrupted_run(root, monkeypatch, capsys):
    """Stopped by SIGINT at step 4 of 7 (mid-epoch: the batch order is in the checkpoint), resumed
    through the CLI with only --out and --resume: the same weights and accuracy as a straight run."""
    from npformer.training.stopping import Interrupted
    kw = dict(dropout=0.2, max_iters=7, keep=0)
    straight = run(root, "straight7", **kw)
    signal_at_steps(monkeypatch, {4})
    with pytest.raises(Interrupted, match="saved step 4 to"):
        run(root, "stopped7", **kw)
    monkeypatch.undo()
    assert load_checkpoint(str(root / "stopped7")).step == 4
    assert main(["finetune", "--out", str(root / "stopped7"), "--resume"]) == 0
    assert f"test accuracy: {straight['test_accuracy']:.4f}" in capsys.readouterr().out
    a, b = load_checkpoint(str(root / "straight7")), load_checkpoint(str(root / "stopped7"))
    assert a.step == b.step == 7 and a.meta["metrics"] == b.meta["metrics"]
    if DEVICE == "cpu":
        for k in a.model_state:
            np.testing.assert_array_equal(a.model_state[k], b.model_state[k], err_msg=k)


def test_a_new_run_needs_ckpt(capsys, tmp_path):
    assert main(["finetune", "--out", str(tmp_path / "ft")]) == 2
    assert "--ckpt is required" in capsys.readouterr().err


def test_ctrl_c_during_the_final_evaluation_or_at_the_last_step_still_saves_the_metrics(root, monkeypatch):
    """The run is over once its last step is done: a signal then lets the evaluation finish and
    the final checkpoint (with the accuracies) be written, and the run ends normally."""
    import signal

    from npformer.training import finetune as finetune_module
    accuracy_of = finetune_module.accuracy

    calls = []

    def interrupted_accuracy(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:                                         # one Ctrl-C, during the val evaluation
            os.kill(os.getpid(), signal.SIGINT)
        return accuracy_of(*args, **kwargs)
    monkeypatch.setattr(finetune_module, "accuracy", interrupted_accuracy)
    during = run(root, "during-eval")
    monkeypatch.undo()
    signal_at_steps(monkeypatch, {3})                               # the last of max_iters=3
    at_last = run(root, "at-last")
    for name, summary in (("during-eval", during), ("at-last", at_last)):
        ckpt = load_checkpoint(str(root / name))
        assert ckpt.step == 3 and ckpt.meta["metrics"]["test_accuracy"] == summary["test_accuracy"]


def test_resume_from_another_directory_with_a_relative_ckpt(root, monkeypatch, capsys):
    monkeypatch.chdir(root)
    assert main(["finetune", "--ckpt", "pre/", "--out", "rel", "--max-iters", "2", "--batch-size", "8"]) == 0
    monkeypatch.chdir(root.parent)
    assert main(["finetune", "--out", str(root.name) + "/rel", "--resume", "--max-iters", "3"]) == 0, \
        capsys.readouterr().err
    assert load_checkpoint(str(root / "rel")).step == 3
