"""Toy seq2seq tasks: the source -> target maps, disjoint train/test splits, vocabularies with
JSON save/load through load_tokenizer, and padded batches."""

import datetime
import hashlib
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npformer.data import load_tokenizer
from npformer.data.summarize import summary_of
from npformer.data.tasks import (BOS, EOS, PAD, TASKS, CopyTask, DatesTask, NumbersTask, ReverseTask,
                                 TaskTokenizer, Vocab, get_task, make_batch, number_to_words, split_bucket)

# ----------------------------------------------------------------------------- numbers in words

_SMALL = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve "
                                     "thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split())}
_TENS = {w: 10 * (i + 2) for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())}


def words_to_number(text: str) -> int:
    """An independent parser of the words back to the integer (the inverse map)."""
    total, group = 0, 0
    for w in text.split(" "):
        if w in _SMALL:
            group += _SMALL[w]
        elif w in _TENS:
            group += _TENS[w]
        elif w == "hundred":
            group *= 100
        elif w == "thousand":
            total, group = group * 1000, 0
        else:
            raise AssertionError(f"unexpected word {w!r}")
    return total + group


@pytest.mark.parametrize("n,words", [
    (0, "zero"), (7, "seven"), (13, "thirteen"), (20, "twenty"), (21, "twenty one"), (100, "one hundred"),
    (105, "one hundred five"), (1000, "one thousand"), (1205, "one thousand two hundred five"),
    (20017, "twenty thousand seventeen"), (100000, "one hundred thousand"),
    (999999, "nine hundred ninety nine thousand nine hundred ninety nine")])
def test_number_to_words_examples(n, words):
    assert number_to_words(n) == words


@given(st.integers(0, 999999))
def test_number_to_words_inverts(n):
    words = number_to_words(n)
    assert words_to_number(words) == n
    assert "  " not in words and words == words.strip() and len(words) <= NumbersTask.max_tgt_len


def test_number_to_words_range_and_longest():
    for bad in (-1, 1000000):
        with pytest.raises(ValueError, match="outside 0 .. 999999"):
            number_to_words(bad)
    assert len(number_to_words(777777)) == NumbersTask.max_tgt_len == 64


# ----------------------------------------------------------------------------- tasks and splits

@pytest.mark.parametrize("name", list(TASKS))
def test_samples_follow_the_task_and_fit_its_vocabulary(name):
    task = get_task(name)
    rng = np.random.default_rng(0)
    for src, tgt in task.batch(rng, 300) + task.test_set(100, seed=1):
        assert 1 <= len(src) <= task.max_src_len and 1 <= len(tgt) <= task.max_tgt_len
        assert set(src) <= set(task.src_chars) and set(tgt) <= set(task.tgt_chars)
        if name == "copy":
            assert tgt == src
        elif name == "reverse":
            assert tgt == src[::-1]
        elif name == "numbers":
            assert words_to_number(tgt) == int(src) and str(int(src)) == src       # no leading zeros
        elif name == "summarize":
            assert tgt == summary_of(src)           # the checker (tests/test_summarize.py checks it further)
        else:
            assert name == "dates", f"no check for the task {name!r}"
            d = datetime.date.fromisoformat(src)
            day, month, year = tgt.split(" ")
            assert (int(day), int(year), month) == (d.day, d.year, d.strftime("%B").lower())
            assert 1900 <= d.year <= 2099 and not day.startswith("0")


@pytest.mark.parametrize("name", list(TASKS))
def test_train_and_test_share_no_example(name):
    task = get_task(name)
    n_test, n_train = (100, 500) if name == "summarize" else (300, 3000)   # long documents (test_summarize: 4,000)
    test = task.test_set(n_test, seed=5)
    train = task.batch(np.random.default_rng(6), n_train, "train")
    test_src = {s for s, _ in test}
    assert len(test_src) == len(test) == n_test                                # distinct sources
    assert not test_src & {s for s, _ in train}
    assert all(split_bucket(s) < task.test_percent for s in test_src)
    assert all(split_bucket(s) >= task.test_percent for s, _ in train)
    assert task.test_set(n_test, seed=5) == test and task.test_set(n_test, seed=7) != test     # seeded


def test_split_is_a_stable_hash_and_covers_about_the_test_share():
    """The split depends on the text only (BLAKE2b, not Python's per-process salted hash())."""
    for s in ("1205", "abc", "2026-11-29", ""):
        digest = hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest()
        assert split_bucket(s) == int.from_bytes(digest, "little") % 100
    share = np.mean([NumbersTask().split_of(str(n)) == "test" for n in range(20000)])
    assert 0.08 < share < 0.12                                                  # TEST_PERCENT = 10


def test_numbers_draw_every_digit_count_and_copy_every_length():
    rng = np.random.default_rng(0)
    assert {len(NumbersTask().draw(rng)) for _ in range(300)} == set(range(1, 7))
    assert {len(s) for s, _ in CopyTask(max_len=4).batch(rng, 200)} == {1, 2, 3, 4}
    assert ReverseTask().name == "reverse" and DatesTask().max_tgt_len == len("30 september 2026")


def test_bad_task_settings():
    with pytest.raises(ValueError, match="unknown task 'sort'; choose one of copy, reverse, numbers, dates"):
        get_task("sort")
    with pytest.raises(ValueError, match="max_len must be >= 1"):
        CopyTask(max_len=0)
    with pytest.raises(ValueError, match="test_percent"):
        NumbersTask(test_percent=0)
    with pytest.raises(ValueError, match="split must be"):
        CopyTask().sample(np.random.default_rng(0), "val")


# ----------------------------------------------------------------------------- vocabularies

def test_vocab_encode_decode_and_specials():
    v = Vocab(" abc")
    ids = v.encode("cab a")
    assert ids.dtype == np.int64 and ids.tolist() == [6, 4, 5, 3, 4] and v.size == 7
    assert v.decode([BOS, *ids.tolist(), EOS, 5, PAD]) == "cab a"             # stops at EOS, skips BOS/PAD
    assert v.decode(np.array([PAD, 4, PAD, 5])) == "ab"
    with pytest.raises(ValueError, match=r"2 character\(s\) outside the vocabulary ' abc': 'x', 'z'"):
        v.encode("azx")
    with pytest.raises(ValueError, match="token id 7 is outside the vocabulary of 7"):
        v.decode([3, 7])
    with pytest.raises(ValueError, match="sorted and distinct"):
        Vocab("ba")


@pytest.mark.parametrize("name", list(TASKS))
def test_tokenizer_round_trips_through_json_and_load_tokenizer(name, tmp_path):
    task = get_task(name)
    tok = TaskTokenizer.for_task(task)
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    obj = json.loads(path.read_text())
    assert obj["type"] == "seq2seq_task" and obj["version"] == 1 and obj["task"] == name
    back = load_tokenizer(path)
    assert isinstance(back, TaskTokenizer) and back == tok
    src, tgt = task.sample(np.random.default_rng(3))
    assert back.tgt.decode(back.encode_target(tgt)) == tgt and back.src.decode(back.encode(src)) == src
    assert (back.src_vocab_size, back.tgt_vocab_size) == (len(task.src_chars) + 3, len(task.tgt_chars) + 3)


def test_tokenizer_load_rejects_bad_files(tmp_path):
    path = tmp_path / "tok.json"
    good = {"type": "seq2seq_task", "version": 1, "task": "copy", "src_chars": "ab", "tgt_chars": "ab"}
    for bad, match in [({**good, "version": 2}, "version 2 is not supported"),
                       ({**good, "src_chars": 5}, "must be strings"),
                       ({**good, "tgt_chars": "ba"}, "sorted and distinct")]:
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            load_tokenizer(path)
    path.write_text('{"type": "seq2seq_task", "vers')
    with pytest.raises(ValueError, match="invalid JSON"):
        TaskTokenizer.load(path)


# ----------------------------------------------------------------------------- batches

@settings(max_examples=10)
@given(st.integers(0, 10_000), st.integers(1, 6))
def test_make_batch_pads_and_places_bos_eos(seed, B):
    task = NumbersTask()
    tok = TaskTokenizer.for_task(task)
    pairs = task.batch(np.random.default_rng(seed), B)
    src, tgt_in, tgt_out = make_batch(tok, pairs)
    assert src.shape == (B, max(len(s) for s, _ in pairs))
    assert tgt_in.shape == tgt_out.shape == (B, max(len(t) for _, t in pairs) + 1)
    for b, (s, t) in enumerate(pairs):
        n = len(t)
        assert tok.src.decode(src[b]) == s and (src[b, len(s):] == PAD).all()
        assert tgt_in[b, 0] == BOS and tok.decode(tgt_in[b]) == t and (tgt_in[b, n + 1:] == PAD).all()
        assert tgt_out[b, n] == EOS and tok.decode(tgt_out[b]) == t and (tgt_out[b, n + 1:] == PAD).all()
        np.testing.assert_array_equal(tgt_in[b, 1:n + 1], tgt_out[b, :n])      # teacher forcing shift
