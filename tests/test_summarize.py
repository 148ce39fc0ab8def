"""The summarize task (npformer.data.summarize, tasks.SummarizeTask): every reference summary found again
by the checker and by an independent count, seeded and disjoint splits, user input, ROUGE from
rouge-score on hand-computed cases, and evaluate() / ``npformer seq2seq`` reporting it for summarize only."""

import re
import sys
from collections import Counter

import numpy as np
import pytest

from npformer.cli import main
from npformer.data import summarize
from npformer.data.corpus import ANIMATE
from npformer.data.summarize import ROUGE_TYPES, rouge_scores, summary_of
from npformer.data.tasks import TASKS, SummarizeTask, TaskTokenizer, get_task, split_bucket
from npformer.models import Seq2SeqTransformer
from npformer.training.checkpoint import load_checkpoint
from npformer.training.seq2seq import DEFAULT_ITERS, Seq2SeqTrainConfig, decode, evaluate, make_batch, model_config

TINY = dict(d_model=16, nhead=2, num_layers=1, dim_feedforward=32, dropout=0.0, batch_size=16, max_iters=8,
            warmup=10, lr_factor=0.2, n_test=12, device="cpu")
TINY_FLAGS = ["--d-model", "16", "--nhead", "2", "--num-layers", "1", "--dim-feedforward", "32", "--dropout", "0",
              "--batch-size", "16", "--max-iters", "8", "--warmup", "10", "--lr-factor", "0.2", "--n-test", "12",
              "--device", "cpu"]
LEMMA = {form: pair[0] for pair in ANIMATE for form in pair}


@pytest.fixture(scope="module")
def pairs():
    """(train pairs, test pairs): 3000 training draws and 1000 distinct test documents, seeded."""
    task = get_task("summarize")
    return task.batch(np.random.default_rng(0), 3000, "train"), task.test_set(1000, seed=1)


# ----------------------------------------------------------------------------- the task and its checker

def test_checker_finds_every_reference_summary(pairs):
    task = get_task("summarize")
    for src, tgt in pairs[0] + pairs[1]:
        assert summary_of(src) == tgt == task.target(src), src
        assert 1 <= len(src) <= task.max_src_len and 1 <= len(tgt) <= task.max_tgt_len
        assert set(src) <= set(task.src_chars) and set(tgt) <= set(task.tgt_chars)


def test_an_independent_count_gives_a_unique_topic_and_its_sentences(pairs):
    """Without the checker's grammar: the subject is the animate noun among a sentence's first three
    words; the topic is the most frequent one, strictly; the summary is its sentences from that noun on,
    each after "the"."""
    sizes = Counter()
    for src, tgt in pairs[0][:1000] + pairs[1]:
        sentences = [s.strip() for s in re.findall(r"[^.]+\.", src)]
        subjects = [next(LEMMA[w] for w in s.split()[:3] if w in LEMMA) for s in sentences]
        (topic, k), (_, runner_up) = Counter(subjects).most_common(2)
        assert k > runner_up and 2 <= k <= 3 and 3 <= len(sentences) <= 5 and k < len(sentences), src
        kept = [s for s, t in zip(sentences, subjects) if t == topic]
        assert tgt == " ".join("the " + s[s.index(" " + w + " ") + 1:] for s in kept
                               for w in [next(w for w in s.split()[:3] if w in LEMMA)])
        sizes[len(sentences), k] += 1
    assert set(sizes) == {(3, 2), (4, 2), (4, 3), (5, 2), (5, 3)}       # every shape is drawn


def test_topic_words_elsewhere_do_not_count_and_ties_are_refused():
    doc = "a dog waits. my cat sees a dog. the big cat sleeps. one king likes the dogs."
    assert summary_of(doc) == "the cat sees a dog. the cat sleeps."           # dog: 1 subject, 2 objects
    for bad, match in [("a dog waits. my cat sees a dog.", "no unique most frequent subject"),
                       ("a dog waits.  my dog runs.", "separated by one space"),
                       ("a dogs wait. my dog runs.", "'a' does not agree with 'dogs'"),
                       ("a dog wait. my dog runs.", "'wait' does not agree with 'dog'"),
                       ("a dog sees. my dog runs.", "expected a determiner at word 4"),
                       ("a tree waits. my dog runs.", "expected a noun at word 2"),
                       ("a dog runs now. a dog runs.", "unexpected words after word 3")]:
        with pytest.raises(ValueError, match=match):
            summary_of(bad)


def test_registered_and_listed_by_the_command(capsys):
    assert "summarize" in TASKS and isinstance(get_task("summarize"), SummarizeTask)
    assert SummarizeTask().max_src_len == summarize.MAX_SRC_LEN == 150
    assert Seq2SeqTrainConfig(task="summarize").checked().max_iters == DEFAULT_ITERS["summarize"] == 6000
    # summarize trains without dropout unless asked (docs/summarization.md); the other tasks keep 0.1
    assert Seq2SeqTrainConfig(task="summarize").checked().dropout == 0.0
    assert Seq2SeqTrainConfig(task="summarize", dropout=0.2).checked().dropout == 0.2
    assert Seq2SeqTrainConfig(task="copy").checked().dropout == 0.1
    with pytest.raises(SystemExit):
        main(["seq2seq", "--help"])
    help_text = " ".join(capsys.readouterr()[0].split())
    assert "--task TASK one of copy, reverse, numbers, dates, summarize" in help_text
    assert "None: 0.1, except summarize 0.0" in help_text


def test_draws_are_seeded(pairs):
    task = get_task("summarize")
    a = task.batch(np.random.default_rng(0), 300, "train")    # draws are sequential: the same seed, the same prefix
    assert a == pairs[0][:300] and task.batch(np.random.default_rng(1), 50) != a[:50]
    assert task.test_set(100, seed=1) == pairs[1][:100] and task.test_set(50, seed=2) != pairs[1][:50]
    rng1, rng2 = np.random.default_rng(7), np.random.default_rng(7)
    assert [summarize.document(rng1) for _ in range(20)] == [summarize.document(rng2) for _ in range(20)]


def test_train_and_test_splits_are_disjoint(pairs):
    task = get_task("summarize")
    train, test = {s for s, _ in pairs[0]}, {s for s, _ in pairs[1]}
    assert len(test) == len(pairs[1]) == 1000 and not train & test
    assert all(split_bucket(s) < task.test_percent for s in test)
    assert all(split_bucket(s) >= task.test_percent for s in train)


def test_parse_source_normalises_and_refuses_what_the_model_never_saw():
    task = get_task("summarize")
    assert task.parse_source("The  Big cat sees a dog .My dogs sleep") == "the big cat sees a dog. my dogs sleep."
    assert task.parse_source("a dog waits.") == "a dog waits."
    for text, match in [("a dog waits!", r"only letters, spaces and '\.'; got '!'"),
                        ("a zebra waits. the cat-dog runs", "got '-'"),
                        ("a zebra waits. my dog quacks.", r"2 word\(s\) outside the task's vocabulary: 'quacks', 'zebra'"),
                        (" . ", "the input has no words")]:
        with pytest.raises(ValueError, match=match):
            task.parse_source(text)


# ----------------------------------------------------------------------------- ROUGE

def test_rouge_on_hand_computed_cases():
    """rouge-score's tokens drop "." and do not stem. ref "the cat sleeps the cat sees a dog" (8 words)
    against "the cat sees a dog" (5): unigrams 5/5 and 5/8 -> F 10/13; bigrams 4/4 and 4/7 -> 8/11;
    LCS 5 -> 10/13. Swapped sentences: every unigram, 4 of 5 bigrams, LCS 3 of 6 words."""
    pytest.importorskip("rouge_score")
    ref, pred = "the cat sleeps. the cat sees a dog.", "the cat sees a dog."
    got = rouge_scores([ref], [pred])
    assert got == pytest.approx({"rouge1": 10 / 13, "rouge2": 8 / 11, "rougeL": 10 / 13}, abs=1e-12)
    got = rouge_scores(["the cat sleeps. a dog runs."], ["a dog runs. the cat sleeps."])
    assert got == pytest.approx({"rouge1": 1.0, "rouge2": 0.8, "rougeL": 0.5}, abs=1e-12)
    assert rouge_scores(["the cats sleep."], ["the cat sleeps."]) == pytest.approx(
        {"rouge1": 1 / 3, "rouge2": 0.0, "rougeL": 1 / 3}, abs=1e-12)        # no stemming: only "the" is shared
    mean = rouge_scores([ref, "a dog runs.", "a dog runs."], [pred, "a dog runs.", ""])      # mean of 3 pairs
    assert mean == pytest.approx({"rouge1": (10 / 13 + 1) / 3, "rouge2": (8 / 11 + 1) / 3,
                                  "rougeL": (10 / 13 + 1) / 3}, abs=1e-12)
    with pytest.raises(ValueError, match="as many predictions"):
        rouge_scores([ref], [])


def untrained(task_name):
    task = get_task(task_name)
    cfg = Seq2SeqTrainConfig(task=task_name, **TINY).checked()
    return Seq2SeqTransformer(model_config(cfg, task), generator=np.random.default_rng(0)).eval(), \
        TaskTokenizer.for_task(task), task.test_set(6, seed=3)


def test_evaluate_reports_rouge_for_summarize_only(monkeypatch):
    pytest.importorskip("rouge_score")
    model, tok, test = untrained("summarize")
    got = evaluate(model, tok, test, batch_size=4)
    outputs = [tok.decode(row[1:]) for row in decode(model, tok, make_batch(tok, test)[0])]
    assert set(got) == {"exact_match", "token_accuracy", "n", *ROUGE_TYPES}
    assert {k: got[k] for k in ROUGE_TYPES} == rouge_scores([t for _, t in test], outputs)
    model, tok, test = untrained("dates")
    assert set(evaluate(model, tok, test)) == {"exact_match", "token_accuracy", "n"}
    monkeypatch.setitem(sys.modules, "rouge_score", None)                # as if not installed
    model, tok, test = untrained("summarize")
    got = evaluate(model, tok, test)
    assert got["rouge_skipped"] == summarize.ROUGE_MISSING and "pip install rouge-score" in got["rouge_skipped"]
    assert not set(ROUGE_TYPES) & set(got)


# ----------------------------------------------------------------------------- the commands

def test_seq2seq_command_prints_rouge_and_translate_reads_documents(tmp_path, capsys):
    pytest.importorskip("rouge_score")
    out = tmp_path / "run"
    assert main(["seq2seq", "--task", "summarize", *TINY_FLAGS, "--out", str(out)]) == 0
    stdout, err = capsys.readouterr()
    step = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("step 8:")]
    assert len(step) == 1 and re.search(r"greedy exact match [\d.]+%, token accuracy [\d.]+%, "
                                        r"rouge1 [\d.]+, rouge2 [\d.]+, rougeL [\d.]+$", step[0]), err
    results = load_checkpoint(str(out)).meta["results"]["greedy"]
    assert set(ROUGE_TYPES) <= set(results) and all(0 <= results[k] <= 1 for k in ROUGE_TYPES)
    assert main(["translate", "--ckpt", str(out), "The cat sleeps. A dog waits"]) == 0
    assert set(capsys.readouterr()[0].strip()) <= set(summarize.CHARS)
    for text, match in [("the cat sleeps!", "got '!'"), ("the zebra sleeps.", "'zebra'"),
                        ("the cat sleeps. " * 10, "the input has 159 characters; this summarize model takes at most 150")]:
        assert main(["translate", "--ckpt", str(out), text]) == 2
        lines = capsys.readouterr()[1].splitlines()
        assert len(lines) == 1 and lines[0].startswith("npformer: error: ") and match in lines[0], lines
