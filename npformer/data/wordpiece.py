"""WordPiece tokenization as BERT does it (transformers' BertTokenizer), read from and written to vocab.txt.

vocab.txt holds one token per line; the line number (from 0) is the token's id. Continuation pieces,
which never start a word, carry the prefix "##": "unaffable" -> ["un", "##aff", "##able"].

Tokenizing one text:

1. special tokens ([PAD] [UNK] [CLS] [SEP] [MASK]) written verbatim in the raw text are cut out whole;
2. BERT's basic tokenization (wordpiece_basic.py) makes words of the rest: drop control characters,
   space out CJK ideographs, NFC, split on whitespace, lower-case and strip accents (do_lower_case,
   strip_accents), split off punctuation;
3. WordPiece, greedy longest match first: take the longest prefix of the word that is in the vocabulary,
   then the longest "##" piece of the rest, and so on. A word longer than max_input_chars_per_word
   characters, or with a remainder no piece matches, becomes a single [UNK].

encode() adds [CLS] A [SEP] (B [SEP]), with token_type_ids 0 up to and including the first [SEP] and 1
after it, truncates and pads as HF's tokenizer __call__ does; decode() joins "##" pieces back on.
Training a vocabulary from a corpus lives in wordpiece_train.py.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from .tokenizers import _host_ids
from .wordpiece_basic import BasicTokenizer

SPECIAL_TOKEN_NAMES = ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")
CONFIG_KEYS = ("do_lower_case", "strip_accents", "tokenize_chinese_chars", "model_max_length")
# the spaces decode() takes out before punctuation and contractions (HF's clean_up_tokenization)
CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def read_vocab(path) -> list:
    """The tokens of a vocab.txt file (line i -> id i); a missing file or a repeated token is an error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"vocabulary file {path} does not exist")
    with open(path, "r", encoding="utf-8") as f:
        tokens = [line.rstrip("\n") for line in f]
    seen: dict = {}
    for i, token in enumerate(tokens):
        if token in seen:
            raise ValueError(f"vocabulary file {path}: token {token!r} appears twice, on lines "
                             f"{seen[token] + 1} and {i + 1}")
        seen[token] = i
    return tokens


class WordPieceTokenizer:
    """BERT's WordPiece tokenizer over a vocabulary (a list of tokens, id i <-> vocab[i]).

    do_lower_case, strip_accents, tokenize_chinese_chars: see wordpiece_basic.py.
    never_split: extra words kept whole (not lower-cased, split or broken into pieces).
    The five special tokens must be in the vocabulary. model_max_length (None: no limit) is the length
    that truncation=True or padding="max_length" use when max_length is not given. source names the
    vocabulary in error messages (from_file passes the file's path).
    """

    def __init__(self, vocab, *, do_lower_case=True, strip_accents=None, tokenize_chinese_chars=True,
                 never_split=(), max_input_chars_per_word=100, model_max_length=None, pad_token="[PAD]",
                 unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", source=None):
        if isinstance(vocab, dict):         # {token: id}, as HF's get_vocab() returns
            if sorted(vocab.values()) != list(range(len(vocab))):
                raise ValueError("a vocab dict must map its tokens to the ids 0 .. len(vocab) - 1")
            vocab = sorted(vocab, key=vocab.get)
        if isinstance(vocab, str) or not all(isinstance(t, str) for t in vocab):
            raise TypeError("vocab must be a list of token strings (use from_file to read vocab.txt)")
        where = source if source is not None else "the vocabulary"
        self.vocab_tokens = list(vocab)
        self.vocab = {t: i for i, t in enumerate(self.vocab_tokens)}
        if len(self.vocab) != len(self.vocab_tokens):
            raise ValueError(f"{where} lists a token more than once")
        specials = {"pad_token": pad_token, "unk_token": unk_token, "cls_token": cls_token,
                    "sep_token": sep_token, "mask_token": mask_token}
        if not all(isinstance(t, str) and t for t in specials.values()):
            raise ValueError(f"special tokens must be non-empty strings, got {specials}")
        missing = [t for t in specials.values() if t not in self.vocab]
        if missing:
            raise ValueError(f"{where} lacks the special token(s) {', '.join(map(repr, missing))}")
        for name, token in specials.items():
            setattr(self, name, token)
        if not (isinstance(max_input_chars_per_word, int) and max_input_chars_per_word > 0):
            raise ValueError(f"max_input_chars_per_word must be a positive int, got {max_input_chars_per_word!r}")
        if model_max_length is not None and not (isinstance(model_max_length, int) and model_max_length > 0):
            raise ValueError(f"model_max_length must be None or a positive int, got {model_max_length!r}")
        self.max_input_chars_per_word = max_input_chars_per_word
        self.model_max_length = model_max_length
        self.all_special_tokens = list(specials.values())
        self.basic = BasicTokenizer(do_lower_case, strip_accents, tokenize_chinese_chars,
                                    frozenset(never_split) | set(self.all_special_tokens))
        self.never_split = frozenset(never_split)
        # special tokens in the raw text, longest first so that one never cuts another short
        alternatives = sorted(self.all_special_tokens, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")
        self._longest = max(map(len, self.vocab_tokens))

    # ---------------------------------------------------------------- vocabulary
    do_lower_case = property(lambda self: self.basic.do_lower_case)
    strip_accents = property(lambda self: self.basic.strip_accents)
    tokenize_chinese_chars = property(lambda self: self.basic.tokenize_chinese_chars)
    vocab_size = property(lambda self: len(self.vocab_tokens))
    pad_token_id = property(lambda self: self.vocab[self.pad_token])
    unk_token_id = property(lambda self: self.vocab[self.unk_token])
    cls_token_id = property(lambda self: self.vocab[self.cls_token])
    sep_token_id = property(lambda self: self.vocab[self.sep_token])
    mask_token_id = property(lambda self: self.vocab[self.mask_token])
    all_special_ids = property(lambda self: [self.vocab[t] for t in self.all_special_tokens])

    def __len__(self):
        return self.vocab_size

    def get_vocab(self) -> dict:
        return dict(self.vocab)

    def convert_tokens_to_ids(self, tokens):
        """A token (str) -> its id, or a list of tokens -> a list of ids; unknown tokens -> unk_token_id."""
        if isinstance(tokens, str):
            return self.vocab.get(tokens, self.unk_token_id)
        return [self.vocab.get(t, self.unk_token_id) for t in tokens]

    def convert_ids_to_tokens(self, ids, skip_special_tokens=False):
        """An id -> its token, or a sequence of ids -> a list of tokens; an id outside the vocabulary raises."""
        if isinstance(ids, (int, np.integer)):
            return self.convert_ids_to_tokens([ids])[0]
        ids = _host_ids(ids).tolist()
        bad = sorted({i for i in ids if not 0 <= i < self.vocab_size})
        if bad:
            raise ValueError(f"token ids not in the vocabulary of {self.vocab_size}: {bad[:10]}")
        skip = set(self.all_special_ids) if skip_special_tokens else ()
        return [self.vocab_tokens[i] for i in ids if i not in skip]

    # ---------------------------------------------------------------- text -> tokens
    def wordpiece(self, word: str) -> list:
        """Step 3: one word -> its pieces, greedy longest match first; [UNK] alone if that fails."""
        if len(word) > self.max_input_chars_per_word:
            return [self.unk_token]
        pieces, start, n = [], 0, len(word)
        while start < n:
            end = min(n, start + self._longest)     # no vocabulary entry is longer than that
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
                end -= 1
            else:                                   # not even one character matched
                return [self.unk_token]
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text: str) -> list:
        """text -> tokens (strings), steps 1-3 of the module docstring."""
        _check_str(text, "text")
        tokens = []
        for i, part in enumerate(self._special_re.split(text)):
            if i % 2:                               # the odd parts are the special tokens themselves
                tokens.append(part)
                continue
            for word in self.basic.tokenize(part):
                tokens += [word] if word in self.never_split else self.wordpiece(word)
        return tokens

    # ---------------------------------------------------------------- model inputs
    def encode(self, text, text_pair=None, *, add_special_tokens=True, max_length=None, truncation=None,
               padding=False) -> dict:
        """text (and text_pair) -> {"input_ids", "token_type_ids", "attention_mask"}: (T,) int64 arrays.

        truncation: "longest_first" (True) drops the last token of the longer sequence until the whole
        fits max_length (ties: the pair's), "only_first" / "only_second" cut one sequence, False / None
        none. max_length given alone (padding False, truncation None) means "longest_first", as in HF.
        padding: "max_length" pads to max_length with [PAD] (type 0, mask 0); False / "longest" do not
        pad a single text. A text longer than max_length is not truncated unless truncation says so.
        """
        ids = self._ids(text, "text")
        pair = None if text_pair is None else self._ids(text_pair, "text_pair")
        truncation, padding, max_length = self._strategies(truncation, padding, max_length)
        row = self._build(ids, pair, add_special_tokens, truncation, max_length)
        if padding == "max_length":
            row = self._pad(row, max_length)
        return {k: np.array(v, dtype=np.int64) for k, v in row.items()}

    def encode_batch(self, texts, text_pairs=None, *, add_special_tokens=True, max_length=None,
                     truncation=None, padding="longest") -> dict:
        """A list of texts (and of pairs) -> the same three keys as (B, T) int64 arrays, padded at the right
        to the longest row (padding "longest" or True) or to max_length ("max_length")."""
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts must be a list of str (encode takes one text), got {type(texts).__name__}")
        if text_pairs is not None and (isinstance(text_pairs, str) or len(text_pairs) != len(texts)):
            raise ValueError(f"text_pairs must be a list as long as texts ({len(texts)})")
        truncation, padding, max_length = self._strategies(truncation, padding, max_length)
        if padding is None:
            raise ValueError("encode_batch needs padding='longest' or 'max_length' to return arrays")
        pairs = text_pairs if text_pairs is not None else [None] * len(texts)
        rows = []
        for i, (a, b) in enumerate(zip(texts, pairs)):
            pair = None if b is None else self._ids(b, f"text_pairs[{i}]")
            rows.append(self._build(self._ids(a, f"texts[{i}]"), pair, add_special_tokens, truncation, max_length))
        T = max_length if padding == "max_length" else max([len(r["input_ids"]) for r in rows], default=0)
        for i, r in enumerate(rows):
            if len(r["input_ids"]) > T:
                raise ValueError(f"texts[{i}] has {len(r['input_ids'])} tokens, more than max_length={T}; "
                                 "pass truncation=True to cut it")
        rows = [self._pad(r, T) for r in rows]
        return {k: np.array([r[k] for r in rows], dtype=np.int64).reshape(len(rows), T) for k in _KEYS}

    def __call__(self, text, text_pair=None, **kwargs) -> dict:
        """encode for a str, encode_batch for a list of str."""
        if isinstance(text, (list, tuple)):
            return self.encode_batch(text, text_pair, **kwargs)
        return self.encode(text, text_pair, **kwargs)

    def _ids(self, text, name) -> list:
        _check_str(text, name)
        return self.convert_tokens_to_ids(self.tokenize(text))

    def _strategies(self, truncation, padding, max_length):
        """HF's rules: (truncation, padding, max_length) -> (None | strategy, None | kind, length)."""
        if max_length is not None and padding is False and truncation is None:
            truncation = "longest_first"
        truncations = {None: None, False: None, "do_not_truncate": None, True: "longest_first",
                       "longest_first": "longest_first", "only_first": "only_first", "only_second": "only_second"}
        paddings = {False: None, None: None, "do_not_pad": None, True: "longest", "longest": "longest",
                    "max_length": "max_length"}
        if not isinstance(truncation, (str, bool, type(None))) or truncation not in truncations:
            raise ValueError(f"truncation must be one of {[k for k in truncations if k is not None]}, "
                             f"got {truncation!r}")
        if not isinstance(padding, (str, bool, type(None))) or padding not in paddings:
            raise ValueError(f"padding must be one of {list(paddings)}, got {padding!r}")
        truncation, padding = truncations[truncation], paddings[padding]
        if max_length is None and (truncation or padding == "max_length"):
            max_length = self.model_max_length
            if max_length is None:
                raise ValueError(f"{'truncation' if truncation else 'padding=max_length'} needs max_length "
                                 "(this tokenizer has no model_max_length)")
        if max_length is not None and not (isinstance(max_length, (int, np.integer)) and max_length >= 0):
            raise ValueError(f"max_length must be None or an int >= 0, got {max_length!r}")
        return truncation, padding, max_length

    def _build(self, ids, pair, add_special_tokens, truncation, max_length) -> dict:
        """Truncate, then add [CLS] / [SEP] and the token types: one unpadded row."""
        n_special = (2 if pair is None else 3) if add_special_tokens else 0
        extra = len(ids) + len(pair or []) + n_special - (max_length or 0)
        if truncation and extra > 0:
            ids, pair = _truncate(ids, pair, extra, truncation)
            if len(ids) + len(pair or []) + n_special > max_length:
                what = "a pair" if pair is not None else "a text"
                raise ValueError(f"truncation={truncation!r} cannot fit {what} into max_length={max_length} "
                                 f"({n_special} special tokens)")
        if not add_special_tokens:
            seq = ids + (pair or [])
            return {"input_ids": seq, "token_type_ids": [0] * len(seq), "attention_mask": [1] * len(seq)}
        cls, sep = self.cls_token_id, self.sep_token_id
        seq, types = [cls] + ids + [sep], [0] * (len(ids) + 2)
        if pair is not None:
            seq, types = seq + pair + [sep], types + [1] * (len(pair) + 1)
        return {"input_ids": seq, "token_type_ids": types, "attention_mask": [1] * len(seq)}

    def _pad(self, row, length) -> dict:
        n = max(length - len(row["input_ids"]), 0)
        return {"input_ids": row["input_ids"] + [self.pad_token_id] * n,
                "token_type_ids": row["token_type_ids"] + [0] * n,
                "attention_mask": row["attention_mask"] + [0] * n}

    # ---------------------------------------------------------------- ids -> text
    def convert_tokens_to_string(self, tokens) -> str:
        return " ".join(tokens).replace(" ##", "").strip()

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=True) -> str:
        """ids -> text: tokens joined by spaces, "##" pieces glued to the token before; with
        clean_up_tokenization_spaces, no space before . ? ! , and English contractions ('s n't ...)."""
        if isinstance(ids, (int, np.integer)):
            ids = [ids]
        text = self.convert_tokens_to_string(self.convert_ids_to_tokens(ids, skip_special_tokens))
        if clean_up_tokenization_spaces:
            for old, new in CLEAN_UP:
                text = text.replace(old, new)
        return text

    def batch_decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=True) -> list:
        return [self.decode(row, skip_special_tokens, clean_up_tokenization_spaces) for row in ids]

    # ---------------------------------------------------------------- files and training
    @classmethod
    def from_file(cls, path, **options) -> "WordPieceTokenizer":
        """Read vocab.txt (path, or path/vocab.txt for a directory). Options come from the keyword
        arguments, else from an HF tokenizer_config.json in the same directory (do_lower_case,
        strip_accents, tokenize_chinese_chars, model_max_length), else BERT's defaults."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "vocab.txt")
        tokens = read_vocab(path)
        config = _read_config(os.path.join(os.path.dirname(path), "tokenizer_config.json"))
        return cls(tokens, **{**config, **options}, source=f"vocabulary file {path}")

    def save(self, path) -> None:
        """Write vocab.txt to path; given an existing directory, write its vocab.txt and a
        tokenizer_config.json with the options, which both from_file and HF's from_pretrained read."""
        bad = [t for t in self.vocab_tokens if "\n" in t or "\r" in t]
        if bad:
            raise ValueError(f"tokens with a line break cannot be written to vocab.txt: {bad[:5]}")
        path = os.fspath(path)
        if os.path.isdir(path):
            config = {"tokenizer_class": "BertTokenizer", "do_lower_case": self.do_lower_case,
                      "strip_accents": self.strip_accents, "tokenize_chinese_chars": self.tokenize_chinese_chars,
                      **{name: getattr(self, name) for name in SPECIAL_TOKEN_NAMES}}
            if self.model_max_length is not None:
                config["model_max_length"] = self.model_max_length
            with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2)
            path = os.path.join(path, "vocab.txt")
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write("".join(t + "\n" for t in self.vocab_tokens))

    @classmethod
    def from_pretrained(cls, path, **options) -> "WordPieceTokenizer":
        """HF's name: from_file(path, **options) on a directory holding vocab.txt."""
        return cls.from_file(path, **options)

    def save_pretrained(self, path) -> None:
        """HF's name: make the directory `path`, then save(path) (vocab.txt, tokenizer_config.json)."""
        os.makedirs(path, exist_ok=True)
        self.save(path)

    @classmethod
    def train(cls, texts, vocab_size, *, min_frequency=2, **options) -> "WordPieceTokenizer":
        """Learn a vocabulary of vocab_size tokens from texts; see wordpiece_train.train_wordpiece."""
        from .wordpiece_train import train_wordpiece
        return train_wordpiece(texts, vocab_size, min_frequency=min_frequency, **options)

    def __eq__(self, other):
        return (isinstance(other, WordPieceTokenizer) and self.vocab_tokens == other.vocab_tokens
                and self._options() == other._options())

    def _options(self) -> dict:
        return {"do_lower_case": self.do_lower_case, "strip_accents": self.strip_accents,
                "tokenize_chinese_chars": self.tokenize_chinese_chars, "never_split": self.never_split,
                "max_input_chars_per_word": self.max_input_chars_per_word,
                "model_max_length": self.model_max_length,
                **{name: getattr(self, name) for name in SPECIAL_TOKEN_NAMES}}

    def __repr__(self):
        return f"WordPieceTokenizer(vocab_size={self.vocab_size}, do_lower_case={self.do_lower_case})"


_KEYS = ("input_ids", "token_type_ids", "attention_mask")


def _check_str(text, name) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")


def _truncate(ids, pair, n, strategy):
    """Remove n tokens from the right: ids and pair as HF's truncate_sequences leaves them."""
    if strategy == "only_first" or (strategy == "longest_first" and pair is None):
        return ids[:max(len(ids) - n, 0)], pair
    if strategy == "only_second":
        return ids, (pair if pair is None else pair[:max(len(pair) - n, 0)])
    # longest_first on a pair: first even the lengths out, then take half of the rest from each,
    # the odd one from the pair -- the same as taking one token at a time from the longer (ties: pair)
    first = min(abs(len(ids) - len(pair)), n)
    rest = n - first
    from_ids = first + rest // 2 if len(ids) > len(pair) else rest // 2
    from_pair = n - from_ids
    return ids[:max(len(ids) - from_ids, 0)], pair[:max(len(pair) - from_pair, 0)]


def _read_config(path) -> dict:
    """The options in an HF tokenizer_config.json ({} when there is none)."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, "r", encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object")
    options = {k: config[k] for k in CONFIG_KEYS if k in config}
    if isinstance(options.get("model_max_length"), (int, float)) and options["model_max_length"] >= 1e29:
        options["model_max_length"] = None           # HF writes 1e30 for "no limit"
    for key, allowed, kinds in [("do_lower_case", "true or false", (bool,)),
                                ("strip_accents", "null, true or false", (bool, type(None))),
                                ("tokenize_chinese_chars", "true or false", (bool,)),
                                ("model_max_length", "null or a positive integer", (int, type(None)))]:
        if key in options and not isinstance(options[key], kinds):
            raise ValueError(f"{path}: {key} must be {allowed}, got {options[key]!r}")
    return options
