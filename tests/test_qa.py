"""The QA task: answers found again by parsing the text, unique, disjoint seeded splits, only characters
of the pretraining corpus, and SQuAD's metrics on hand-computed cases."""

import re

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from npformer.data import ToyLanguage, default_corpus
from npformer.data import qa
from npformer.data.corpus import ANIMATE, TRANSITIVE
from npformer.data.qa import (FUNCTION_WORDS, MAX_WORDS, answer_of, exact_match, f1_score, normalize_answer,
                              qa_splits, squad_metrics)

SMALL = dict(n_train=600, n_val=100, n_test=300)
KEYS = {"id", "question", "context", "answer_text", "answer_start"}


@pytest.fixture(scope="module")
def splits():
    return qa_splits(**SMALL, seed=0)


def all_examples(splits):
    return [ex for exs in splits.values() for ex in exs]


def test_checker_agrees_with_every_stored_answer(splits):
    for ex in all_examples(splits):
        assert set(ex) == KEYS
        text, start = ex["answer_text"], ex["answer_start"]
        assert ex["context"][start:start + len(text)] == text
        assert answer_of(ex["question"], ex["context"]) == (text, start), ex


def test_questions_match_exactly_one_sentence(splits):
    """An independent count of the sentences holding the question's key: the subject noun among a
    sentence's first three words ("what", "where"), or " verb object" with the verb in either form ("who")."""
    base = dict(TRANSITIVE)                                     # "follows" -> "follow"
    for ex in splits["test"]:
        sentences = [s.strip() for s in re.findall(r"[^.]+\.", ex["context"])]
        q = ex["question"].split()
        if q[0] == "who":
            obj = " ".join(q[2:])
            keys = [f" {v} {obj}{end}" for v in (q[1], base[q[1]]) for end in (" ", ".")]
            hits = [s for s in sentences if any(k in s for k in keys)]
            assert len(hits) == 1, ex
            assert hits[0].startswith(ex["answer_text"] + " ")
        else:
            hits = [s for s in sentences if q[3] in s.split()[:3]]
            assert len(hits) == 1, ex
            assert f" {ex['answer_text']}" in hits[0]


def test_passages_and_kinds(splits):
    kinds = {k: 0 for k in qa.KINDS}
    for ex in all_examples(splits):
        sentences = re.findall(r"[^.]+\.", ex["context"])
        assert qa.N_SENTENCES[0] <= len(sentences) <= qa.N_SENTENCES[1]
        nouns = [s.split()[2 if s.split()[1] in qa.ADJECTIVES else 1] for s in sentences]
        lemmas = [next(i for i, pair in enumerate(ANIMATE) if n in pair) for n in nouns]
        assert len(set(lemmas)) == len(lemmas)                       # distinct subjects
        assert len(ex["context"].split()) + len(ex["question"].split()) <= MAX_WORDS
        kinds[ex["question"].split()[0]] += 1
        if ex["question"].startswith("who"):
            assert ex["answer_text"][0].isupper()                    # the subject, as written
    assert all(n > 50 for n in kinds.values()), kinds


def test_hand_written_passage():
    passage = "The sad dog sees my cats behind a hill. Some kings follow a tall boat now. A fox likes the men."
    assert answer_of("what does the dog see", passage) == ("my cats", 17)
    assert answer_of("who follows a tall boat", passage) == ("Some kings", 40)
    assert answer_of("where does the dog see my cats", passage) == ("behind a hill", 25)
    assert answer_of("what do the kings follow", passage) == ("a tall boat", 58)
    for bad in ["what does the cat see",              # no such subject
                "what do the dog see",               # number disagrees
                "where does the fox like the men",   # no place in that sentence
                "who follows a boat",                # no such object
                "why does the dog see", "what does the dog"]:
        with pytest.raises(ValueError):
            answer_of(bad, passage)


def test_an_ambiguous_question_is_rejected():
    passage = "The dog sees my cats. A king sees my cats."
    with pytest.raises(ValueError, match="matches 2 sentences"):
        answer_of("who sees my cats", passage)


def test_splits_are_seeded_and_disjoint(splits):
    again = qa_splits(**SMALL, seed=0)
    assert again == splits
    assert qa_splits(**SMALL, seed=1)["train"] != splits["train"]
    assert [len(splits[k]) for k in ("train", "val", "test")] == [600, 100, 300]
    ids = [ex["id"] for ex in all_examples(splits)]
    assert len(set(ids)) == len(ids) and splits["val"][7]["id"] == "val-07"
    contexts = {k: {ex["context"] for ex in v} for k, v in splits.items()}
    pairs = {k: {(ex["question"], ex["context"]) for ex in v} for k, v in splits.items()}
    assert [len(contexts[k]) for k in ("train", "val", "test")] == [600, 100, 300]
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not contexts[a] & contexts[b] and not pairs[a] & pairs[b]


def test_only_characters_and_words_of_the_toy_language():
    train, val = default_corpus()
    texts = [t for ex in all_examples(qa_splits(seed=3)) for t in (ex["question"], ex["context"])]
    assert set("".join(texts)) <= set(train + val)
    used = {w for t in texts for w in t.lower().replace(".", " ").split()}
    assert used - set(ToyLanguage(seed=0).vocabulary) == set(FUNCTION_WORDS)


@settings(max_examples=20)
@given(seed=st.integers(0, 2**31 - 1))
def test_examples_from_any_seed(seed):
    ex = qa.example(np.random.default_rng(seed))
    assert answer_of(ex["question"], ex["context"]) == (ex["answer_text"], ex["answer_start"])


@pytest.mark.parametrize("kw", [dict(n_train=0), dict(n_val=-1), dict(n_test=2.5), dict(n_train=True)])
def test_bad_sizes(kw):
    with pytest.raises(ValueError, match="positive integer"):
        qa_splits(**kw)


# ----------------------------------------------------------------------------- SQuAD metrics

@pytest.mark.parametrize("text, normal", [
    ("The  Sad, cats!", "sad cats"), ("an apple a day", "apple day"), ("theater thea", "theater thea"),
    ("A", ""), ("  my\tdog. ", "my dog"), ("Dog's", "dogs")])
def test_normalize_answer(text, normal):
    assert normalize_answer(text) == normal


@pytest.mark.parametrize("pred, truth, f1", [
    ("my sad cats", "the sad cats", 0.8),      # P = 2/3, R = 1
    ("cats", "sad cats", 2 / 3),              # P = 1, R = 1/2
    ("cats cats", "cats", 2 / 3),             # multiset: 1 common token, P = 1/2
    ("my dog", "the cat", 0.0),
    ("", "", 1.0), ("the", "a", 1.0),          # both empty once normalised
    ("dog", "", 0.0), ("", "dog", 0.0),
    ("The Dog.", "dog", 1.0)])
def test_f1_score(pred, truth, f1):
    assert f1_score(pred, truth) == pytest.approx(f1, abs=1e-12)


def test_exact_match():
    assert exact_match("The Dog.", "dog") == 1.0
    assert exact_match("my dog", "dog") == 0.0
    assert exact_match("", "an") == 1.0


def test_squad_metrics():
    m = squad_metrics(["my sad cats", "dog", "a boat"], ["the sad cats", ["cat", "dog"], "the boat"])
    assert m["exact_match"] == pytest.approx(200 / 3)
    assert m["f1"] == pytest.approx(100 * (0.8 + 1 + 1) / 3)
    for preds, truths in (([], []), (["a"], ["a", "b"])):
        with pytest.raises(ValueError, match="as many predictions"):
            squad_metrics(preds, truths)


def test_the_held_out_splits_do_not_depend_on_the_training_size():
    small, large = qa_splits(n_train=50, n_val=20, n_test=30, seed=4), qa_splits(n_train=200, n_val=20, n_test=30, seed=4)
    assert small["test"] == large["test"] and small["val"] == large["val"]
    assert [e["context"] for e in large["train"][:50]] == [e["context"] for e in small["train"]]
    assert len(large["train"]) == 200 and large["train"][0]["id"] == "train-000"
