"""The step loop of one run: step until done or out of budget, record the curve, checkpoint,
evaluate the test split once, write the outputs.

:func:`bbpt.engine.build_run` builds a :class:`Loop` from a :class:`~bbpt.config.RunConfig`
(task data, black boxes, meters, method); :func:`bbpt.engine.run` restores it from a
checkpoint where there is one and calls :meth:`Loop.run`. What a checkpoint holds of the
loop itself is :class:`LoopState`.
"""
from __future__ import annotations

import json
import signal
import time
from typing import Any, Callable

from .errors import BudgetExhausted, CorruptCheckpoint, excerpt
from .evaluation import evaluate
from .methods.base import Budget
from .progress import Progress
from .results import write_outputs
from .run_result import RunResult
from .runfolder import CHECKPOINT, RunFolder, config_diff
from .signals import Interrupts, RunInterrupted
from .state import global_rng_state, set_global_rng_state
from .tracking import Tracker

CHECKPOINT_SECONDS = 60.0
TEST_SUBSET_SEED = 0  # the same subset for every method and seed, so quick looks compare


class LoopState:
    """The loop's own state, saved in every checkpoint."""

    def __init__(self, every: int):
        self.curve: list[dict] = []
        self.steps, self.next_eval, self.every = 0, every, every
        self.last_loss: float | None = None
        self.stopped_by: str | None = None  # budget | key_budget | done | max_steps: training is over
        self.stop_details: dict = {}  # what the stop adds to the result (a server key's counts)
        self.elapsed = 0.0  # wall seconds of earlier sessions of this run

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, s: dict) -> None:
        vars(self).update(s)


class Loop:
    """One run, built (:func:`bbpt.engine.build_run`) and ready to step: its method, its
    training and evaluation boxes and meters, its data, and its :class:`LoopState`.

    ``folder`` (a locked :class:`RunFolder`, or None) receives checkpoints and outputs;
    ``log`` one-line notices; ``on_step(steps, stats)`` is called after every step."""

    def __init__(self, cfg, cls, mcfg, config: dict, *, task, test, data, val_data, unit: str, meter, box, eval_box,
                 env, method, folder: RunFolder | None = None, progress: bool = True,
                 log: Callable[[str], None] = print, on_step: Callable[[int, dict], None] | None = None,
                 t0: float | None = None):
        self.cfg, self.cls, self.mcfg, self.config = cfg, cls, mcfg, config
        self.task, self.test, self.data, self.val_data = task, test, data, val_data
        self.unit, self.meter, self.box, self.eval_box, self.env, self.method = unit, meter, box, eval_box, env, method
        self.folder, self.progress, self.log, self.on_step = folder, progress, log, on_step
        self.t0 = time.time() if t0 is None else t0
        self.total = mcfg.budget or (method.total_steps() or 0)
        self.state = LoopState(cfg.eval_every or max(1, self.total // 20))
        self.bar: Progress | None = None
        self.tracker: Tracker | None = None
        self._restored = False  # a checkpoint was loaded (restore)
        self._prior = 0.0  # wall seconds of earlier sessions (set when the loop starts)
        self._last_save = time.time()

    # ---- what the loop reads ----------------------------------------------------------------------
    def meters(self) -> dict[str, Any]:
        return {"train": self.meter, "eval": self.eval_box.meter, "side": self.env.side_meter}

    def done(self) -> int:
        """Progress in the run's unit: the budget spent, or steps for a budget-free method."""
        return self.meter.counts[self.unit] if self.mcfg.budget else self.state.steps

    # ---- checkpoints --------------------------------------------------------------------------------
    def restore(self, ckpt: dict) -> None:
        """Load a checkpoint into the run, or refuse in one line: one written by another run
        (its configuration differs) or one that does not fit this method's state."""
        config, folder = self.config, self.folder
        where = folder.file(CHECKPOINT)
        as_stored = lambda c: json.loads(json.dumps(c))  # noqa: E731 -- tuples are lists in JSON
        diff = config_diff(as_stored(ckpt["config"]), as_stored(config)) if "config" in ckpt else []
        if diff:
            shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
            raise CorruptCheckpoint(f"checkpoint {where} belongs to another run ({shown}); pass --force to start this "
                                    "run afresh, or choose another --out")
        try:
            self.method.load_state_dict(ckpt["method"])
            self.state.load_state_dict(ckpt["loop"])
            if ckpt["meters"].get("side") is not None and self.env.side_meter is None:
                self.env.side_box()  # created on demand by the first run: create it before restoring its counts
            for k, m in self.meters().items():
                if ckpt["meters"].get(k) is not None:
                    m.load_state_dict(ckpt["meters"][k])
            set_global_rng_state(ckpt["rng"])
            self._restored = True
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as e:
            raise CorruptCheckpoint(f"checkpoint {where} does not fit this {config['method']} run ({type(e).__name__}: "
                                    f"{excerpt(e, 80)}); it was written by another run or another bbpt: pass --force "
                                    "to start afresh") from None

    def checkpoint(self) -> None:
        if self.folder is not None:
            self.state.elapsed = self._prior + time.time() - self.t0
            self.folder.save_checkpoint({"method": self.method.state_dict(), "loop": self.state.state_dict(),
                                         "rng": global_rng_state(),
                                         "meters": {k: m.state_dict() if m else None for k, m in self.meters().items()},
                                         "config": self.config})
        self._last_save = time.time()

    # ---- the curve and the result ---------------------------------------------------------------------
    def add_point(self) -> None:
        cfg, st = self.cfg, self.state
        if st.last_loss is None:  # a method that has not trained yet: its loss on the train set, uncounted
            st.last_loss = evaluate(self.method, self.eval_box, self.data, cfg.eval_batch, "train", self.progress,
                                    cache=True)["loss"]
        v = evaluate(self.method, self.eval_box, self.val_data, cfg.eval_batch, "val", self.progress, cache=True)
        point = {"api_calls": self.meter.counts["api_calls"], "prompt_evals": self.meter.counts["prompt_evals"],
                 "train_loss": st.last_loss, "val_accuracy": v["accuracy"]}
        st.curve.append(point)
        self.bar.point(self.done(), point)
        self.tracker.point(self.done(), point, v["loss"])

    def result(self, status: str, test_r: dict | None) -> RunResult:
        cfg, st, side, unit, budget = self.cfg, self.state, self.env.side_meter, self.unit, self.mcfg.budget
        return RunResult.from_dict({
            "method": cfg.method, "dataset": self.task.name,
            "model": cfg.model if cfg.pretrained is None else f"{cfg.model}:{cfg.pretrained}",
            "shots": cfg.shots, "seed": cfg.seed, "status": status, "stopped_by": st.stopped_by, **st.stop_details,
            "steps": st.steps,
            "black_box": self.cls.black_box,
            "budget": {unit: budget} if unit == "api_calls" else {"api_calls": None, unit: budget},
            "queries": self.meter.counts,
            **({"aux_queries": side.counts, "queries_total": _summed(self.meter.counts, side.counts)}
               if side is not None else {}),
            "eval_queries": self.eval_box.meter.counts,
            "accuracy": {"test": None if test_r is None else test_r["accuracy"],
                         "val": st.curve[-1]["val_accuracy"] if st.curve else None},
            **({"test_subset": {"n": len(self.test), "of": len(self.task.test), "seed": TEST_SUBSET_SEED,
                                "comparable_to_full_test": False}} if cfg.test_subset is not None else {}),
            "curve": st.curve,
            "wall_seconds": round(self._prior + time.time() - self.t0, 2),
            "config": self.config,
        })

    def write(self, r: RunResult) -> None:
        if self.folder is not None:
            write_outputs(self.folder.path, r.to_dict(), self.method)

    def interrupted(self, signum: int, save: bool = True) -> RunInterrupted:
        if save:  # not during the test split: the checkpoint before it is current, its meters included
            self.checkpoint()
        r = self.result("interrupted", None)
        self.write(r)
        return RunInterrupted(signum, self.folder.path if self.folder else None, r)

    # ---- the loop ------------------------------------------------------------------------------------------
    def step(self, budget: Budget) -> bool:
        """One method step and what follows it (curve point, checkpoint); False when training is over."""
        cfg, st, meter, unit = self.cfg, self.state, self.meter, self.unit
        if cfg.max_steps is not None and st.steps >= cfg.max_steps:
            st.stopped_by = "max_steps"
            return False
        try:
            stats = self.method.step(budget)
        except BudgetExhausted as e:
            if meter.counts[unit] == 0:  # not even one step fits: the budget is unusable
                raise e from None
            st.stopped_by, st.stop_details = e.stopped_by, e.details()
            if e.stopped_by != BudgetExhausted.stopped_by:  # not the run's own budget: say whose
                self.log(f"training stopped after {meter.counts[unit]} {unit} (stopped_by: {e.stopped_by}): {e}")
            return False
        if stats is None:
            st.stopped_by = "done"
            return False
        st.steps += 1
        st.last_loss = stats.get("train_loss", st.last_loss)
        self.bar.update(self.done(), st.last_loss)
        if self.done() >= st.next_eval:
            self.add_point()
            st.next_eval = self.done() + st.every
            self.checkpoint()
        elif time.time() - self._last_save >= CHECKPOINT_SECONDS:
            self.checkpoint()
        if self.on_step is not None:
            self.on_step(st.steps, stats)
        return True

    def run(self, resumed: bool = False) -> RunResult:
        """Train until done, out of budget or stopped, then evaluate the test split once;
        returns the result (written to the folder). A signal raises :class:`RunInterrupted`.
        ``resumed``: the folder held this run unfinished (its trackers purge what the last
        session logged after its checkpoint)."""
        cfg, st, meter, folder = self.cfg, self.state, self.meter, self.folder
        self._prior, self._last_save = st.elapsed, time.time()
        budget = Budget.of(meter, self.unit, self.mcfg.budget)
        self.tracker = Tracker.open(cfg.loggers, folder.path if folder else None, self.config,
                                    f"{cfg.method} on {self.task.name} seed {cfg.seed}",
                                    resumed_at=None if not resumed else self.done() if self._restored else -1)
        self.bar = Progress(self.progress, f"{cfg.method} on {self.task.name}", self.total,
                            self.unit if self.mcfg.budget else "step", self.done())
        with Interrupts(folder.path if folder else None) as stop:
            try:
                if not st.curve:
                    self.add_point()  # the starting point (api_calls = 0)
                    self.checkpoint()
                while st.stopped_by is None:
                    if stop.signum is not None:
                        raise self.interrupted(stop.signum)
                    if not self.step(budget):
                        break
                last = st.curve[-1]
                if (last["api_calls"], last["prompt_evals"]) != (meter.counts["api_calls"], meter.counts["prompt_evals"]):
                    self.add_point()  # the end point
                self.checkpoint()  # training is over: a resumed run goes straight to the test split
                if stop.signum is not None:
                    raise self.interrupted(stop.signum, save=False)
                stop.phase = "test"
                test_r = evaluate(self.method, self.eval_box, self.test, cfg.eval_batch, "test", self.progress,
                                  should_stop=lambda: stop.signum is not None)
                if test_r.get("stopped"):
                    raise self.interrupted(stop.signum, save=False)
                r = self.result("finished", test_r)
                self.write(r)
                self.tracker.finish(self.done(), r, test_r["loss"])
                if stop.signum is not None:  # it came during the last batch: nothing was left to stop
                    where = f"its result is in {folder.path}" if folder is not None else "nothing is saved (no --out)"
                    self.log(f"{signal.Signals(stop.signum).name} came during the test evaluation's last batch: the "
                             f"run finished; {where}")
            finally:
                self.bar.close()
                self.tracker.close()
        return r


def _summed(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) + b.get(k, 0) for k in {**a, **b}}
