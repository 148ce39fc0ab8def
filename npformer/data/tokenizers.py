"""Tokenizers: text <-> int64 token ids, saved and loaded as JSON.

CharTokenizer
    One id per character; the vocabulary is the sorted set of characters of a training text,
    id i <-> ``chars[i]``.
ByteBPETokenizer
    Byte-level byte-pair encoding. Ids 0..255 are the raw UTF-8 bytes, so any text encodes and
    decodes back exactly, whatever its characters. Training splits the text into chunks (runs of
    letters, of digits, of other symbols, each with an optional leading space, and whitespace runs)
    and then repeats: count every adjacent pair of ids inside the chunks, weighted by how often each
    chunk occurs; merge the most frequent pair into a new id 256 + m (ties go to the smallest pair
    (a, b)). Counts are updated incrementally: a merge only revisits the chunks that contain the
    merged pair. Encoding splits the same way and applies the merges in the order they were learned.

Both write JSON ``{"type": ..., "version": 1, ...}``; ``load_tokenizer(path)`` reads either kind.
"""

from __future__ import annotations

import json
import re

import numpy as np

FORMAT_VERSION = 1

# Chunks that merges never cross: [space]letters | [space]digits | [space]other symbols (with "_")
# | whitespace not followed by a non-space | whitespace. The alternatives cover every character,
# so the chunks always concatenate back to the text.
DEFAULT_PATTERN = r" ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"


def _host_ids(ids) -> np.ndarray:
    """ids (list, NumPy or CuPy array) as a 1-D NumPy int64 array; raise on non-integers."""
    if not isinstance(ids, np.ndarray) and hasattr(ids, "get"):   # a CuPy array: copy to host
        ids = ids.get()
    arr = np.asarray(ids)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
    return arr.reshape(-1).astype(np.int64, copy=False)


def _check_range(ids: np.ndarray, vocab_size: int) -> None:
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise ValueError(f"token ids out of range [0, {vocab_size}): {sorted(set(bad.tolist()))[:10]}")


def _read_json(path, expected_type: str | None = None) -> dict:
    """The JSON object in `path` with a checked "version" (and "type" if given)."""
    with open(path, "r", encoding="utf-8") as f:
        text = f.read()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not a tokenizer file: invalid JSON ({exc})") from None
    if not isinstance(obj, dict) or "type" not in obj:
        raise ValueError(f"{path} is not a tokenizer file: expected a JSON object with a 'type' field")
    if expected_type is not None and obj["type"] != expected_type:
        raise ValueError(f"{path} holds a {obj['type']!r} tokenizer, not {expected_type!r}")
    if obj.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: tokenizer format version {obj.get('version')!r} is not supported "
                         f"(this npformer reads version {FORMAT_VERSION})")
    return obj


def _write_json(path, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)      # ensure_ascii keeps any character (even a lone surrogate) writable


# ----------------------------------------------------------------------------- characters

class CharTokenizer:
    """One token per character; vocabulary = sorted(set(text)).

    encode(s) -> (len(s),) int64 ids; decode(ids) -> str. Encoding a character outside the
    vocabulary raises ValueError naming (up to 10 of) the unknown characters.
    """

    type_name = "char"

    def __init__(self, text: str = ""):
        self.chars = sorted(set(text))
        # code points, sorted like chars, for a vectorised lookup with searchsorted
        self._codes = np.array([ord(c) for c in self.chars], dtype=np.int64)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        # UTF-32 gives one 4-byte code point per character ("surrogatepass" keeps lone surrogates)
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4").astype(np.int64)
        ids = np.searchsorted(self._codes, codes)
        ids_clipped = np.minimum(ids, max(len(self.chars) - 1, 0))
        known = (ids < len(self.chars)) & (self._codes[ids_clipped] == codes) if len(self.chars) \
            else np.zeros(len(codes), dtype=bool)
        if not known.all():
            unknown = sorted(set(chr(c) for c in codes[~known].tolist()))
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            raise ValueError(f"{len(unknown)} character(s) not in the vocabulary of {self.vocab_size}: "
                             f"{', '.join(repr(c) for c in unknown[:10])}{more}")
        return ids.astype(np.int64)

    def decode(self, ids) -> str:
        ids = _host_ids(ids)
        _check_range(ids, self.vocab_size)
        return "".join([self.chars[i] for i in ids.tolist()])

    def save(self, path) -> None:
        _write_json(path, {"type": self.type_name, "version": FORMAT_VERSION, "chars": self.chars})

    @classmethod
    def load(cls, path) -> "CharTokenizer":
        obj = _read_json(path, cls.type_name)
        chars = obj.get("chars")
        if not isinstance(chars, list) or not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise ValueError(f"{path}: 'chars' must be a list of single characters")
        if chars != sorted(set(chars)):
            raise ValueError(f"{path}: 'chars' must be sorted and without repeats")
        return cls("".join(chars))

    def __eq__(self, other):
        return isinstance(other, CharTokenizer) and self.chars == other.chars

    def __repr__(self):
        return f"CharTokenizer(vocab_size={self.vocab_size})"


# ----------------------------------------------------------------------------- byte-level BPE

def _merge_pair(ids: list, pair: tuple, new_id: int) -> list:
    """ids with every non-overlapping occurrence of pair (left to right) replaced by new_id."""
    out, i, n = [], 0, len(ids)
    a, b = pair
    while i < n:
        if i + 1 < n and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


class ByteBPETokenizer:
    """Byte-level BPE: ids 0..255 are bytes, id 256 + m is merges[m] = (a, b) joined.

    vocab_size = 256 + len(merges). An untrained tokenizer encodes plain UTF-8 bytes.
    encode(s) -> int64 ids; decode(ids) -> str (decode(encode(s)) == s for every str s that
    UTF-8 can encode; ids that do not form valid UTF-8 decode with U+FFFD replacement characters).
    """

    type_name = "byte_bpe"

    def __init__(self, merges=(), pattern: str = DEFAULT_PATTERN):
        self.pattern = pattern
        self._regex = re.compile(pattern)
        self._set_merges([tuple(int(t) for t in m) for m in merges])

    def _set_merges(self, merges: list) -> None:
        self.merges = merges
        self.ranks = {pair: 256 + m for m, pair in enumerate(merges)}    # pair -> its new id
        self.vocab = [bytes([b]) for b in range(256)]                      # id -> its bytes
        for a, b in merges:
            self.vocab.append(self.vocab[a] + self.vocab[b])

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.merges)

    def _chunks(self, text: str) -> list:
        return self._regex.findall(text)

    def train(self, text: str, vocab_size: int) -> "ByteBPETokenizer":
        """Learn vocab_size - 256 merges from text (fewer if no pairs are left); returns self."""
        if vocab_size < 256:
            raise ValueError(f"vocab_size must be >= 256 (the byte alphabet), got {vocab_size}")
        counts_of_chunk: dict = {}
        for chunk in self._chunks(text):
            counts_of_chunk[chunk] = counts_of_chunk.get(chunk, 0) + 1
        words = [list(c.encode("utf-8")) for c in counts_of_chunk]       # each distinct chunk once
        freqs = list(counts_of_chunk.values())

        pair_count: dict = {}     # pair -> occurrences in the text
        where: dict = {}          # pair -> indices of words that contained it (may be stale)
        for w, (ids, f) in enumerate(zip(words, freqs)):
            for pair in zip(ids, ids[1:]):
                pair_count[pair] = pair_count.get(pair, 0) + f
                where.setdefault(pair, set()).add(w)

        merges = []
        while 256 + len(merges) < vocab_size and pair_count:
            # most frequent pair; among equal counts the smallest (a, b)
            best = max(pair_count, key=lambda p: (pair_count[p], -p[0], -p[1]))
            new_id = 256 + len(merges)
            merges.append(best)
            for w in sorted(where.pop(best)):
                ids, f = words[w], freqs[w]
                merged = _merge_pair(ids, best, new_id)
                if len(merged) == len(ids):
                    continue                       # stale entry: this word no longer has the pair
                for pair in zip(ids, ids[1:]):     # take the old pairs out ...
                    pair_count[pair] -= f
                    if pair_count[pair] == 0:
                        del pair_count[pair]
                for pair in zip(merged, merged[1:]):   # ... and put the new ones in
                    pair_count[pair] = pair_count.get(pair, 0) + f
                    where.setdefault(pair, set()).add(w)
                words[w] = merged
        self._set_merges(merges)
        return self

    def _encode_chunk(self, data: bytes) -> list:
        ids = list(data)
        while len(ids) >= 2:
            # the adjacent pair merged earliest in training goes first
            pair = min(zip(ids, ids[1:]), key=lambda p: self.ranks.get(p, 1 << 62))
            if pair not in self.ranks:
                break
            ids = _merge_pair(ids, pair, self.ranks[pair])
        return ids

    def encode(self, text: str) -> np.ndarray:
        cache: dict = {}
        out: list = []
        for chunk in self._chunks(text):
            ids = cache.get(chunk)
            if ids is None:
                ids = cache[chunk] = self._encode_chunk(chunk.encode("utf-8"))
            out.extend(ids)
        return np.array(out, dtype=np.int64)

    def decode(self, ids) -> str:
        ids = _host_ids(ids)
        _check_range(ids, self.vocab_size)
        return b"".join([self.vocab[i] for i in ids.tolist()]).decode("utf-8", errors="replace")

    def save(self, path) -> None:
        _write_json(path, {"type": self.type_name, "version": FORMAT_VERSION, "pattern": self.pattern,
                           "merges": [list(m) for m in self.merges]})

    @classmethod
    def load(cls, path) -> "ByteBPETokenizer":
        obj = _read_json(path, cls.type_name)
        merges, pattern = obj.get("merges"), obj.get("pattern")
        if not isinstance(pattern, str):
            raise ValueError(f"{path}: 'pattern' must be a string")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{path}: 'pattern' is not a valid regular expression ({exc})") from None
        if not isinstance(merges, list):
            raise ValueError(f"{path}: 'merges' must be a list of [a, b] pairs")
        for m, pair in enumerate(merges):
            # merge m may only join ids that exist before it: 0 <= a, b < 256 + m
            if not (isinstance(pair, list) and len(pair) == 2
                    and all(type(t) is int and 0 <= t < 256 + m for t in pair)):
                raise ValueError(f"{path}: merge {m} is {pair!r}; expected [a, b] with "
                                 f"0 <= a, b < {256 + m}")
        if len(set(map(tuple, merges))) != len(merges):
            raise ValueError(f"{path}: 'merges' contains a repeated pair")
        return cls(merges, pattern)

    def __eq__(self, other):
        return (isinstance(other, ByteBPETokenizer) and self.merges == other.merges
                and self.pattern == other.pattern)

    def __repr__(self):
        return f"ByteBPETokenizer(vocab_size={self.vocab_size})"


TOKENIZERS = {CharTokenizer.type_name: CharTokenizer, ByteBPETokenizer.type_name: ByteBPETokenizer}


def load_tokenizer(path):
    """Load a tokenizer saved by CharTokenizer.save or ByteBPETokenizer.save (dispatch on "type")."""
    kind = _read_json(path)["type"]
    if kind not in TOKENIZERS:
        raise ValueError(f"{path}: unknown tokenizer type {kind!r}; expected one of {sorted(TOKENIZERS)}")
    return TOKENIZERS[kind].load(path)
