"""WordPiece for pretraining on a stream of text: text -> one flat array of ids, saved as JSON.

``WordPieceTokenizer`` (wordpiece.py) is BERT's tokenizer as Hugging Face's: ``encode`` turns one
text into model inputs (a dict with [CLS] and [SEP] added). Pretraining reads a whole corpus as one
stream of token ids and cuts blocks out of it, as it does with the character and BPE tokenizers;
``WordPieceStream`` gives WordPiece that interface:

    encode(text) -> (N,) int64     the tokens of the text, no special tokens added
    decode(ids) -> str             the tokens joined back (lower-cased, "##" pieces glued on)
    vocab_size, save(path), load(path)

The JSON file (``{"type": "wordpiece", "version": 1, "vocab": [...], "options": {...}}``) is what
a pretraining checkpoint stores as tokenizer.json; ``load_tokenizer`` reads it back. WordPiece loses
what BERT's tokenizer drops: case (with do_lower_case), accents, and line breaks (white space), so
``decode(encode(text))`` is the text as BERT sees it, not the text itself.
"""

from __future__ import annotations

import numpy as np

from .tokenizers import FORMAT_VERSION, TOKENIZERS, _check_range, _host_ids, _read_json, _write_json
from .wordpiece import WordPieceTokenizer

_OPTIONS = ("do_lower_case", "strip_accents", "tokenize_chinese_chars", "max_input_chars_per_word",
            "pad_token", "unk_token", "cls_token", "sep_token", "mask_token")


class WordPieceStream:
    """A WordPieceTokenizer (``self.wordpiece``) seen as a text <-> id-array tokenizer."""

    type_name = "wordpiece"

    def __init__(self, wordpiece: WordPieceTokenizer):
        if not isinstance(wordpiece, WordPieceTokenizer):
            raise TypeError(f"WordPieceStream wraps a WordPieceTokenizer, got {type(wordpiece).__name__}")
        self.wordpiece = wordpiece

    @classmethod
    def train(cls, text: str, vocab_size: int) -> "WordPieceStream":
        """Learn a vocabulary of at most vocab_size tokens from text (WordPieceTokenizer.train)."""
        return cls(WordPieceTokenizer.train([text], vocab_size))

    @property
    def vocab_size(self) -> int:
        return self.wordpiece.vocab_size

    def encode(self, text: str) -> np.ndarray:
        """text -> (N,) int64 ids of its WordPiece tokens, without [CLS] / [SEP]."""
        wp = self.wordpiece
        return np.array(wp.convert_tokens_to_ids(wp.tokenize(text)), dtype=np.int64)

    def decode(self, ids) -> str:
        """ids (any integer array or list) -> text, "##" continuations glued to the piece before."""
        ids = _host_ids(ids)
        _check_range(ids, self.vocab_size)
        return self.wordpiece.decode(ids.tolist())

    def save(self, path) -> None:
        wp = self.wordpiece
        _write_json(path, {"type": self.type_name, "version": FORMAT_VERSION, "vocab": wp.vocab_tokens,
                           "options": {name: getattr(wp, name) for name in _OPTIONS}})

    @classmethod
    def load(cls, path) -> "WordPieceStream":
        obj = _read_json(path, cls.type_name)
        vocab, options = obj.get("vocab"), obj.get("options")
        if not isinstance(vocab, list) or not isinstance(options, dict) or set(options) - set(_OPTIONS):
            raise ValueError(f"{path}: a wordpiece tokenizer file needs a 'vocab' list and an 'options' object "
                             f"with keys among {list(_OPTIONS)}")
        try:
            return cls(WordPieceTokenizer(vocab, **options, source=str(path)))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None

    def __eq__(self, other):
        return isinstance(other, WordPieceStream) and self.wordpiece == other.wordpiece

    def __repr__(self):
        return f"WordPieceStream({self.wordpiece!r})"


TOKENIZERS[WordPieceStream.type_name] = WordPieceStream
