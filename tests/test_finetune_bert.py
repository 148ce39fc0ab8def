"""`npformer finetune` on a BERT: from an npformer `pretrain --model bert` run or an HF directory, for
sentiment and question answering, through the Trainer; its output directory and the errors it gives."""

import json
import warnings

import numpy as np
import pytest

from npformer import cli
from npformer.training.checkpoint import load_checkpoint
from npformer.training.finetune import FinetuneConfig, finetune
from npformer.training.finetune_bert import is_bert
from npformer.training.pretrain import pretrain
from tests.test_pretrain import quiet, tiny

pytest.importorskip("safetensors.numpy")           # the fine-tuned model is saved as an HF directory

QA_TRAIN = 100


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory):
    """A tiny BERT pretrained for 4 steps on the toy language (block size 96: QA rows fit)."""
    from npformer.data import default_corpus
    tmp = tmp_path_factory.mktemp("bert")
    data = tmp / "data.txt"
    data.write_text(default_corpus(20_000, 2_000)[0], encoding="utf-8")
    pretrain(tiny(tmp, "run", model="bert", vocab_size=300, block_size=96, max_iters=4, data=str(data)), log=quiet)
    return str(tmp / "run")


def run(tmp_path, ckpt, task, **kw):
    if task == "qa":                # 100 training questions: drawing and featurising 4,000 took seconds
        kw.setdefault("train_examples", QA_TRAIN)
    cfg = FinetuneConfig(ckpt=ckpt, task=task, out=str(tmp_path / "ft"), max_iters=3, batch_size=8,
                         eval_batch_size=200, device="cpu", **kw)
    lines = []
    return finetune(cfg, log=lines.append), lines


def test_sentiment_from_an_npformer_bert_run(tmp_path, bert_run):
    summary, lines = run(tmp_path, bert_run, "sentiment")
    assert lines[0].startswith("loaded ") and "new (drawn with seed 0): bert.pooler.*, classifier.*" in lines[0]
    assert "not used: cls.predictions.*" in lines[0]
    assert summary["steps"] == 3 and 0 <= summary["test_accuracy"] <= 1 and summary["n_test"] == 1000
    results = json.load(open(tmp_path / "ft" / "results.json", encoding="utf-8"))
    assert results["test_accuracy"] == summary["test_accuracy"]
    # the best model is an HF directory that loads back with the same weights as the best checkpoint
    from npformer.interop import from_pretrained
    model, tok = from_pretrained(summary["model_dir"], with_tokenizer=True)
    best = load_checkpoint(summary["best_checkpoint"]).model_state
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(np.asarray(v), best[k], err_msg=k)
    assert tok.vocab_tokens == load_checkpoint(bert_run).tokenizer.wordpiece.vocab_tokens


def test_a_frozen_encoder_keeps_its_pretrained_weights(tmp_path, bert_run):
    summary, _ = run(tmp_path, bert_run, "sentiment", freeze=True)
    tuned = load_checkpoint(summary["best_checkpoint"]).model_state
    pretrained = load_checkpoint(bert_run).model_state
    encoder = [k for k in tuned if k.startswith(("bert.embeddings.", "bert.encoder."))]
    assert encoder and all(np.array_equal(tuned[k], pretrained[k]) for k in encoder)
    assert summary["trainable"] == sum(tuned[k].size for k in tuned if k not in encoder)


def test_from_scratch_differs_from_pretrained_only_in_the_initial_weights(tmp_path, bert_run):
    scratch, lines = run(tmp_path, bert_run, "sentiment", from_scratch=True)
    assert scratch["init"] == "scratch" and any("BERT scratch full fine-tuning" in line for line in lines)
    encoder = load_checkpoint(scratch["best_checkpoint"]).model_state["bert.embeddings.word_embeddings.weight"]
    assert not np.allclose(encoder, load_checkpoint(bert_run).model_state["bert.embeddings.word_embeddings.weight"],
                           atol=1e-2)


def test_reinit_layers_draws_the_top_layers_fresh_and_keeps_the_rest(bert_run):
    """--reinit-layers N: the top N encoder layers hold a fresh model's weights (same seed as the head), the
    embeddings and lower layers the checkpoint's."""
    from npformer.training.finetune_bert import _reinit_top_layers, load_bert
    model, _ = load_bert(bert_run, "BertForQuestionAnswering", 2, 3, "cpu", quiet)
    before = {k: np.array(v) for k, v in model.state_dict().items()}
    lines = []
    _reinit_top_layers(model, 1, 3, "cpu", lines.append)
    assert lines == ["re-initialised encoder layers 0 to 0 of 1 (drawn with seed 3)"]
    fresh = type(model)(model.config, generator=np.random.default_rng(3), dtype=np.float32).state_dict()
    after = model.state_dict()
    top = [k for k in after if k.startswith("bert.encoder.layer.0.")]
    assert top and all(np.array_equal(after[k], fresh[k]) for k in top)
    assert any(not np.array_equal(before[k], fresh[k]) for k in top)
    assert all(np.array_equal(after[k], before[k]) for k in after if k not in top)
    with pytest.raises(ValueError, match="--reinit-layers 2: the encoder has only 1 layers"):
        _reinit_top_layers(model, 2, 3, "cpu", lines.append)


def test_reinit_layers_is_refused_where_it_means_nothing(tmp_path, bert_run):
    for kw in ({"from_scratch": True}, {"freeze": True}):
        with pytest.raises(ValueError, match="--reinit-layers keeps the lower layers pretrained"):
            run(tmp_path, bert_run, "qa", reinit_layers=1, **kw)
    with pytest.raises(ValueError, match="--reinit-layers must be an integer >= 0"):
        run(tmp_path, bert_run, "qa", reinit_layers=-1)
    gpt = tiny(tmp_path, "gpt")
    pretrain(gpt, log=quiet)
    with pytest.raises(ValueError, match="--reinit-layers re-draws BERT encoder layers.*not a BERT"):
        run(tmp_path, gpt.out, "sentiment", reinit_layers=1)


def test_question_answering_reports_exact_match_and_f1(tmp_path, bert_run, capsys):
    out = str(tmp_path / "qa")
    assert cli.main(["finetune", "--ckpt", bert_run, "--task", "qa", "--out", out, "--max-iters", "2",
                     "--batch-size", "8", "--train-examples", str(QA_TRAIN)]) == 0
    printed = capsys.readouterr().out
    assert "test exact match: " in printed and "(1000 questions)" in printed
    results = json.load(open(f"{out}/results.json", encoding="utf-8"))
    assert 0 <= results["test_exact_match"] <= 100 and results["test_f1"] >= results["test_exact_match"]


def test_an_hf_directory_fine_tunes_too(tmp_path, bert_run):
    """A masked-LM HF directory (what transformers' save_pretrained writes) as --ckpt: the head is new, and
    from_pretrained's warning says so."""
    from npformer.interop import save_pretrained
    from npformer.models import BertConfig, BertForMaskedLM
    ckpt = load_checkpoint(bert_run)
    mlm = BertForMaskedLM(BertConfig(**ckpt.meta["model_config"]), dtype=np.float32)
    mlm.load_state_dict(ckpt.model_state)
    hf = str(tmp_path / "hf")
    save_pretrained(mlm, hf, tokenizer=ckpt.tokenizer.wordpiece)
    assert is_bert(hf) and is_bert(bert_run)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary, _ = run(tmp_path, hf, "qa")
    assert any("qa_outputs" in str(w.message) for w in caught)
    assert summary["n_test"] == 1000


def test_bad_requests_are_refused_with_the_reason(tmp_path, bert_run, capsys):
    gpt = tiny(tmp_path, "gpt")
    pretrain(gpt, log=quiet)
    assert not is_bert(gpt.out)
    rc = cli.main(["finetune", "--ckpt", gpt.out, "--task", "qa", "--out", str(tmp_path / "x")])
    assert rc == 2 and "--task qa needs a BERT checkpoint" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--resume: BERT fine-tuning runs through the Trainer.*does not resume"):
        run(tmp_path, bert_run, "sentiment", resume=True)


def test_a_context_cut_by_the_position_table_is_an_error_naming_the_example(tmp_path):
    """QA rows longer than max_position_embeddings are truncated; an answer cut off is an error."""
    from npformer.data import default_corpus
    data = tmp_path / "data.txt"
    data.write_text(default_corpus(20_000, 2_000)[0], encoding="utf-8")
    pretrain(tiny(tmp_path, "short", model="bert", vocab_size=300, block_size=24, max_iters=3, data=str(data)),
             log=quiet)
    with pytest.raises(ValueError, match=r"train-\d+.*answer.*max_length"):
        run(tmp_path, str(tmp_path / "short"), "qa")


def test_answer_questions_returns_spans_of_the_contexts(tmp_path, bert_run):
    from npformer.data.qa import qa_splits
    from npformer.data.qa_features import answer_questions, best_spans, qa_features
    from npformer.interop import from_pretrained
    summary, _ = run(tmp_path, bert_run, "qa")
    model, tok = from_pretrained(summary["model_dir"], with_tokenizer=True)
    examples = qa_splits(8, 2, 2, seed=3)["train"]
    questions, contexts = [e["question"] for e in examples], [e["context"] for e in examples]
    answers = answer_questions(model, tok, questions, contexts)
    assert len(answers) == 8 and all(a and a in c for a, c in zip(answers, contexts))
    # the same spans as scoring the labelled features: the labels change nothing in the inputs
    features = qa_features(tok, examples, model.config.max_position_embeddings)
    out = model(features["input_ids"], features["attention_mask"], features["token_type_ids"])
    spans = best_spans(out.start_logits.data, out.end_logits.data, features)
    assert answers == [c[a:b] for c, (a, b) in zip(contexts, spans)]
    assert model.training is False
    with pytest.raises(ValueError, match=r"example question 0: its context has \d+ tokens, but max_length=20"):
        answer_questions(model, tok, questions[:1], contexts[:1], max_length=20)
    with pytest.raises(ValueError, match="lists of str of the same length"):
        answer_questions(model, tok, questions, contexts[:1])


def test_more_training_questions_are_scored_on_the_same_test_questions(tmp_path, bert_run, capsys):
    summary, lines = run(tmp_path, bert_run, "qa", train_examples=200)
    assert "200 train examples" in lines[1]
    with pytest.raises(ValueError, match="--train-examples is a positive integer for --task qa; got 200 for --task "
                                         "sentiment"):
        run(tmp_path, bert_run, "sentiment", train_examples=200)
    with pytest.raises(ValueError, match="--train-examples is a positive integer for --task qa; got 0"):
        run(tmp_path, bert_run, "qa", train_examples=0)
