"""BERT's basic tokenization: text -> words, before WordPiece breaks the words into pieces (wordpiece.py).

The steps and their order are those of BERT's tokenization.py and transformers' BasicTokenizer; the
order matters for a few characters (lower-casing, accent stripping and punctuation splitting all
act on one whitespace-separated word at a time, after NFC):

1. cleaning: NUL, U+FFFD and control characters (Unicode category C*, except \\t \\n \\r) are dropped
   and whitespace (space, \\t, \\n, \\r and category Zs) becomes a space;
2. tokenize_chinese_chars: every CJK ideograph (the code-point ranges in CJK_RANGES, BERT's own) gets
   a space on each side, so that it becomes a word by itself;
3. NFC normalisation, then a split on whitespace (Python's str.split);
4. per word, unless it is in never_split: do_lower_case lower-cases it (str.lower, so a final capital
   sigma becomes "ς"); accents are stripped (NFD, then the Mn marks dropped) when strip_accents is
   True, or when it is None and do_lower_case is True; then the word is split around every punctuation
   character: the ASCII symbols 33-47, 58-64, 91-96, 123-126 ("$", "^", "`" included) and every
   character of a Unicode category P*.

The Unicode categories come from the running Python's unicodedata, so a character newer than its
Unicode version counts as unassigned (Cn), which is a control character here: it is dropped.
"""

from __future__ import annotations

import unicodedata

CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
              (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def is_control(ch: str) -> bool:
    return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def is_punctuation(ch: str) -> bool:
    cp = ord(ch)     # every ASCII non-letter, non-digit symbol counts, "$", "^" and "`" included
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in CJK_RANGES)


def strip_accents(word: str) -> str:
    """word in NFD with the nonspacing marks (category Mn) dropped: "Ångström" -> "Angstrom"."""
    if word.isascii():
        return word
    return "".join([c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn"])


class BasicTokenizer:
    """Steps 1-4 of the module docstring: text -> words (no vocabulary involved)."""

    def __init__(self, do_lower_case=True, strip_accents=None, tokenize_chinese_chars=True, never_split=()):
        for name, value in [("do_lower_case", do_lower_case), ("tokenize_chinese_chars", tokenize_chinese_chars)]:
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        if strip_accents is not None and not isinstance(strip_accents, bool):
            raise TypeError(f"strip_accents must be None, True or False, got {strip_accents!r}")
        self.do_lower_case = do_lower_case
        self.strip_accents = strip_accents
        self.tokenize_chinese_chars = tokenize_chinese_chars
        self.never_split = frozenset(never_split)
        self._strip = do_lower_case if strip_accents is None else strip_accents
        self._table: dict = {}     # ord(ch) -> what steps 1-2 make of ch, filled in for the characters seen
        self._punct: dict = {}     # ch -> is_punctuation(ch), likewise

    def clean(self, text: str) -> str:
        """Steps 1-3 up to the split: drop controls, normalise whitespace, space out CJK, NFC."""
        table = self._table
        for ch in set(text):
            if ord(ch) not in table:
                if ord(ch) == 0 or ord(ch) == 0xFFFD or is_control(ch):
                    table[ord(ch)] = None
                elif is_whitespace(ch):
                    table[ord(ch)] = " "
                elif self.tokenize_chinese_chars and is_cjk(ch):
                    table[ord(ch)] = f" {ch} "
                else:
                    table[ord(ch)] = ch
        return unicodedata.normalize("NFC", text.translate(table))

    def split_word(self, word: str) -> list:
        """Step 4 for one whitespace-separated word: lower-case, strip accents, split off punctuation."""
        if word in self.never_split:
            return [word]
        if self.do_lower_case:
            word = word.lower()
        if self._strip:
            word = strip_accents(word)
        if word.isalnum():                  # letters and digits only: no punctuation to split off
            return [word]
        out, start = [], 0
        for i, ch in enumerate(word):
            punct = self._punct.get(ch)
            if punct is None:
                punct = self._punct[ch] = is_punctuation(ch)
            if punct:
                out += [word[start:i], ch]
                start = i + 1
        out.append(word[start:])
        return [w for w in out if w]

    def tokenize(self, text: str) -> list:
        """text -> words, steps 1-4."""
        words = []
        for word in self.clean(text).split():
            words += self.split_word(word)
        return " ".join(words).split()      # drops words that stripping left empty (only marks)
