"""Ctrl-C and SIGTERM that save: a training loop finishes its step, writes a checkpoint, then stops.

    with GracefulStop() as stop:
        while step < max_iters:
            ...one step...
            if stop.requested:
                save(step)
                raise stop.interrupted(step, out)     # the CLI prints it and exits 128 + signal

The first SIGINT or SIGTERM only sets ``stop.requested`` (and says so on stderr); the step in
flight runs to its end. A second one raises ``StopNow`` (a KeyboardInterrupt) wherever the
program is: inside a checkpoint write that leaves the previous checkpoint (the write goes to a
temporary directory that is renamed into place only when complete), so either the new
checkpoint or the previous one is there, never a broken one. Worker processes ignore SIGINT
(a terminal sends it to the whole process group); only the main process decides.

Handlers can only be installed from the main thread; elsewhere ``GracefulStop`` does nothing
and signals keep their usual effect.
"""

from __future__ import annotations

import signal
import sys
import threading

NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}


class StopNow(KeyboardInterrupt):
    """A second signal: stop at once. ``signum`` tells the exit status (128 + signum)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by a second {NAMES.get(signum, signum)}")
        self.signum = signum


class Interrupted(Exception):
    """A run stopped by a signal after saving `step` to `out`; exit status 128 + signum."""

    def __init__(self, signum: int, step: int, out: str):
        self.signum, self.step, self.out = signum, step, out
        super().__init__(f"saved step {step} to {out}; continue with --resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class GracefulStop:
    """Context manager: turns the first SIGINT/SIGTERM into a request, the second into StopNow."""

    def __init__(self, stream=None):
        self.stream = stream
        self.signum = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def interrupted(self, step: int, out: str) -> Interrupted:
        return Interrupted(self.signum, step, out)

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise StopNow(signum)
        self.signum = signum
        stream = self.stream or sys.stderr
        again = "press Ctrl-C again" if signum == signal.SIGINT else "send it again"
        stream.write(f"\nnpformer: {NAMES.get(signum, signum)}: finishing this step, then saving a checkpoint "
                     f"({again} to stop at once)\n")
        stream.flush()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in NAMES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
