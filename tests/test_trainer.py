"""npformer.training.trainer: HF's Trainer / TrainingArguments on npformer's BERT, the survey's
fine-tuning example run as written, determinism, the learning-rate schedule, padding and errors."""

import json
import os

import numpy as np
import pytest

import npformer
from npformer.data import WordPieceTokenizer
from npformer.models import BertConfig, BertForQuestionAnswering, BertForSequenceClassification
from npformer.training.checkpoint import load_checkpoint
from npformer.training.trainer import (DataCollatorWithPadding, Trainer, TrainingArguments, linear_schedule)

pytest.importorskip("safetensors.numpy")       # save_pretrained / from_pretrained

WORDS = ["the", "movie", "film", "was", "is", "really", "very", "good", "bad", "plot", "acting", "a", "and"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
TINY = dict(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=32)


def _texts(n, seed):
    """n short sentences, label 1 when they hold "good", 0 when "bad"; lengths vary."""
    rng = np.random.default_rng(seed)
    fillers = ["the", "movie", "film", "was", "is", "really", "very", "plot", "acting", "a", "and"]
    texts, labels = [], []
    for i in range(n):
        words = list(rng.choice(fillers, size=int(rng.integers(2, 7))))
        label = i % 2
        words.insert(int(rng.integers(0, len(words) + 1)), "good" if label else "bad")
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def _dataset(tokenizer, n, seed, text=False):
    """Examples as HF's datasets.map(tokenizer) leaves them: the encoding, "label", and with text the "text"."""
    texts, labels = _texts(n, seed)
    return [{**({"text": t} if text else {}), **tokenizer(t), "label": y} for t, y in zip(texts, labels)]


@pytest.fixture
def pretrained(tmp_path):
    """A directory holding a tiny masked-LM BERT and its WordPiece vocabulary, as HF would have it."""
    d = tmp_path / "tiny-bert"
    mlm = npformer.models.BertForMaskedLM(BertConfig(**TINY), generator=np.random.default_rng(0))
    mlm.save_pretrained(d, tokenizer=WordPieceTokenizer(VOCAB))
    return d


def test_survey_example_runs_as_written(tmp_path, pretrained, capsys):
    d = pretrained
    tokenizer = WordPieceTokenizer.from_pretrained(d)
    train_dataset, eval_dataset = _dataset(tokenizer, 96, 0, text=True), _dataset(tokenizer, 32, 1, text=True)
    with pytest.warns(UserWarning, match="classifier.weight"), pytest.warns(UserWarning, match="cls.predictions"):
        model = BertForSequenceClassification.from_pretrained(d, num_labels=2)

    # --- the survey's code, as written
    training_args = TrainingArguments(
        output_dir=str(tmp_path / "results"),
        num_train_epochs=3,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=16,
        evaluation_strategy="epoch",
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
    )
    trainer.train()
    # ---

    state = trainer.state
    evals = [h for h in state.log_history if "eval_loss" in h]
    train_losses = [h["loss"] for h in state.log_history if "loss" in h]
    assert state.global_step == 3 * 6 and [h["epoch"] for h in evals] == [1.0, 2.0, 3.0]
    assert train_losses[-1] < train_losses[0]           # barely, at HF's default lr 5e-5: see the next test
    out = capsys.readouterr().out
    assert out.count("train loss") == 3 and "loaded the best model" in out
    results = tmp_path / "results"
    assert sorted(e for e in os.listdir(results) if e.startswith("ckpt-")) == ["ckpt-000006", "ckpt-000012",
                                                                            "ckpt-000018"]
    best = min(evals, key=lambda h: h["eval_loss"])
    assert state.best_metric == best["eval_loss"]
    assert state.best_model_checkpoint == str(results / f"ckpt-{best['step']:06d}")
    ckpt = load_checkpoint(state.best_model_checkpoint)
    assert ckpt.meta["trainer_state"]["metrics"]["eval_loss"] == best["eval_loss"]
    assert ckpt.meta["training_args"]["eval_strategy"] == "epoch" and ckpt.meta["model_class"] == type(model).__name__
    for k, v in model.state_dict().items():                             # the best weights, loaded back
        np.testing.assert_array_equal(np.asarray(v), ckpt.model_state[k])
    assert trainer.evaluate()["eval_loss"] == pytest.approx(best["eval_loss"], rel=1e-6)


def test_the_loop_learns(tmp_path, pretrained):
    """The same run at a learning rate this tiny model can use in a few epochs separates good from bad."""
    tokenizer = WordPieceTokenizer.from_pretrained(pretrained)
    with pytest.warns(UserWarning):
        model = BertForSequenceClassification.from_pretrained(pretrained, num_labels=2)
    args = TrainingArguments(str(tmp_path / "results"), num_train_epochs=12, per_device_train_batch_size=16,
                             eval_strategy="epoch", learning_rate=5e-3, save_strategy="epoch", disable_tqdm=True)
    trainer = Trainer(model, args, train_dataset=_dataset(tokenizer, 96, 0), eval_dataset=_dataset(tokenizer, 32, 1),
                      compute_metrics=lambda p: {"accuracy": (p.predictions.argmax(-1) == p.label_ids).mean()},
                      log=lambda line: None)
    out = trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert evals[0]["eval_accuracy"] == 0.5 and evals[-1]["eval_accuracy"] == 1.0
    assert trainer.state.best_metric < 0.3 < evals[0]["eval_loss"] and out.training_loss < 0.6
    assert trainer.state.best_model_checkpoint.endswith(f"ckpt-{trainer.state.global_step:06d}")   # still falling


def _train(tmp_path, name, seed, **kwargs):
    model = BertForSequenceClassification(BertConfig(**TINY), generator=np.random.default_rng(3))
    args = TrainingArguments(str(tmp_path / name), num_train_epochs=1, per_device_train_batch_size=4, seed=seed,
                             learning_rate=1e-3, disable_tqdm=True, **kwargs)
    trainer = Trainer(model, args, train_dataset=_dataset(WordPieceTokenizer(VOCAB), 12, 0))
    return trainer, trainer.train()


def test_same_seed_same_weights(tmp_path):
    (a, out_a), (b, _), (c, _) = (_train(tmp_path, n, s) for n, s in (("a", 5), ("b", 5), ("c", 6)))
    assert out_a.global_step == 3 and np.isfinite(out_a.training_loss) and a.model.training
    sa, sb, sc = (t.model.state_dict() for t in (a, b, c))
    for k in sa:
        np.testing.assert_array_equal(np.asarray(sa[k]), np.asarray(sb[k]))
    assert any(not np.array_equal(np.asarray(sa[k]), np.asarray(sc[k])) for k in sa)   # shuffle and dropout differ


def test_linear_schedule():
    # 2 warm-up steps of 10: 0, lr/2, then lr at step 2 down to lr/8 at step 9
    got = [linear_schedule(s, 1.0, 2, 10) for s in range(11)]
    np.testing.assert_allclose(got, [0, 0.5, 1, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0])
    assert linear_schedule(0, 3e-5, 0, 4) == 3e-5 and linear_schedule(7, 1.0, 0, 4) == 0.0


@pytest.mark.verify
def test_linear_schedule_matches_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3)
    sched = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=11)
    for step in range(11):
        assert opt.param_groups[0]["lr"] == pytest.approx(linear_schedule(step, 0.3, 3, 11), abs=1e-15)
        opt.step()
        sched.step()


def test_trainer_uses_the_schedule(tmp_path):
    trainer, _ = _train(tmp_path, "s", 0, warmup_steps=1, save_strategy="no")
    (entry,) = [h for h in trainer.state.log_history if "learning_rate" in h]
    assert entry["learning_rate"] == pytest.approx(1e-3 * 1 / 2)     # step 2 of 3: (3 - 2) / (3 - 1)
    assert not os.path.exists(tmp_path / "s")                        # save_strategy="no" writes nothing


def test_padding_collator():
    collate = DataCollatorWithPadding(WordPieceTokenizer(["a", "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    batch = collate([{"input_ids": [3, 0, 4], "token_type_ids": [0, 0, 0], "label": 1},
                     {"input_ids": [3, 4], "token_type_ids": [0, 0], "label": 0}])
    np.testing.assert_array_equal(batch["input_ids"], [[3, 0, 4], [3, 4, 1]])          # pad_token_id 1
    np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1], [1, 1, 0]])    # added
    np.testing.assert_array_equal(batch["token_type_ids"], [[0, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(batch["labels"], [1, 0])
    assert "label" not in batch
    plain = DataCollatorWithPadding()([{"input_ids": np.array([5]), "attention_mask": [1], "labels": [7]},
                                       {"input_ids": np.array([5, 6]), "attention_mask": [1, 1], "labels": [7, 8]}])
    np.testing.assert_array_equal(plain["input_ids"], [[5, 0], [5, 6]])
    np.testing.assert_array_equal(plain["attention_mask"], [[1, 0], [1, 1]])
    np.testing.assert_array_equal(plain["labels"], [[7, -100], [7, 8]])                # ignored by the loss
    same = DataCollatorWithPadding()([{"input_ids": [1, 2]}, {"input_ids": [3, 4]}])
    assert set(same) == {"input_ids"} and same["input_ids"].shape == (2, 2)


def test_columns_metrics_and_question_answering(tmp_path):
    """A dict of columns works as a dataset; compute_metrics gets logits and labels; QA predicts (start, end)."""
    tok = WordPieceTokenizer(VOCAB)
    rows = _dataset(tok, 8, 2)
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    model = BertForSequenceClassification(BertConfig(**TINY), generator=np.random.default_rng(0))
    seen = []

    def accuracy(p):
        seen.append(p)
        return {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}

    trainer = Trainer(model, TrainingArguments(str(tmp_path / "c"), per_device_eval_batch_size=3),
                      compute_metrics=accuracy, tokenizer=tok)
    metrics = trainer.evaluate(columns)
    assert set(metrics) == {"eval_loss", "eval_accuracy"} and seen[0].predictions.shape == (8, 2)
    np.testing.assert_array_equal(seen[0].label_ids, columns["label"])
    assert model.training                          # the mode it had, restored
    qa = BertForQuestionAnswering(BertConfig(**TINY), generator=np.random.default_rng(0))
    data = [{**r, "start_positions": 1, "end_positions": 2} for r in (tok("good movie"), tok("a very bad film"))]
    pred = Trainer(qa, TrainingArguments(str(tmp_path / "q"), per_device_eval_batch_size=1)).predict(data)
    start, end = pred.predictions
    assert start.shape == end.shape == (2, 6) and start[0, 4] == -100                 # padded across batches
    assert [a.tolist() for a in pred.label_ids] == [[1, 1], [2, 2]] and "test_loss" in pred.metrics


@pytest.mark.parametrize("kwargs,match", [
    (dict(eval_strategy="steps"), "eval_strategy must be one of 'no', 'epoch'"),
    (dict(per_device_train_batch_size=0), "per_device_train_batch_size must be a positive integer"),
    (dict(per_device_eval_batch_size=-2), "per_device_eval_batch_size"),
    (dict(num_train_epochs=0), "num_train_epochs must be a number > 0"),
    (dict(learning_rate=-1.0), "learning_rate"),
    (dict(eval_strategy="no", evaluation_strategy="epoch"), "disagree"),
    (dict(eval_strategy="epoch", save_strategy="no"), "save_strategy"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainingArguments("out", **kwargs)


def test_evaluation_strategy_is_the_older_name():
    assert TrainingArguments("o", evaluation_strategy="epoch").eval_strategy == "epoch"
    assert TrainingArguments("o", eval_strategy="epoch", evaluation_strategy="epoch").eval_strategy == "epoch"
    assert TrainingArguments("o").eval_strategy == "no"


def test_bad_data_and_models(tmp_path):
    tok = WordPieceTokenizer(VOCAB)
    model = BertForSequenceClassification(BertConfig(**TINY), generator=np.random.default_rng(0))
    args = TrainingArguments(str(tmp_path / "e"), disable_tqdm=True)
    rows = _dataset(tok, 4, 0)
    del rows[2]["attention_mask"]
    with pytest.raises(ValueError, match=r"train_dataset: example 2 .*missing \['attention_mask'\]"):
        Trainer(model, args, train_dataset=rows).train()
    with pytest.raises(ValueError, match="columns of different lengths"):
        Trainer(model, args).evaluate({"input_ids": [[1, 2]], "labels": [0, 1]})
    with pytest.raises(ValueError, match="needs an eval_dataset"):
        Trainer(model, TrainingArguments("x", eval_strategy="epoch"), train_dataset=_dataset(tok, 4, 0)).train()

    class NoLoss(npformer.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, labels=None, **batch):
            return self.inner(**batch)                   # drops the labels: loss None

    with pytest.raises(ValueError, match="Trainer.train: the model's output has no loss"):
        Trainer(NoLoss(), args, train_dataset=_dataset(tok, 4, 0)).train()
    Trainer(model, args, train_dataset=_dataset(tok, 4, 0)).train()
    with pytest.raises(ValueError, match="output_dir .* already holds checkpoints"):
        Trainer(model, args, train_dataset=_dataset(tok, 4, 0)).train()
    args.overwrite_output_dir = True
    assert Trainer(model, args, train_dataset=_dataset(tok, 4, 0)).train().global_step == 3


def test_tokenizer_save_pretrained(tmp_path):
    tok = WordPieceTokenizer(VOCAB, do_lower_case=False)
    tok.save_pretrained(tmp_path / "new" / "dir")
    assert WordPieceTokenizer.from_pretrained(tmp_path / "new" / "dir") == tok
    assert json.loads((tmp_path / "new" / "dir" / "tokenizer_config.json").read_text())["do_lower_case"] is False
