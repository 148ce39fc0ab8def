"""Tokenizers: exact round trips, unknown characters, save/load, BPE training and determinism."""

import json
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from npformer.data.corpus import ToyLanguage
from npformer.data.tokenizers import DEFAULT_PATTERN, ByteBPETokenizer, CharTokenizer, load_tokenizer
from tests.helpers import shared_data_path

TRAIN_TEXT = ToyLanguage(seed=0).generate(20_000, seed=3) + " naïve café, 東京 😀 x_y 123 "


@pytest.fixture(scope="module")
def bpe():
    return ByteBPETokenizer().train(TRAIN_TEXT, 320)


# ----------------------------------------------------------------------------- CharTokenizer

@given(st.text(min_size=1), st.data())
def test_char_round_trip_on_its_alphabet(alphabet, data):
    tok = CharTokenizer(alphabet)
    assert tok.chars == sorted(set(alphabet)) and tok.vocab_size == len(set(alphabet))
    s = data.draw(st.text(alphabet=st.sampled_from(tok.chars)))
    ids = tok.encode(s)
    assert ids.dtype == np.int64 and ids.shape == (len(s),)
    assert ((ids >= 0) & (ids < tok.vocab_size)).all()
    assert [tok.chars[i] for i in ids] == list(s)
    assert tok.decode(ids) == s


def test_char_ids_follow_sorted_vocabulary():
    tok = CharTokenizer("hello world")
    assert tok.chars == [" ", "d", "e", "h", "l", "o", "r", "w"]
    np.testing.assert_array_equal(tok.encode("low"), [4, 5, 7])
    assert tok.decode([3, 2, 4, 4, 5]) == "hello"


def test_char_unknown_characters_are_listed():
    tok = CharTokenizer("abc")
    with pytest.raises(ValueError, match=r"'x'.*'z'|'z'.*'x'") as err:
        tok.encode("abxcz")
    assert "2 character(s)" in str(err.value)
    with pytest.raises(ValueError, match="and 5 more"):
        tok.encode("defghijklmnopqr")                        # 15 unknown: 10 shown, 5 counted
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([0, 3])


def test_char_save_load_round_trip(tmp_path):
    tok = CharTokenizer("Hello, wörld! 😀\n")
    path = tmp_path / "char.json"
    tok.save(path)
    obj = json.loads(path.read_text())
    assert obj["type"] == "char" and obj["version"] == 1
    again = CharTokenizer.load(path)
    assert again == tok and load_tokenizer(path) == tok
    assert again != CharTokenizer("abc")
    np.testing.assert_array_equal(again.encode("wörld 😀"), tok.encode("wörld 😀"))


# ----------------------------------------------------------------------------- ByteBPETokenizer

@given(st.text())
def test_bpe_round_trip_any_text(bpe, s):
    ids = bpe.encode(s)
    assert ids.dtype == np.int64 and ids.ndim == 1
    assert ((ids >= 0) & (ids < bpe.vocab_size)).all()
    assert bpe.decode(ids) == s


@given(st.text())
def test_bpe_chunks_cover_the_text(bpe, s):
    assert "".join(bpe._chunks(s)) == s


def test_bpe_round_trip_unseen_text_and_emoji(bpe):
    for s in ["", "Zebra-crossing: 42 µs!", "👩‍👩‍👧 family 🇫🇷 flag", "\t\r\n  \u2028", "\x00\xff"]:
        assert bpe.decode(bpe.encode(s)) == s
    untrained = ByteBPETokenizer()
    assert untrained.vocab_size == 256
    np.testing.assert_array_equal(untrained.encode("é"), list("é".encode("utf-8")))


def test_bpe_compresses_and_uses_merges(bpe):
    assert bpe.vocab_size == 320 and len(bpe.merges) == 64
    ids = bpe.encode(TRAIN_TEXT)
    assert len(ids) < 0.6 * len(TRAIN_TEXT.encode("utf-8"))
    for m, (a, b) in enumerate(bpe.merges):                 # each merge joins two earlier ids
        assert a < 256 + m and b < 256 + m
        assert bpe.vocab[256 + m] == bpe.vocab[a] + bpe.vocab[b]


def test_bpe_first_merge_is_most_frequent_pair_smallest_on_ties():
    # pairs in "abab cd": (a,b) x2, (b,a) x1, (' ',c) x1, (c,d) x1 -> first merge (a, b)
    tok = ByteBPETokenizer().train("abab cd", 258)
    assert tok.merges[0] == (ord("a"), ord("b"))
    # after it: (ab, ab) x1, (' ', c) x1, (c, d) x1: a tie, broken by the smallest pair (32, 99)
    assert tok.merges[1] == (ord(" "), ord("c"))
    # no pairs left: training stops early
    assert ByteBPETokenizer().train("ab", 300).merges == [(ord("a"), ord("b"))]


def test_bpe_training_is_deterministic_and_incremental_counts_are_exact():
    text = TRAIN_TEXT[:5000]
    a = ByteBPETokenizer().train(text, 300)
    b = ByteBPETokenizer().train(text, 300)
    assert a == b and a.merges == b.merges
    # reference: recount every pair from scratch before each merge (the slow, obvious way)
    words = [list(c.encode("utf-8")) for c in a._chunks(text)]
    for m, merged in enumerate(a.merges[:20]):
        counts = {}
        for w in words:
            for p in zip(w, w[1:]):
                counts[p] = counts.get(p, 0) + 1
        best = max(counts, key=lambda p: (counts[p], -p[0], -p[1]))
        assert merged == best, f"merge {m}"
        new, out = 256 + m, []
        for w in words:
            i, r = 0, []
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    r.append(new)
                    i += 2
                else:
                    r.append(w[i])
                    i += 1
            out.append(r)
        words = out


def test_bpe_save_load_round_trip(bpe, tmp_path):
    path = tmp_path / "bpe.json"
    bpe.save(path)
    obj = json.loads(path.read_text())
    assert obj["type"] == "byte_bpe" and obj["version"] == 1 and obj["pattern"] == DEFAULT_PATTERN
    again = load_tokenizer(path)
    assert isinstance(again, ByteBPETokenizer) and again == bpe and again.vocab_size == 320
    s = "The sad king 😀 likes café."
    np.testing.assert_array_equal(again.encode(s), bpe.encode(s))
    assert bpe != ByteBPETokenizer()


@pytest.mark.parametrize("content, message", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "JSON object with a 'type'"),
    ('{"type": "char", "version": 1, "chars": ["a"]}', "holds a 'char' tokenizer, not 'byte_bpe'"),
    ('{"type": "byte_bpe", "version": 7, "pattern": " ", "merges": []}', "version 7 is not supported"),
    ('{"type": "byte_bpe", "version": 1, "pattern": " ", "merges": [[1, 300]]}', "merge 0 is"),
    ('{"type": "byte_bpe", "version": 1, "pattern": "(", "merges": []}', "not a valid regular"),
    ('{"type": "byte_bpe", "version": 1, "pattern": " ", "merges": [[1, 2], [1, 2]]}', "repeated"),
    ('{"type": "byte_bpe", "version": 1, "pattern": " "}', "'merges' must be a list"),
])
def test_bpe_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        ByteBPETokenizer.load(path)


@pytest.mark.parametrize("content, message", [
    ('{"type": "sentencepiece", "version": 1}', "unknown tokenizer type 'sentencepiece'"),
    ('{"type": "char", "version": 2, "chars": ["a"]}', "version 2 is not supported"),
    ('{"type": "char", "version": 1, "chars": ["b", "a"]}', "sorted"),
    ('{"type": "char", "version": 1, "chars": ["ab"]}', "single characters"),
    ('{"version": 1}', "'type' field"),
])
def test_load_tokenizer_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_tokenizer(path)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing.json")


def test_bpe_trains_on_all_of_shakespeare_to_512_well_under_a_minute():
    text = open(shared_data_path(), encoding="utf-8").read()          # ~1.1 MB
    t0 = time.perf_counter()
    tok = ByteBPETokenizer().train(text, 512)
    elapsed = time.perf_counter() - t0
    assert tok.vocab_size == 512 and elapsed < 20.0, f"training took {elapsed:.1f} s"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < 0.55 * len(text.encode("utf-8"))
