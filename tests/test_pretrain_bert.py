"""`npformer pretrain --model bert`: masked-LM batches, bit-exact resume, the checkpoint a BertForMaskedLM
loads, the WordPiece stream tokenizer, and the flags it refuses."""

import json
import os

import numpy as np
import pytest

from npformer import cli
from npformer.data import WordPieceStream, load_tokenizer
from npformer.models import BertConfig, BertForMaskedLM
from npformer.training.checkpoint import load_checkpoint
from npformer.training.objectives import MaskedLM
from npformer.training.pretrain import pretrain
from tests.test_pretrain import assert_same_checkpoint, quiet, read_metrics, tiny, write_corpus


def bert(tmp_path, out="run", **kw):
    return tiny(tmp_path, out, **{"model": "bert", "vocab_size": 60, "block_size": 18, **kw})


def test_a_bert_run_reports_masked_loss_and_accuracy_and_saves_a_loadable_model(tmp_path, capsys):
    lines = []
    summary = pretrain(bert(tmp_path, samples=2), log=lines.append)
    out = str(tmp_path / "run")
    records = read_metrics(out)
    assert [r["step"] for r in records] == [4, 8, 12]
    for r in records:
        assert 0 <= r["train_accuracy"] <= 1 and 0 <= r["val_accuracy"] <= 1
        assert np.isfinite(r["val_loss"]) and r["val_loss"] > 0
    assert summary["model"] == "bert" and summary["val_accuracy"] == records[-1]["val_accuracy"]
    assert summary["entropy_floor"] is None            # the floor bounds next-token loss, not masked loss
    assert any(line.startswith("model: bert ") for line in lines)
    assert "step 12: train " in capsys.readouterr().err and "masked tokens right " in lines[-1]
    fills = [line for line in lines if line.startswith("--- fill-in")]
    assert len(fills) == 2
    for fill in fills:                  # "--- fill-in i: r/n masked tokens right ---", then three lines
        n = int(fill.split("/")[1].split()[0])
        head, given, guessed, truth = fill.split("\n")
        assert given.startswith("input: ") and guessed.startswith("model: ") and truth.startswith("truth: ")
        assert given.count("[MASK]") == n and "[SEP]" not in given and "[CLS]" not in given
        assert len(truth.split()) > 1

    ckpt = load_checkpoint(out)
    assert ckpt.meta["model"] == "bert"
    config = BertConfig(**ckpt.meta["model_config"])
    assert (config.hidden_size, config.num_hidden_layers, config.max_position_embeddings) == (16, 1, 18)
    assert isinstance(ckpt.tokenizer, WordPieceStream) and config.vocab_size == ckpt.tokenizer.vocab_size
    model = BertForMaskedLM(config, dtype=np.float32)
    model.load_state_dict(ckpt.model_state)           # the plain model's names: no wrapper prefix
    assert set(ckpt.model_state) == set(model.state_dict())
    assert "mask_rng" in ckpt.meta["run"]["objective"]


@pytest.mark.parametrize("dropout,workers", [(0.0, 1), (0.2, 2)])
def test_a_stopped_bert_run_resumes_bit_exact(tmp_path, dropout, workers):
    full = pretrain(bert(tmp_path, "a", dropout=dropout, workers=workers), log=quiet)
    pretrain(bert(tmp_path, "b", dropout=dropout, workers=workers, max_iters=6, lr_decay_iters=12), log=quiet)
    resumed = pretrain(bert(tmp_path, "b", dropout=dropout, workers=workers, resume=True), log=quiet)
    assert_same_checkpoint(str(tmp_path / "a"), str(tmp_path / "b"))
    assert resumed["val_loss"] == full["val_loss"] and resumed["val_accuracy"] == full["val_accuracy"]


def test_resume_without_the_mask_generator_state_would_differ(tmp_path):
    """The masking generator's state is what makes the resume exact: restarting it from its seed
    masks other positions, so the weights end up different (the test above would catch its loss)."""
    pretrain(bert(tmp_path, "a"), log=quiet)
    pretrain(bert(tmp_path, "b", max_iters=6, lr_decay_iters=12), log=quiet)
    import npformer.training.objectives as objectives
    original = objectives.MaskedLM.load_state_dict
    objectives.MaskedLM.load_state_dict = lambda self, state: None
    try:
        pretrain(bert(tmp_path, "b", resume=True), log=quiet)
    finally:
        objectives.MaskedLM.load_state_dict = original
    a, b = load_checkpoint(str(tmp_path / "a")), load_checkpoint(str(tmp_path / "b"))
    assert any(not np.array_equal(a.model_state[k], b.model_state[k]) for k in a.model_state)


def test_masked_batches_wrap_blocks_in_cls_and_sep_and_mask_only_ordinary_tokens(tmp_path):
    cfg = bert(tmp_path, batch_size=64).checked()
    text = open(cfg.data, encoding="utf-8").read()
    tok = WordPieceStream.train(text, 60)
    objective = MaskedLM(cfg, tok)
    ids = tok.encode(text)
    x, y = objective.batch(objective.sampler(ids, seed=1))
    wp = tok.wordpiece
    assert x.shape == y.shape == (64, 18) and x.dtype == y.dtype == np.int64
    assert (x[:, 0] == wp.cls_token_id).all() and (x[:, -1] == wp.sep_token_id).all()
    assert (y[:, [0, -1]] == -100).all()
    chosen = y != -100
    assert 0.10 < chosen[:, 1:-1].mean() < 0.20                          # 15% of the ordinary tokens
    masked = (x == wp.mask_token_id) & chosen
    assert 0.70 < masked.sum() / chosen.sum() < 0.90                      # 80% of them become [MASK]
    # where not chosen, the input is the text itself: the labels hold the text where chosen
    original = np.where(chosen, y, x)[:, 1:-1]
    windows = {tuple(ids[i:i + 16]) for i in range(len(ids) - 16)}
    assert all(tuple(row) in windows for row in original)


def test_evaluation_scores_the_same_masked_positions_every_time(tmp_path):
    cfg = bert(tmp_path).checked()
    text = open(cfg.data, encoding="utf-8").read()
    objective = MaskedLM(cfg, WordPieceStream.train(text, 60))
    ids = objective.tok.encode(text)
    first = objective.evaluate(ids, seed=3)
    objective.batch(objective.sampler(ids, seed=9))             # the training masks move on ...
    assert objective.evaluate(ids, seed=3) == first             # ... the evaluation's do not
    assert objective.evaluate(ids, seed=4) != first


def test_evaluation_hides_every_scored_token_so_the_floor_bounds_it(tmp_path):
    # training keeps 10% of the chosen tokens visible; evaluation must not, or a model that copies its
    # input would score below ToyLanguage.masked_floor(), the floor of a hidden token
    cfg = bert(tmp_path, batch_size=64).checked()
    text = open(cfg.data, encoding="utf-8").read()
    objective = MaskedLM(cfg, WordPieceStream.train(text, 60))
    ids = objective.tok.encode(text)
    batches = list(objective._batches(ids, seed=3))
    assert len(batches) == cfg.eval_iters
    for x, y in batches:
        chosen = y != -100
        assert chosen.any() and (x[chosen] == objective.tok.wordpiece.mask_token_id).all()
        assert (x[~chosen] != objective.tok.wordpiece.mask_token_id).all()      # nothing else hidden


def test_gpt_trains_on_wordpiece_tokens_too(tmp_path):
    summary = pretrain(tiny(tmp_path, tokenizer="wordpiece", vocab_size=60, samples=1), log=quiet)
    ckpt = load_checkpoint(str(tmp_path / "run"))
    assert ckpt.meta["model"] == "gpt" and isinstance(ckpt.tokenizer, WordPieceStream)
    assert summary["val_accuracy"] is None and "train_accuracy" not in read_metrics(str(tmp_path / "run"))[0]


@pytest.mark.parametrize("flags,message", [
    (["--model", "bert", "--tokenizer", "char"], "--model bert needs --tokenizer wordpiece"),
    (["--model", "bert", "--no-bias"], "--no-bias is a GPT option"),
    (["--model", "bert", "--block-size", "2"], "--block-size must be >= 3 for bert"),
    (["--tokenizer", "wordpiece", "--vocab-size", "5"], "--vocab-size must exceed the 5 special tokens"),
])
def test_bad_bert_flags_are_refused_before_anything_is_written(tmp_path, capsys, flags, message):
    data = write_corpus(tmp_path / "data.txt")
    rc = cli.main(["pretrain", *flags, "--data", data, "--out", str(tmp_path / "run")])
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_resume_takes_the_model_from_the_checkpoint(tmp_path, capsys):
    data = write_corpus(tmp_path / "data.txt")
    out = str(tmp_path / "run")
    flags = ["--data", data, "--out", out, "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "18",
             "--batch-size", "4", "--eval-iters", "1", "--samples", "0", "--vocab-size", "60"]
    assert cli.main(["pretrain", "--model", "bert", "--max-iters", "4", "--eval-interval", "2",
                     "--lr-decay-iters", "8", *flags]) == 0
    assert cli.main(["pretrain", "--resume", "--max-iters", "8", "--out", out]) == 0
    assert "model: bert " in capsys.readouterr().out
    assert load_checkpoint(out).step == 8 and load_checkpoint(out).meta["model"] == "bert"


# ----------------------------------------------------------------------------- WordPieceStream

def test_wordpiece_stream_encodes_without_specials_and_round_trips_through_json(tmp_path):
    text = open(write_corpus(tmp_path / "data.txt"), encoding="utf-8").read()
    tok = WordPieceStream.train(text, 60)
    ids = tok.encode("The cat sat.\nOn a mat")
    assert ids.dtype == np.int64 and ids.ndim == 1
    assert tok.wordpiece.cls_token_id not in ids and tok.wordpiece.sep_token_id not in ids
    assert tok.decode(ids) == "the cat sat. on a mat"           # lower-cased, line break gone
    assert tok.decode(list(ids)) == tok.decode(ids)
    path = str(tmp_path / "tok.json")
    tok.save(path)
    again = load_tokenizer(path)
    assert again == tok and np.array_equal(again.encode(text), tok.encode(text))
    assert json.load(open(path, encoding="utf-8"))["type"] == "wordpiece"


def test_wordpiece_stream_errors_name_the_problem(tmp_path):
    text = open(write_corpus(tmp_path / "data.txt"), encoding="utf-8").read()
    tok = WordPieceStream.train(text, 60)
    with pytest.raises(ValueError, match=r"token ids out of range \[0, "):
        tok.decode([0, tok.vocab_size])
    with pytest.raises(TypeError, match="wraps a WordPieceTokenizer"):
        WordPieceStream("vocab.txt")
    path = str(tmp_path / "tok.json")
    tok.save(path)
    obj = json.load(open(path, encoding="utf-8"))
    obj["vocab"] = [t for t in obj["vocab"] if t != "[UNK]"]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    with pytest.raises(ValueError, match=rf"{os.path.basename(path)}.*lacks the special token\(s\) '\[UNK\]'"):
        load_tokenizer(path)
    obj["options"] = {"color": "red"}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    with pytest.raises(ValueError, match="'options' object with keys among"):
        load_tokenizer(path)


def test_on_the_built_in_language_the_masked_token_floor_is_reported(tmp_path, capsys):
    from npformer.data import ToyLanguage
    lines = []
    summary = pretrain(bert(tmp_path, data=None, max_iters=4, eval_interval=4, eval_iters=1), log=lines.append)
    floor = ToyLanguage(seed=0).masked_floor()
    assert summary["token_floor"] == floor and summary["entropy_floor"] is None
    assert f"masked-token floor {floor:.4f} nats/token" in lines[1] and lines[1].startswith("model: bert")
    gap = 100 * (summary["val_loss"] / floor - 1)
    assert f"(floor {floor:.4f}, gap {gap:.1f}%)" in capsys.readouterr().err
    assert f"nats/token vs floor {floor:.4f} ({summary['gap_percent']:+.1f}%), masked tokens right " in lines[-1]


def test_a_gpt_on_wordpiece_tokens_is_measured_against_their_own_floor(tmp_path, capsys):
    """WordPiece drops the line breaks, whose choice the per-character rate counts: the gap is taken
    per token against the entropy of the tokens WordPiece keeps (never a negative gap by construction)."""
    from npformer.data import ToyLanguage
    lines = []
    summary = pretrain(tiny(tmp_path, tokenizer="wordpiece", vocab_size=300, data=None, max_iters=4, eval_interval=4,
                            eval_iters=1), log=lines.append)
    lang = ToyLanguage(seed=0)
    floor = lang.token_entropy(as_wordpiece=True)
    assert lang.token_entropy() - 0.06 < floor < lang.token_entropy() - 0.03        # the line break's share
    assert summary["token_floor"] == floor and summary["entropy_floor"] is None
    assert f"entropy floor {floor:.4f} nats/token" in lines[1]
    assert f"(floor {floor:.4f}, gap {100 * (summary['val_loss'] / floor - 1):.1f}%)" in capsys.readouterr().err
    assert summary["gap_percent"] == pytest.approx(100 * (summary["val_loss"] / floor - 1), rel=1e-12)
    assert f"nats/token vs floor {floor:.4f} ({summary['gap_percent']:+.1f}%)" in lines[-1]


def test_bert_resumes_on_longer_blocks_within_its_position_table(tmp_path):
    """BERT's schedule: short blocks first (attention learns its neighbours quickly there), then longer
    ones; the position table (--max-positions) is fixed by the first run, the block size may grow."""
    from npformer.training.checkpoint import CheckpointError
    pretrain(bert(tmp_path, block_size=10, max_positions=18, max_iters=6, lr_decay_iters=12), log=quiet)
    assert BertConfig(**load_checkpoint(str(tmp_path / "run")).meta["model_config"]).max_position_embeddings == 18
    lines = []
    summary = pretrain(bert(tmp_path, block_size=18, resume=True), log=lines.append)
    assert any("the blocks change from 10 to 18 tokens (the position table has 18)" in line for line in lines)
    assert summary["step"] == 12 and np.isfinite(summary["val_loss"])
    with pytest.raises(CheckpointError, match=r"max_positions \(checkpoint 18, now 24\)"):
        pretrain(bert(tmp_path, block_size=18, max_positions=24, max_iters=14, resume=True), log=quiet)
    with pytest.raises(ValueError, match=r"--max-positions must be an integer >= --block-size \(20\)"):
        pretrain(bert(tmp_path, "c", block_size=20, max_positions=18), log=quiet)
    with pytest.raises(ValueError, match="--max-positions is a BERT option"):
        pretrain(tiny(tmp_path, "d", max_positions=32), log=quiet)
