"""SIGINT / SIGTERM during a run: :class:`Interrupts` turns the first into a stop after the
current step and the second into an exit; :class:`RunInterrupted` is what the run raises."""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .run_result import RunResult


class RunInterrupted(Exception):
    """A run stopped by SIGINT / SIGTERM after checkpointing; ``result`` (a :class:`RunResult`)
    has ``status: interrupted``."""

    def __init__(self, signum: int, out: Path | None, result: RunResult):
        self.signum, self.out, self.result = signum, out, result
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


class Interrupts:
    """SIGINT / SIGTERM while a run is in progress: the first asks the loop to stop after the
    current step; the second exits the process at once (the last checkpoint is on disk).

    Python runs signal handlers in the main thread between bytecodes, so during a long
    forward pass a handler waits, and two signals in that time coalesce into one call. The
    signals are therefore read from Python's wakeup fd (one byte per delivery, written by
    the C-level handler at once) by a watcher thread, which can exit while the main thread
    is still inside torch."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    THEN = {  # what the first signal does, by phase (the engine sets ``phase``) and whether there is a run folder
        ("train", True): "stopping after the current step",
        ("train", False): "stopping after the current step",
        ("test", True): "stopping the test evaluation after its current batch; training is saved, rerun the command "
                        "to evaluate",
        ("test", False): "stopping the test evaluation after its current batch; nothing is saved (no --out)",
    }

    def __init__(self, where: Path | None):
        self.where, self.signum = where, None
        self.phase = "train"
        self._old: dict = {}
        self._pipe: tuple[int, int] | None = None

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach the main thread only; a run in a thread is not interrupted
        r, w = os.pipe()
        os.set_blocking(w, False)
        self._pipe = (r, w)
        self._old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        threading.Thread(target=self._watch, args=(r,), daemon=True, name="bbpt-signals").start()
        return self

    def __exit__(self, *exc):
        if self._pipe is None:
            return
        signal.set_wakeup_fd(self._old_fd)
        for s, h in self._old.items():
            signal.signal(s, h)
        os.close(self._pipe[1])  # the watcher reads EOF and ends; it closes the read end

    def _handle(self, signum, frame) -> None:
        """The main thread's handler: marks the stop at once (the watcher may read later)."""
        if self.signum is None:
            self.signum = signum

    def _watch(self, r: int) -> None:
        seen = 0
        try:
            while True:
                b = os.read(r, 1)
                if not b:
                    return
                signum = b[0]
                if signum not in self.SIGNALS:
                    continue
                seen += 1
                name = signal.Signals(signum).name
                if seen == 1:
                    if self.signum is None:
                        self.signum = signum
                    os.write(2, f"\n{name}: {self.THEN[self.phase, self.where is not None]} (again to exit at once)\n".encode())
                    continue
                saved = f"; the last checkpoint is in {self.where}, rerun the command to resume" if self.where else ""
                os.write(2, f"\n{name} again: exiting now{saved}\n".encode())
                os._exit(128 + signum)
        finally:
            os.close(r)
