"""The loss floor a pretraining run on the built-in toy language is measured against.

The toy language's exact entropy (data/corpus.py) bounds what any model can reach, in one of two units:

    per character   a causal LM on characters (or byte-level BPE): ToyLanguage.entropy_rate(), the val
                    loss divided by the characters per token compared with it; on characters also
                    ToyLanguage.context_floor(block_size), the floor with block_size characters in view
    per token       WordPiece tokens drop the case and the line breaks, so they are not the text itself:
                    a causal LM's floor is ToyLanguage.token_entropy(as_wordpiece=True), a masked LM's
                    ToyLanguage.masked_floor() (one hidden token given all the others)

On a --data corpus the entropy is unknown and there is no floor (every field None).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data import ToyLanguage


@dataclass(frozen=True)
class Floors:
    per_char: float = None              # nats/char, the loss per token divided by chars_per_token
    per_token: float = None             # nats/token, compared with the loss itself
    context: float = None               # nats/char with block_size characters of context (characters only)
    masked: bool = False                # per_token is a masked LM's

    @classmethod
    def of_run(cls, model: str, tokenizer: str, block_size: int, builtin: bool) -> "Floors":
        """The floors of a run of `model` ("bert" is masked, the others causal) on `tokenizer`'s tokens;
        none unless the data is the built-in language."""
        if not builtin:
            return cls()
        lang = ToyLanguage(seed=0)
        if tokenizer == "wordpiece":
            if model == "bert":
                return cls(per_token=lang.masked_floor(), masked=True)
            return cls(per_token=lang.token_entropy(as_wordpiece=True))
        return cls(per_char=lang.entropy_rate(),
                   context=lang.context_floor(block_size) if tokenizer == "char" and model != "bert" else None)

    @property
    def value(self) -> float:
        """The floor in its own unit (None without one)."""
        return self.per_token if self.per_token is not None else self.per_char

    def describe(self, block_size: int) -> str:
        """The model line's part: "; entropy floor 1.2345 nats/char (...)" or "" without a floor."""
        if self.per_token is not None:
            return f"; {'masked-token' if self.masked else 'entropy'} floor {self.per_token:.4f} nats/token"
        if self.per_char is None:
            return ""
        return (f"; entropy floor {self.per_char:.4f} nats/char"
                + (f" ({self.context:.4f} with {block_size} characters of context)" if self.context else ""))

    def gap_percent(self, loss: float, chars_per_token: float) -> float:
        """How far `loss` (nats/token) lies above the floor, in percent of it."""
        per_unit = loss if self.per_token is not None else loss / chars_per_token
        return 100 * (per_unit / self.value - 1)

    def eval_suffix(self, loss: float, chars_per_token: float) -> str:
        """An evaluation line's part: " (floor 1.2345, gap 6.7%)" or ""."""
        if self.value is None:
            return ""
        return f" (floor {self.value:.4f}, gap {self.gap_percent(loss, chars_per_token):.1f}%)"

    def done_suffix(self, loss: float, chars_per_token: float) -> str:
        """The last line's part: " nats/char vs entropy floor 1.2345 (+6.7%)" or ""."""
        if self.value is None:
            return ""
        unit = "token" if self.per_token is not None else "char"
        return (f" nats/{unit} vs {'entropy ' * (self.per_token is None)}floor {self.value:.4f} "
                f"({self.gap_percent(loss, chars_per_token):+.1f}%)")
