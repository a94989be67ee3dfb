"""Experiment tracking: each run's curve, configuration and final accuracy, for TensorBoard
(always, into ``RUN/tb/``) and Weights & Biases (``--logger wandb``, offline, into ``RUN/wandb/``).

What is logged, at ``global_step`` = the budget units spent (``api_calls`` or
``prompt_evals``, the curve's x axis; steps for a method without a budget):

- ``curve/val_accuracy``, ``curve/val_loss``, ``curve/train_loss``, ``curve/api_calls``,
  ``curve/prompt_evals`` at every curve point (the points of ``result.json``'s ``curve``; the
  validation loss is the tracker's only extra);
- ``final/test_accuracy``, ``final/test_loss``, ``final/val_accuracy`` once, when the run finishes;
- the configuration (run fields and resolved method options, flattened: ``options.budget``)
  as TensorBoard hparams / W&B config, with ``hparams/test_accuracy`` as its metric.

Trackers observe and never decide: the run's identity, hash and outputs do not depend on them.
A resumed run writes only the points after its checkpoint, in a new event file that starts
with a purge step, so points a killed process wrote after its last checkpoint are dropped.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from .errors import BadInput

logger = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "wandb", "none")
DEFAULT_TRACKERS = ["tensorboard"]
TB_DIR, WANDB_DIR = "tb", "wandb"  # in the run folder
METRIC = "hparams/test_accuracy"


def flat_hparams(config: dict, prefix: str = "") -> dict:
    """A nested configuration as flat ``a.b`` keys with values TensorBoard's hparams accept
    (bool, int, float, str): None is "none", lists and other values are their JSON."""
    out: dict = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_hparams(v, key + "."))
        elif v is None:
            out[key] = "none"
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = json.dumps(v, default=str)
    return out


def check(names: list[str]) -> list[str]:
    """The trackers to open: ``none`` alone turns tracking off; an unknown name is refused."""
    bad = [n for n in names if n not in TRACKERS]
    if bad:
        raise BadInput(f"--logger {bad[0]!r} is not a tracker; use {', '.join(TRACKERS)}")
    if "none" in names and len(names) > 1:
        raise BadInput(f"--logger none turns tracking off; do not combine it with {', '.join(n for n in names if n != 'none')}")
    return [n for n in dict.fromkeys(names) if n != "none"]


class _TensorBoard:
    def __init__(self, logdir: Path, purge_step: int | None):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise BadInput("TensorBoard logging needs tensorboardX: pip install tensorboardX (or run with --logger none)"
                           ) from None
        # tensorboardX names files by the second: a suffix keeps two sessions in one second apart, in order
        self.w = SummaryWriter(str(logdir), purge_step=purge_step, flush_secs=30, filename_suffix=f".{time.time_ns()}")

    def scalars(self, step: int, values: dict) -> None:
        for k, v in values.items():
            self.w.add_scalar(k, v, step)
        self.w.flush()  # a run killed at any moment keeps what it logged

    def config(self, step: int, hparams: dict, metrics: dict) -> None:
        from tensorboardX.summary import hparams as hparams_summaries

        fw = self.w._get_file_writer()  # into this run's own event file, not a sub-run (add_hparams makes one)
        for s in hparams_summaries(hparams, metrics):
            fw.add_summary(s, step)
        self.scalars(step, metrics)

    def close(self) -> None:
        self.w.close()


class _WandB:
    def __init__(self, folder: Path, name: str, hparams: dict):
        try:
            import wandb
        except ImportError:
            raise BadInput("--logger wandb needs the wandb package: pip install 'bbpt[trackers]'") from None
        (folder / WANDB_DIR).mkdir(exist_ok=True)
        was = os.environ.get("WANDB_MODE")
        os.environ["WANDB_MODE"] = "offline"  # never online: `wandb sync RUN/wandb/offline-run-*` uploads
        try:
            self.run = wandb.init(project="bbpt", name=name, dir=str(folder), config=hparams, mode="offline",
                                  settings=wandb.Settings(silent=True, console="off", disable_git=True, save_code=False))
        finally:
            if was is None:
                os.environ.pop("WANDB_MODE", None)
            else:
                os.environ["WANDB_MODE"] = was

    def scalars(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def config(self, step: int, hparams: dict, metrics: dict) -> None:
        self.run.summary.update(metrics)

    def close(self) -> None:
        self.run.finish()


class Tracker:
    """What a run tells its trackers: :meth:`point` at every new curve point, :meth:`finish`
    with the result, :meth:`close` always. Without a run folder or with ``none``, nothing."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    @classmethod
    def open(cls, names: list[str], folder: Path | None, config: dict, name: str,
             resumed_at: int | None = None) -> "Tracker":
        """``resumed_at``: the step of a resumed run's checkpoint (-1: none was written yet;
        None: a new run). Every point is logged before the checkpoint that follows it, so what
        an earlier session logged after ``resumed_at`` is what its checkpoint lost: purged."""
        names = check(names)
        if folder is None or not names:
            return cls([])
        purge = None if resumed_at is None else resumed_at + 1
        sinks = []
        try:
            for n in names:
                sinks.append(_TensorBoard(folder / TB_DIR, purge) if n == "tensorboard"
                             else _WandB(folder, name, flat_hparams(config)))
        except BaseException:
            for s in sinks:
                s.close()
            raise
        logger.debug("tracking %s into %s", ", ".join(names), folder)
        return cls(sinks)

    def point(self, step: int, point: dict, val_loss: float | None = None) -> None:
        values = {f"curve/{k}": v for k, v in point.items() if isinstance(v, (int, float))}
        if val_loss is not None:
            values["curve/val_loss"] = val_loss
        for s in self.sinks:
            s.scalars(step, values)

    def finish(self, step: int, result: dict, test_loss: float | None = None) -> None:
        acc = result["accuracy"]
        final = {"final/test_accuracy": acc["test"], "final/val_accuracy": acc["val"], "final/test_loss": test_loss}
        final = {k: v for k, v in final.items() if v is not None}
        hparams = flat_hparams(result["config"])
        for s in self.sinks:
            s.scalars(step, final)
            s.config(step, hparams, {METRIC: acc["test"]})

    def close(self) -> None:
        for s in self.sinks:
            try:
                s.close()
            except Exception as e:  # noqa: BLE001 -- a tracker failing to close must not lose the run
                logger.warning("could not close the %s tracker: %s", type(s).__name__.strip("_"), e)
        self.sinks = []
