"""Learning a WordPiece vocabulary from a corpus (for WordPieceTokenizer, in wordpiece.py).

The method is WordPiece's own (Schuster & Nakajima, 2012, the vocabulary builder behind BERT): grow the
vocabulary one unit at a time, each time adding the unit that most raises the likelihood of the training
words under a unigram model of the units. Google never published its trainer; this computes that
criterion for every candidate merge at every step.

1. Pre-tokenize every text exactly as the tokenizer will (clean, lower-case, split off punctuation)
   and count the words. Each word starts as its characters: the first as itself, the rest as "##c".
2. With c_u the count of unit u over all words (weighted by word frequency) and N = sum of c_u, the
   log-likelihood is L = sum_u c_u log(c_u / N) = sum_u f(c_u) - f(N), f(x) = x log x. Merging the
   n = count(ab) adjacent occurrences of a pair (a, b) into the new unit ab changes it by

        gain(a, b) = f(n) + f(c_a - n) - f(c_a) + f(c_b - n) - f(c_b) - f(N - n) + f(N)

   (with f(c_a - 2n) - f(c_a) for the two middle terms when a == b). Repeat until the vocabulary has
   vocab_size tokens: merge the pair with the largest gain into a + b (b without its "##"), in every
   word, left to right.

For small n the gain is about n (log(n N / (c_a c_b)) - 1): count(ab) times the log of N times the
score count(ab) / (count(a) count(b)) that the Hugging Face course gives as "the WordPiece score".
Merging by that score alone favours pairs of rare pieces: on tiny Shakespeare at 5,000 tokens it needs
twice as many tokens as the likelihood gain, and spells "before" b ##e ##for ##e instead of whole.
(HF tokenizers' WordPieceTrainer merges by raw count(ab), like BPE, and only adds the "##" prefix.)
n is taken as count(ab) even where runs such as ##s ##s ##s merge fewer times, and ab as a new unit even
where another pair already spelled it (both rare, both only shift a gain). Ties go to the smallest
(a, b) as strings, so a corpus always gives the same vocabulary. Pairs seen fewer than min_frequency
times are never merged.

The vocabulary is: the special tokens, every character seen (sorted), the same characters as "##c",
then the merged units in the order they were made, so every training word encodes without [UNK].
Each step scores every pair at once with NumPy, then updates the counts of only the words that hold
the merged pair.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from .wordpiece import SPECIAL_TOKEN_NAMES, WordPieceTokenizer, _check_str

_DEFAULT_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                     "mask_token": "[MASK]"}


def count_words(tokenizer: WordPieceTokenizer, texts) -> Counter:
    """{word: occurrences} of the words tokenizer.tokenize would hand to WordPiece (special tokens,
    never_split words and words over max_input_chars_per_word left out)."""
    basic = tokenizer.basic
    raw: Counter = Counter()             # whitespace-separated words: cheap to count, then split once each
    for i, text in enumerate(texts):
        _check_str(text, f"texts[{i}]")
        for j, part in enumerate(tokenizer._special_re.split(text)):
            if j % 2 == 0:               # the odd parts are special tokens
                raw.update(basic.clean(part).split())
    words: Counter = Counter()
    for raw_word, n in raw.items():
        for word in basic.split_word(raw_word):
            if word and word not in basic.never_split and len(word) <= tokenizer.max_input_chars_per_word:
                words[word] += n
    return words


def train_wordpiece(texts, vocab_size, *, min_frequency=2, **options) -> WordPieceTokenizer:
    """A WordPieceTokenizer whose vocabulary of (at most) vocab_size tokens is learned from texts.

    texts: a str or an iterable of str. options: WordPieceTokenizer's keyword arguments
    (do_lower_case, strip_accents, ..., the special tokens), used both to pre-tokenize and in the result.
    Stops early when no pair occurs min_frequency times any more.
    """
    if isinstance(texts, str):
        texts = [texts]
    if not (isinstance(min_frequency, int) and min_frequency >= 1):
        raise ValueError(f"min_frequency must be an int >= 1, got {min_frequency!r}")
    specials = list(dict.fromkeys(options.get(name, _DEFAULT_SPECIALS[name]) for name in SPECIAL_TOKEN_NAMES))
    probe = WordPieceTokenizer(specials, **options)           # checks the options, pre-tokenizes
    words = count_words(probe, texts)

    alphabet = sorted({ch for word in words for ch in word})
    vocab = list(dict.fromkeys(specials + alphabet + ["##" + ch for ch in alphabet]))
    if not isinstance(vocab_size, int) or vocab_size < len(vocab):
        raise ValueError(f"vocab_size must be an int >= {len(vocab)} (the {len(specials)} special tokens and "
                         f"{len(alphabet)} characters seen, each also as ##c), got {vocab_size!r}")
    merges = _Merges(vocab, words)
    while len(merges.vocab) < vocab_size and merges.merge_best(min_frequency):
        pass
    return WordPieceTokenizer(merges.vocab, **options)


def _xlogx(x):
    """x log x elementwise, 0 at 0."""
    x = np.asarray(x, dtype=np.float64)
    return x * np.log(np.where(x > 0, x, 1.0))


class _Merges:
    """The words as lists of unit ids, with the counts of every unit and every adjacent pair."""

    def __init__(self, vocab: list, words: Counter):
        self.vocab = vocab
        self.index = {t: i for i, t in enumerate(vocab)}
        order = sorted(words)
        self.seqs = [[self.index[w[0]]] + [self.index["##" + ch] for ch in w[1:]] for w in order]
        self.freqs = [words[w] for w in order]
        self.unit_count = np.zeros(max(2 * len(vocab), 64), dtype=np.int64)
        self.total = 0                          # N: the number of units in the corpus
        self.pair_id: dict = {}                 # (a, b) -> row in the arrays below
        self.pair_a = np.zeros(1024, dtype=np.int64)
        self.pair_b = np.zeros(1024, dtype=np.int64)
        self.pair_count = np.zeros(1024, dtype=np.int64)
        self.where: list = []                   # row -> indices of words that held the pair (some stale)
        for w, (seq, f) in enumerate(zip(self.seqs, self.freqs)):
            np.add.at(self.unit_count, seq, f)
            self.total += len(seq) * f
            for pair in zip(seq, seq[1:]):
                self._add_pair(pair, f, w)

    def _add_pair(self, pair, f, w) -> None:
        k = self.pair_id.get(pair)
        if k is None:
            k = self.pair_id[pair] = len(self.where)
            if k == len(self.pair_count):      # grow the arrays by doubling
                self.pair_a, self.pair_b, self.pair_count = (
                    np.concatenate([x, np.zeros_like(x)]) for x in (self.pair_a, self.pair_b, self.pair_count))
            self.pair_a[k], self.pair_b[k] = pair
            self.where.append(set())
        self.pair_count[k] += f
        self.where[k].add(w)

    def best_pair(self, min_frequency):
        """The row of the pair to merge next (None if no pair occurs min_frequency times)."""
        n = len(self.where)
        count = self.pair_count[:n]
        alive = np.flatnonzero(count >= min_frequency)
        if alive.size == 0:
            return None
        n, c_a, c_b = count[alive], self.unit_count[self.pair_a[alive]], self.unit_count[self.pair_b[alive]]
        same = self.pair_a[alive] == self.pair_b[alive]
        gain = (_xlogx(n) + np.where(same, _xlogx(c_a - 2 * n) - _xlogx(c_a),
                                     _xlogx(c_a - n) - _xlogx(c_a) + _xlogx(c_b - n) - _xlogx(c_b))
                - _xlogx(self.total - n) + _xlogx(self.total))
        tied = alive[gain == gain.max()]
        return min(tied.tolist(), key=lambda k: (self.vocab[self.pair_a[k]], self.vocab[self.pair_b[k]]))

    def merge_best(self, min_frequency) -> bool:
        """Merge the best pair everywhere; False when there is none."""
        k = self.best_pair(min_frequency)
        if k is None:
            return False
        a, b = int(self.pair_a[k]), int(self.pair_b[k])
        token = self.vocab[a] + self.vocab[b][2:]           # b always is a "##" continuation
        u = self.index.get(token)
        if u is None:                                       # (two merges can spell the same token)
            u = self.index[token] = len(self.vocab)
            self.vocab.append(token)
            if u == len(self.unit_count):
                self.unit_count = np.concatenate([self.unit_count, np.zeros_like(self.unit_count)])
        for w in sorted(self.where[k]):
            seq, f = self.seqs[w], self.freqs[w]
            merged, i = [], 0
            while i < len(seq):                             # left to right, without overlaps
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    merged.append(u)
                    i += 2
                else:
                    merged.append(seq[i])
                    i += 1
            times = len(seq) - len(merged)
            if times == 0:
                continue                                    # a stale entry: the pair has left this word
            for pair in zip(seq, seq[1:]):
                self.pair_count[self.pair_id[pair]] -= f
            for pair in zip(merged, merged[1:]):
                self._add_pair(pair, f, w)
            self.unit_count[a] -= times * f
            self.unit_count[b] -= times * f
            self.unit_count[u] += times * f
            self.total -= times * f
            self.seqs[w] = merged
        self.where[k] = set()
        return True
