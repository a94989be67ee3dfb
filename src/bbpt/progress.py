"""Progress of long work: a live bar on a terminal; off a terminal (a pipe, a log file), one
plain line per curve point and nothing else, so a log never holds a line written twice."""
from __future__ import annotations

import sys
import time


def is_terminal(stream=None) -> bool:
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


class Progress:
    def __init__(self, enabled: bool, desc: str, total: int, unit: str, done: int = 0, stream=None):
        self.stream = stream or sys.stderr
        self.enabled, self.desc, self.total, self.unit = enabled, desc, total, unit
        self.tty = enabled and is_terminal(self.stream)
        self.t0 = time.time()
        self.bar = None
        if self.tty and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)

    def update(self, done: int, loss: float | None) -> None:
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix(loss=f"{loss:.3f}" if loss is not None else "-", refresh=False)
            self.bar.refresh()

    def point(self, done: int, point: dict) -> None:
        """One curve point: a plain line when not on a terminal."""
        if not self.enabled or self.tty:
            return
        of = f"/{self.total} {self.unit} ({100 * done / self.total:.0f}%)" if self.total else f" {self.unit}"
        loss = point.get("train_loss")
        loss_s = f"train_loss {loss:.4f}" if isinstance(loss, float) else "train_loss -"
        print(f"{self.desc}: {done}{of}  {loss_s}  val_acc {100 * point['val_accuracy']:.2f}%  "
              f"{time.time() - self.t0:.1f}s", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def eval_bar(enabled: bool, total: int, desc: str):
    """A transient bar over evaluation batches, on a terminal only."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, unit="img", disable=not (enabled and is_terminal()))
