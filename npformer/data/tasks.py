"""Toy sequence-to-sequence tasks, their character vocabularies, and padded batches.

    copy      "cabj"        -> "cabj"          random symbols a..j, length 1..max_len (The Annotated
    reverse   "cabj"        -> "jbac"          Transformer's copy task; reverse reads it backwards)
    numbers   "1205"        -> "one thousand two hundred five"     integers 0 .. 999999
    dates     "2026-11-29"  -> "29 november 2026"                  days of the years 1900 .. 2099
    summarize "a dog waits. my big dog sees a cat. the fox runs."  -> "the dog waits. the dog sees a cat."
              the sentences about the most frequent subject, each subject "the NOUN" (data/summarize.py)

Every task is a deterministic function source -> target, so a split needs only the sources: a
source belongs to the test split when a hash of its text falls in the lowest `test_percent`
buckets of 100 (BLAKE2b, stable across runs and machines). Train and test therefore never share
an example, whatever the seeds, and the test set measures generalisation to unseen inputs.

Task.parse_source reads a user's input in the form the task draws its sources, the only form a
model has seen: numbers drop leading zeros ("000012" -> "12"), dates pad month and day
("2026-1-5" -> "2026-01-05"); an input outside the task's range is a ValueError saying so.

Token ids (both vocabularies): 0 = PAD, 1 = BOS, 2 = EOS, 3 + i = the i-th character of the sorted
alphabet. Sources are characters only; targets are BOS y_1 .. y_n (decoder input) and
y_1 .. y_n EOS (decoder output).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re

import numpy as np

from . import summarize
from .tokenizers import FORMAT_VERSION, TOKENIZERS, _read_json

PAD, BOS, EOS = 0, 1, 2
N_SPECIAL = 3
TEST_PERCENT = 10

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = ("_ _ twenty thirty forty fifty sixty seventy eighty ninety").split()
_MONTHS = ("january february march april may june july august september october november "
           "december").split()


def number_to_words(n: int) -> str:
    """English words for 0 <= n <= 999999, without "and" or hyphens: 1205 -> "one thousand two hundred five"."""
    if not 0 <= n <= 999999:
        raise ValueError(f"number_to_words: {n} is outside 0 .. 999999")
    if n == 0:
        return "zero"

    def below_1000(m):                     # 1 <= m <= 999
        words = []
        if m >= 100:
            words += [_ONES[m // 100], "hundred"]
            m %= 100
        if m >= 20:
            words.append(_TENS[m // 10])
            m %= 10
        if m:
            words.append(_ONES[m])
        return words

    thousands, rest = divmod(n, 1000)
    words = (below_1000(thousands) + ["thousand"] if thousands else []) + (below_1000(rest) if rest else [])
    return " ".join(words)


def split_bucket(src: str) -> int:
    """A stable hash of the source text in 0 .. 99 (the split key)."""
    return int.from_bytes(hashlib.blake2b(src.encode("utf-8"), digest_size=8).digest(), "little") % 100


# ----------------------------------------------------------------------------- tasks

class Task:
    """A source generator and the deterministic map source -> target.

    Subclasses set name, src_chars, tgt_chars, max_src_len, max_tgt_len (characters) and define
    draw(rng) -> source text and target(src) -> target text; a task whose generator also makes the
    target overrides draw_pair(rng) -> (source, target).
    """
    name = src_chars = tgt_chars = ""
    max_src_len = max_tgt_len = 0

    def __init__(self, test_percent: int = TEST_PERCENT):
        if not 0 < test_percent < 100:
            raise ValueError(f"test_percent must be in 1 .. 99; got {test_percent}")
        self.test_percent = test_percent

    def draw(self, rng) -> str:
        raise NotImplementedError

    def target(self, src: str) -> str:
        raise NotImplementedError

    def parse_source(self, text: str) -> str:
        """text written as draw() writes sources; ValueError naming the expected form if it cannot be.

        The base class returns text as it is (the tokenizer checks its characters, the model its length).
        """
        return text

    def draw_pair(self, rng) -> tuple:
        """One (source, target) pair drawn with rng, of either split."""
        src = self.draw(rng)
        return src, self.target(src)

    def split_of(self, src: str) -> str:
        return "test" if split_bucket(src) < self.test_percent else "train"

    def sample(self, rng, split: str = "train") -> tuple:
        """One (source, target) pair of `split`, drawn with the NumPy generator rng (rejection)."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
        while True:
            src, tgt = self.draw_pair(rng)
            if self.split_of(src) == split:
                return src, tgt

    def batch(self, rng, n: int, split: str = "train") -> list:
        return [self.sample(rng, split) for _ in range(n)]

    def test_set(self, n: int, seed: int = 0) -> list:
        """n (source, target) pairs of the test split with distinct sources, the same for a given seed."""
        rng = np.random.default_rng(seed)
        seen, pairs = set(), []
        for _ in range(50 * n):                # gives up (returns fewer) only for a tiny test split
            src, tgt = self.sample(rng, "test")
            if src not in seen:
                seen.add(src)
                pairs.append((src, tgt))
                if len(pairs) == n:
                    break
        return pairs

    def __repr__(self):
        return f"{type(self).__name__}(max_src_len={self.max_src_len}, max_tgt_len={self.max_tgt_len})"


class CopyTask(Task):
    """Random strings over the symbols a..j, lengths uniform in 1 .. max_len; target = source."""
    name = "copy"
    src_chars = tgt_chars = "abcdefghij"

    def __init__(self, max_len: int = 10, test_percent: int = TEST_PERCENT):
        super().__init__(test_percent)
        if max_len < 1:
            raise ValueError(f"{self.name}: max_len must be >= 1; got {max_len}")
        self.max_src_len = self.max_tgt_len = max_len

    def draw(self, rng) -> str:
        n = int(rng.integers(1, self.max_src_len + 1))
        return "".join(self.src_chars[i] for i in rng.integers(0, len(self.src_chars), n))

    def target(self, src: str) -> str:
        return src


class ReverseTask(CopyTask):
    """As copy, but the target is the source read backwards."""
    name = "reverse"

    def target(self, src: str) -> str:
        return src[::-1]


class NumbersTask(Task):
    """Integers 0 .. 999999 in digits -> English words. The digit count is uniform in 1..6, then the
    number uniform among those with that many digits, so short numbers are not vanishingly rare."""
    name = "numbers"
    src_chars = "0123456789"
    tgt_chars = " abcdefghijklmnopqrstuvwxyz"
    max_src_len = 6
    # the longest: the longest "1..999" phrase twice, joined by " thousand "
    max_tgt_len = 2 * max(len(number_to_words(m)) for m in range(1, 1000)) + len(" thousand ")

    def draw(self, rng) -> str:
        digits = int(rng.integers(1, 7))
        low = 0 if digits == 1 else 10 ** (digits - 1)
        return str(int(rng.integers(low, 10 ** digits)))

    def target(self, src: str) -> str:
        return number_to_words(int(src))

    def parse_source(self, text: str) -> str:
        """Digits of an integer 0 .. 999999; leading zeros are read as the number: "000012" -> "12"."""
        if not text or not set(text) <= set(self.src_chars):
            raise ValueError(f"numbers: the input must be an integer 0 .. 999999 in digits; got {text!r}")
        digits = text.lstrip("0") or "0"
        if len(digits) > self.max_src_len:
            raise ValueError(f"numbers: {digits} is outside 0 .. 999999")
        return digits


class DatesTask(Task):
    """ISO dates "YYYY-MM-DD" of 1900 .. 2099 -> "D monthname YYYY" (day without a leading zero)."""
    name = "dates"
    src_chars = "-0123456789"
    tgt_chars = " 0123456789abcdefghijklmnopqrstuvwxyz"
    max_src_len = 10
    max_tgt_len = 2 + 1 + max(len(m) for m in _MONTHS) + 1 + 4
    first, last = datetime.date(1900, 1, 1).toordinal(), datetime.date(2099, 12, 31).toordinal()

    def draw(self, rng) -> str:
        return datetime.date.fromordinal(int(rng.integers(self.first, self.last + 1))).isoformat()

    def target(self, src: str) -> str:
        d = datetime.date.fromisoformat(src)
        return f"{d.day} {_MONTHS[d.month - 1]} {d.year}"

    def parse_source(self, text: str) -> str:
        """A date YYYY-MM-DD of 1900 .. 2099, month and day with or without a leading zero:
        "2026-1-5" -> "2026-01-05"."""
        m = re.fullmatch(r"([0-9]{4})-([0-9]{1,2})-([0-9]{1,2})", text)
        if m is None:
            raise ValueError(f"dates: the input must be a date YYYY-MM-DD, e.g. 2026-01-05; got {text!r}")
        try:
            d = datetime.date(*(int(g) for g in m.groups()))
        except ValueError as exc:
            raise ValueError(f"dates: {text} is not a date ({exc})") from None
        if not self.first <= d.toordinal() <= self.last:
            raise ValueError(f"dates: {text} is outside the years 1900 .. 2099")
        return d.isoformat()


class SummarizeTask(Task):
    """Documents of 3 .. 5 toy-language sentences -> the sentences whose subject is the most frequent
    subject noun, in order, each subject written "the NOUN". Pairs come from the generator (summarize.document);
    target(src) finds the summary again by parsing the text (summarize.summary_of, the checker)."""
    name = "summarize"
    src_chars = tgt_chars = summarize.CHARS
    max_src_len, max_tgt_len = summarize.MAX_SRC_LEN, summarize.MAX_TGT_LEN

    def draw(self, rng) -> str:
        return summarize.document(rng)[0]

    def draw_pair(self, rng) -> tuple:
        return summarize.document(rng)

    def target(self, src: str) -> str:
        return summarize.summary_of(src)

    def parse_source(self, text: str) -> str:
        """Lower case, single spaces, "." after every sentence: "The cat  sleeps" -> "the cat sleeps."; a
        character or word outside the task's vocabulary is a ValueError naming it."""
        return summarize.normalize(text)


TASKS = {t.name: t for t in (CopyTask, ReverseTask, NumbersTask, DatesTask, SummarizeTask)}


def get_task(name: str) -> Task:
    """The task called `name` with its default settings; ValueError listing the names otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]()


# ----------------------------------------------------------------------------- vocabularies

class Vocab:
    """Characters <-> ids with PAD=0, BOS=1, EOS=2 reserved: id 3 + i is chars[i] (sorted, distinct)."""

    def __init__(self, chars: str):
        if list(chars) != sorted(set(chars)):
            raise ValueError(f"vocabulary characters must be sorted and distinct; got {chars!r}")
        self.chars = chars
        self._id = {c: N_SPECIAL + i for i, c in enumerate(chars)}

    @property
    def size(self) -> int:
        return N_SPECIAL + len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """(len(text),) int64 ids; ValueError naming the characters outside the vocabulary."""
        unknown = sorted(set(text) - set(self._id))
        if unknown:
            raise ValueError(f"{len(unknown)} character(s) outside the vocabulary {self.chars!r}: "
                             f"{', '.join(repr(c) for c in unknown[:10])}")
        return np.array([self._id[c] for c in text], dtype=np.int64)

    def decode(self, ids) -> str:
        """Text of ids up to the first EOS; PAD and BOS are skipped."""
        out = []
        for i in np.asarray(ids).reshape(-1).tolist():
            if i == EOS:
                break
            if i >= N_SPECIAL:
                if i >= self.size:
                    raise ValueError(f"token id {i} is outside the vocabulary of {self.size}")
                out.append(self.chars[i - N_SPECIAL])
        return "".join(out)

    def __eq__(self, other):
        return isinstance(other, Vocab) and self.chars == other.chars


class TaskTokenizer:
    """The source and target vocabularies of a task: encode(source text), decode(target ids).

    Saved as JSON {"type": "seq2seq_task", "version": 1, "task", "src_chars", "tgt_chars"};
    npformer.data.load_tokenizer reads it back (the type is registered in TOKENIZERS).
    """

    type_name = "seq2seq_task"
    pad_id, bos_id, eos_id = PAD, BOS, EOS

    def __init__(self, task: str, src_chars: str, tgt_chars: str):
        self.task = task
        self.src, self.tgt = Vocab(src_chars), Vocab(tgt_chars)

    @classmethod
    def for_task(cls, task: Task) -> "TaskTokenizer":
        return cls(task.name, task.src_chars, task.tgt_chars)

    @property
    def src_vocab_size(self) -> int:
        return self.src.size

    @property
    def tgt_vocab_size(self) -> int:
        return self.tgt.size

    def encode(self, text: str) -> np.ndarray:
        return self.src.encode(text)

    def decode(self, ids) -> str:
        return self.tgt.decode(ids)

    def encode_target(self, text: str) -> np.ndarray:
        return self.tgt.encode(text)

    def save(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"type": self.type_name, "version": FORMAT_VERSION, "task": self.task,
                       "src_chars": self.src.chars, "tgt_chars": self.tgt.chars}, f)

    @classmethod
    def load(cls, path) -> "TaskTokenizer":
        obj = _read_json(path, cls.type_name)
        fields = [obj.get(k) for k in ("task", "src_chars", "tgt_chars")]
        if not all(isinstance(v, str) for v in fields):
            raise ValueError(f"{path}: 'task', 'src_chars' and 'tgt_chars' must be strings")
        return cls(*fields)

    def __eq__(self, other):
        return (isinstance(other, TaskTokenizer) and self.task == other.task and self.src == other.src
                and self.tgt == other.tgt)

    def __repr__(self):
        return f"TaskTokenizer({self.task!r}, src {self.src_vocab_size}, tgt {self.tgt_vocab_size} tokens)"


TOKENIZERS[TaskTokenizer.type_name] = TaskTokenizer


def make_batch(tok: TaskTokenizer, pairs) -> tuple:
    """(src (B, S), tgt_in (B, T), tgt_out (B, T)) int64 host arrays, right-padded with PAD.

    S = longest source, T = longest target + 1; tgt_in = BOS y, tgt_out = y EOS.
    """
    srcs = [tok.encode(s) for s, _ in pairs]
    tgts = [tok.encode_target(t) for _, t in pairs]
    B, S, T = len(pairs), max(len(s) for s in srcs), max(len(t) for t in tgts) + 1
    src = np.full((B, S), PAD, dtype=np.int64)
    tgt_in = np.full((B, T), PAD, dtype=np.int64)
    tgt_out = np.full((B, T), PAD, dtype=np.int64)
    for b, (s, t) in enumerate(zip(srcs, tgts)):
        src[b, :len(s)] = s
        tgt_in[b, 0], tgt_in[b, 1:len(t) + 1] = BOS, t
        tgt_out[b, :len(t)], tgt_out[b, len(t)] = t, EOS
    return src, tgt_in, tgt_out
