"""WordPiece training: the vocabulary's layout, the likelihood criterion against a brute-force re-count at
every step, determinism, min_frequency and early stop, options and errors, and speed on tiny Shakespeare."""

import math
import random
import time
from collections import Counter

import numpy as np
import pytest

from npformer.data import WordPieceTokenizer
from npformer.data.corpus import ToyLanguage
from npformer.data.wordpiece_train import count_words
from tests.helpers import shared_data_path

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def made_up_words(n, seed=0):
    """n words of 1-4 syllables, each drawn from 400 made-up words with Zipf weights."""
    rng = np.random.default_rng(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in ["a", "e", "i", "o", "u", "ai", "ou"]]
    lexicon = ["".join(rng.choice(syllables, size=rng.integers(1, 5))) for _ in range(400)]
    weights = 1.0 / np.arange(1, 401)
    return " ".join(rng.choice(lexicon, size=n, p=weights / weights.sum()))


TEXT = (ToyLanguage(seed=0).generate(3_000, seed=5) + "\n" + made_up_words(1500) + "\n"
        + " Café, naïve Ångström! 中国人 un-affable [MASK] x" + "y" * 120 + " ΟΔΟΣ\n")


def xlogx(x):
    return x * math.log(x) if x > 0 else 0.0


def reference_train(words: Counter, vocab_size: int, min_frequency: int) -> list:
    """The same method, re-counting every unit and pair from scratch at every step."""
    alphabet = sorted(set("".join(words)))
    vocab = SPECIALS + alphabet + ["##" + c for c in alphabet]
    splits = {w: [w[0]] + ["##" + c for c in w[1:]] for w in words}
    while len(vocab) < vocab_size:
        units, pairs = Counter(), Counter()
        for w, f in words.items():
            for u in splits[w]:
                units[u] += f
            for p in zip(splits[w], splits[w][1:]):
                pairs[p] += f
        total = sum(units.values())

        def gain(p):
            n, (a, b) = pairs[p], p
            parts = (xlogx(units[a] - 2 * n) - xlogx(units[a]) if a == b else
                     xlogx(units[a] - n) - xlogx(units[a]) + xlogx(units[b] - n) - xlogx(units[b]))
            return xlogx(n) + parts - xlogx(total - n) + xlogx(total)

        candidates = [p for p in pairs if pairs[p] >= min_frequency]
        if not candidates:
            break
        a, b = min(candidates, key=lambda p: (-gain(p), p))
        if a + b[2:] not in vocab:
            vocab.append(a + b[2:])
        for w, s in splits.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == (a, b):
                    out.append(a + b[2:])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            splits[w] = out
    return vocab


@pytest.fixture(scope="module")
def trained():
    return WordPieceTokenizer.train(TEXT, 300)


@pytest.mark.parametrize("min_frequency", [1, 2, 3])
def test_training_equals_a_brute_force_recount(min_frequency):
    words = count_words(WordPieceTokenizer(SPECIALS), [TEXT])
    vocab = WordPieceTokenizer.train(TEXT, 260, min_frequency=min_frequency).vocab_tokens
    assert len(vocab) == 260 and vocab == reference_train(words, 260, min_frequency)


def test_vocabulary_layout(trained):
    vocab = trained.vocab_tokens
    words = count_words(trained, [TEXT])
    alphabet = sorted(set("".join(words)))
    n = len(alphabet)
    assert len(vocab) == 300 == len(set(vocab))
    assert vocab[:5] == SPECIALS
    assert vocab[5:5 + n] == alphabet and vocab[5 + n:5 + 2 * n] == ["##" + c for c in alphabet]
    assert "中" in alphabet and "ς" in alphabet and "A" not in alphabet and "é" not in alphabet
    assert all(len(t.removeprefix("##")) >= 2 for t in vocab[5 + 2 * n:])       # then merges only
    assert "[MASK]" not in words and "x" + "y" * 120 not in words                # special, too long
    for word in words:                                                          # every word encodes
        assert "[UNK]" not in trained.tokenize(word)
    assert trained.tokenize("x" + "y" * 120) == ["[UNK]"]


def test_likelihood_not_the_bare_score_picks_the_merge():
    # a, ##b occur only in "ab" (10 times), x, ##y only in "xy" (once): count(ab) / (count(a) count(b)) is
    # 0.1 for ab and 1 for xy, but merging ab raises the likelihood by ~17.9 nats and xy by ~4.1
    tok = WordPieceTokenizer.train(["ab " * 10 + "xy"], len(SPECIALS) + 8 + 1, min_frequency=1)
    assert tok.vocab_tokens[-1] == "ab"


def test_training_is_deterministic_and_order_free():
    lines = TEXT.split("\n")
    shuffled = lines[:]
    random.Random(0).shuffle(shuffled)
    a = WordPieceTokenizer.train(lines, 280)
    assert a == WordPieceTokenizer.train(lines, 280) == WordPieceTokenizer.train(shuffled, 280)
    assert a == WordPieceTokenizer.train(TEXT, 280) == WordPieceTokenizer.train(iter(lines), 280)


def test_min_frequency_and_early_stop():
    tok = WordPieceTokenizer.train("ab ab cd", 1000)             # only "ab" occurs twice
    assert tok.vocab_tokens[5:] == ["a", "b", "c", "d", "##a", "##b", "##c", "##d", "ab"]
    tok = WordPieceTokenizer.train("cd ab ab cd", 1000, min_frequency=1)
    assert tok.vocab_tokens[-2:] == ["ab", "cd"]                    # equal gains: the smaller pair first
    tok = WordPieceTokenizer.train("##s ss sss ssss", 1000, min_frequency=1)   # pairs of a unit with itself
    assert tok.tokenize("ssss sss") == ["ssss", "sss"] and "[UNK]" not in tok.tokenize("#s")
    assert WordPieceTokenizer.train("", 5).vocab_tokens == SPECIALS


def test_training_options_reach_the_tokenizer():
    tok = WordPieceTokenizer.train(TEXT, 260, do_lower_case=False, model_max_length=32, unk_token="<unk>")
    assert not tok.do_lower_case and tok.model_max_length == 32
    assert "A" in tok.vocab and "Ω" not in tok.vocab and "Σ" in tok.vocab and tok.vocab_tokens[1] == "<unk>"
    assert tok.tokenize("Ångström") == ["Å", "##n", "##g", "##s", "##t", "##r", "##ö", "##m"]
    tok = WordPieceTokenizer.train("hello hello hello world", 20, never_split=["hello"], min_frequency=1)
    assert not any("h" in t for t in tok.vocab_tokens) and tok.tokenize("hello") == ["hello"]


def test_training_errors():
    with pytest.raises(ValueError, match=r"vocab_size must be an int >= 13 \(the 5 special tokens and 4 "
                                         r"characters seen, each also as ##c\), got 12"):
        WordPieceTokenizer.train("ab cd", 12)
    with pytest.raises(ValueError, match="min_frequency must be an int >= 1"):
        WordPieceTokenizer.train("ab", 100, min_frequency=0)
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str, got bytes"):
        WordPieceTokenizer.train(["ab", b"cd"], 100)
    with pytest.raises(TypeError, match="do_lower_case must be True or False"):
        WordPieceTokenizer.train("ab", 100, do_lower_case=None)


def test_trains_on_all_of_tiny_shakespeare_in_seconds():
    text = open(shared_data_path(), encoding="utf-8").read()            # ~1.1 MB
    t0 = time.perf_counter()
    tok = WordPieceTokenizer.train(text, 3000)
    elapsed = time.perf_counter() - t0
    assert tok.vocab_size == 3000 and elapsed < 15.0, f"training took {elapsed:.1f} s"
    lines = text.split("\n")[:2000]
    tokens = [t for line in lines for t in tok.tokenize(line)]
    words = [w for line in lines for w in tok.basic.tokenize(line)]
    assert "[UNK]" not in tokens and len(tokens) < 1.2 * len(words), len(tokens) / len(words)
    assert tok.tokenize("Before we proceed any further, hear me speak.") == \
        ["before", "we", "proceed", "any", "further", ",", "hear", "me", "speak", "."]
    ids = np.concatenate([tok.encode(line, add_special_tokens=False)["input_ids"] for line in lines[:50]])
    assert tok.decode(ids) == tok.convert_tokens_to_string(tok.convert_ids_to_tokens(ids)).replace(" ,", ",") \
        .replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ' ", "'").replace(" 's", "'s") \
        .replace(" n't", "n't").replace(" 'm", "'m").replace(" 've", "'ve").replace(" 're", "'re")
