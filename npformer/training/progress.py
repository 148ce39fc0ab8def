"""A dependency-free progress bar: step count, loss, learning rate, tokens/s and ETA.

On a terminal it redraws one line; otherwise (logs, CI) it prints a plain line
every `every` steps so output stays readable.
"""

from __future__ import annotations

import sys
import time


def format_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class ProgressBar:
    """progress = ProgressBar(total, start=0); progress.update(step, loss=..., lr=..., tokens=...)."""

    def __init__(self, total: int, start: int = 0, stream=None, width: int = 24, every: int = 50):
        self.total, self.start = total, start
        self.stream = stream or sys.stderr
        self.width, self.every = width, every
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, step: int, loss: float, lr: float, tokens: int) -> None:
        """Report that `step` (1-based count of finished steps) is done; `tokens` processed in it."""
        self.tokens += tokens
        elapsed = time.perf_counter() - self.t0
        done = step - self.start
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        frac = step / self.total if self.total else 1.0
        filled = int(self.width * frac)
        bar = "#" * filled + "." * (self.width - filled)
        line = (f"[{bar}] {step}/{self.total} loss {loss:.4f} lr {lr:.2e} "
                f"{rate:,.0f} tok/s eta {format_seconds(eta)}")
        if self.tty:
            self.stream.write("\r" + line)
            if step >= self.total:
                self.stream.write("\n")
        elif step % self.every == 0 or step >= self.total or step == self.start + 1:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """Print a line without breaking the bar."""
        self.stream.write(("\r\x1b[K" if self.tty else "") + text + "\n")
        self.stream.flush()
