"""The sentiment task: labels correct by construction, disjoint seeded splits, only characters of the
pretraining vocabulary, and labels that need word order (a bag of words is at chance)."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from npformer.data import CharTokenizer, ToyLanguage, default_corpus
from npformer.data import sentiment
from npformer.data.corpus import ADJECTIVES, ANIMATE, DETERMINERS
from npformer.data.sentiment import (MAX_CHARS, NEGATIVE, POSITIVE, bag_of_words, baseline_accuracy,
                                     final_bigram, label_of, sentiment_splits)

SMALL = dict(n_train=600, n_val=100, n_test=300)


@pytest.fixture(scope="module")
def splits():
    return sentiment_splits(**SMALL, seed=0)


def reference_label(text):
    """An independent reading of the label: polarity of the last clause after the word "but"."""
    words = text.rstrip(".").split()
    last = words[len(words) - 1 - words[::-1].index("but") + 1:]      # the words after the last "but"
    base = 1 if last[-1] in POSITIVE else 0 if last[-1] in NEGATIVE else None
    assert base is not None, text
    return base ^ (last[-2] == "not")


def clause_polarity(words):
    return (words[-1] in POSITIVE) ^ (words[-2] == "not")


def test_labels_correct_by_construction(splits):
    for texts, labels in splits.values():
        assert labels.dtype == np.int64 and set(labels.tolist()) <= {0, 1}
        for text, label in zip(texts, labels.tolist()):
            assert reference_label(text) == label == label_of(text), text
            first, second = text.rstrip(".").split(" but ")
            assert clause_polarity(first.split()) != clause_polarity(second.split())   # opposite clauses


def test_grammar_of_the_clauses(splits):
    """Each clause: determiner, at most one adjective, an animate noun, is/are agreeing, [not], predicate."""
    singular = {sg for sg, _ in ANIMATE}
    plural = {pl for _, pl in ANIMATE}
    dets = {d for group in DETERMINERS.values() for d in group}
    for text in splits["train"][0]:
        assert text[0].isupper() and text.endswith(".") and len(text) <= MAX_CHARS
        for words in (c.split() for c in text.rstrip(".").split(" but ")):
            assert words[0].lower() in dets
            noun_at = 2 if words[1] in ADJECTIVES else 1
            noun, verb = words[noun_at], words[noun_at + 1]
            assert (noun in singular and verb == "is") or (noun in plural and verb == "are"), words
            assert words[noun_at + 2:] in ([words[-1]], ["not", words[-1]])
            assert words[-1] in POSITIVE + NEGATIVE


def test_splits_are_seeded_disjoint_and_balanced(splits):
    again = sentiment_splits(**SMALL, seed=0)
    other = sentiment_splits(**SMALL, seed=1)
    assert all(again[k][0] == splits[k][0] and np.array_equal(again[k][1], splits[k][1]) for k in splits)
    assert other["train"][0] != splits["train"][0]
    sets = {k: set(v[0]) for k, v in splits.items()}
    assert [len(sets[k]) for k in ("train", "val", "test")] == [600, 100, 300]   # no repeats inside a split
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
    for _, labels in splits.values():
        assert 0.4 < labels.mean() < 0.6


def test_only_characters_of_the_pretraining_vocabulary():
    train, val = default_corpus()
    tok = CharTokenizer(train + val)
    texts = [t for texts, _ in sentiment_splits(seed=3).values() for t in texts]
    assert set("".join(texts)) <= set(tok.chars)
    assert tok.decode(tok.encode(" ".join(texts[:50]))) == " ".join(texts[:50])
    # and only words of the toy language, plus four function words
    toy = set(ToyLanguage(seed=0).vocabulary)
    used = {w for t in texts for w in t.lower().rstrip(".").split()}
    assert used - toy == set(sentiment.FUNCTION_WORDS)


def test_swapping_the_clauses_flips_the_label_and_keeps_the_bag(splits):
    for text, label in zip(*splits["test"]):
        first, second = text.rstrip(".").split(" but ")
        swapped = f"{second[0].upper()}{second[1:]} but {first[0].lower()}{first[1:]}."
        assert label_of(swapped) == 1 - label
        assert sorted(bag_of_words([swapped])[0]) == sorted(bag_of_words([text])[0])


def test_bag_of_words_is_at_chance_but_order_solves_it():
    s = sentiment_splits(n_train=2000, n_val=10, n_test=1000, seed=0)
    bow = baseline_accuracy(s, bag_of_words)
    ordered = baseline_accuracy(s, final_bigram)
    assert bow < 0.56                         # 1000 test examples: chance +- 0.016 (1 sd)
    assert ordered > 0.99
    assert baseline_accuracy(s, bag_of_words, split="train") < 0.6    # not even the training set


@settings(max_examples=20)
@given(seed=st.integers(0, 2**31 - 1))
def test_examples_from_any_seed(seed):
    text, label = sentiment.example(np.random.default_rng(seed))
    assert label_of(text) == reference_label(text) == label
    assert text.count(" but ") == 1 and text.endswith(".")


@pytest.mark.parametrize("kw", [dict(n_train=0), dict(n_val=-1), dict(n_test=2.5), dict(n_train=True)])
def test_bad_sizes(kw):
    with pytest.raises(ValueError, match="positive integer"):
        sentiment_splits(**kw)
