"""The one loop every method runs in: build, step until done or out of budget, evaluate, write.

Training queries go through a budgeted :class:`QueryMeter`; validation and test queries go
through a separate evaluation meter, reported apart and never charged to the budget (the
papers do not count evaluation). Model selection, where a method does any, sees validation
data only; the test split is queried once, at the end.

A run survives its process. With an output folder (:mod:`bbpt.runfolder`) it checkpoints
atomically at every curve point and at least every ``CHECKPOINT_SECONDS``: the method's
whole state (:meth:`Method.state_dict`, RNGs included), the loop's own (curve, steps, next
evaluation, last loss), the global RNGs and every meter. Rerun with the same configuration
and ``--out``, it resumes bit-exactly. SIGINT / SIGTERM finish the current step, checkpoint,
write ``result.json`` with ``status: interrupted`` and raise :class:`RunInterrupted`; a
second signal exits at once, the last checkpoint already on disk.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .config import (LATE_FIELDS, MAX_SEED, RunConfig, identity, load_config_file,  # noqa: F401  (re-exported)
                     make_run_config)
from .data import check_images, fewshot_split, load_task, stratified_subset, subsample_classes
from .data.core import ImageSet
from .data.staging import FewShotData
from .data.views import TrainViews, ViewSpec
from .errors import BadInput, BBPTError, BudgetExhausted, CorruptCheckpoint, excerpt
from .methods import METHODS, make_config
from .methods.base import Budget, Env
from .models import BlackBox, BlackBoxAPI, Images, QueryMeter, create_backbone
from .progress import Progress, eval_bar
from .results import write_outputs
from .runfolder import CHECKPOINT, RunFolder, config_diff
from .state import global_rng_state, set_global_rng_state
from .tracking import Tracker

CHECKPOINT_SECONDS = 60.0
TEST_SUBSET_SEED = 0  # the same subset for every method and seed, so quick looks compare

logger = logging.getLogger(__name__)


def set_seed(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class RunInterrupted(Exception):
    """A run stopped by SIGINT / SIGTERM after checkpointing; ``result`` has ``status: interrupted``."""

    def __init__(self, signum: int, out: Path | None, result: dict):
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


@torch.no_grad()
def evaluate(method, box: BlackBoxAPI, images: ImageSet | FewShotData, batch: int, desc: str = "eval",
             progress: bool = True, should_stop: Callable[[], bool] | None = None, cache: bool = False) -> dict:
    """Accuracy and mean cross-entropy of ``method.predict`` (or any ``predict(box, images)``)
    on ``images``, through ``box`` (an evaluation meter, not the training budget). Streams
    the images ``batch`` at a time and, unless ``cache`` (the few-shot val set, evaluated at
    every curve point), sends them without cache keys: memory stays flat in the split's size."""
    data = images if isinstance(images, FewShotData) else FewShotData(images, box.image_size, preload=False)
    correct, loss, n = 0, 0.0, len(data)
    with eval_bar(progress and n > batch, n, desc) as bar:
        for i in range(0, n, batch):
            if should_stop is not None and should_stop():
                return {"accuracy": None, "loss": None, "stopped": True}
            idx = np.arange(i, min(i + batch, n))
            imgs = data.images(idx)
            logits = method.predict(box, imgs if cache else Images(imgs.pixels))  # (B, C)
            y = data.labels[idx]
            correct += int((logits.argmax(-1) == y).sum())
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            bar.update(len(idx))
    return {"accuracy": correct / max(n, 1), "loss": loss / max(n, 1)}


class _Loop:
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


def run(cfg: RunConfig, out: str | Path | None = None, progress: bool = True, force: bool = False,
        keep_finished: bool = False, log: Callable[[str], None] | None = None,
        on_step: Callable[[int, dict], None] | None = None, key_file: str | None = None) -> dict:
    """Run one method on one task; returns the result dict (also written to ``out``).

    ``out`` holding an unfinished run of the same configuration resumes it; ``force``
    replaces what ``out`` holds; ``keep_finished`` returns a finished run of the same
    configuration instead of refusing (protocols and sweeps). ``log`` receives one-line
    notices (resuming, interrupted), else the ``bbpt.engine`` logger at INFO; ``on_step(steps,
    stats)`` is called after every step. The run's trackers (``cfg.loggers``) write into ``out``.
    ``key_file``: a file holding the box's API key (else its environment variable or the keys
    file, :mod:`bbpt.boxes.keys`). A method the box cannot serve is refused before anything.
    """
    t0 = time.time()
    log = log or logger.info
    cls = METHODS.get(cfg.method)
    mcfg = cls.resolve_config(make_config(cls, cfg.options), cfg.shots)
    check_box(cfg, cls)
    config = {**identity(cfg), "options": mcfg.model_dump()}
    folder = RunFolder(out) if out is not None else None
    try:
        if folder is not None:
            folder.lock()  # an existing folder: held before it is read (a new one is locked at its start)
        mode = folder.check(config, force=force, keep_finished=keep_finished) if folder else "new"
        if mode == "finished":
            return folder.result()
        if mode == "resume":
            folder.clean_temp()  # what a killed write left
        ckpt = folder.load_checkpoint() if mode == "resume" else None
        return _run(cfg, cls, mcfg, config, folder, mode, ckpt, t0, progress, log, on_step, force, key_file)
    finally:
        if folder is not None:
            folder.unlock()


@contextlib.contextmanager
def _discard_unless_spent(folder: RunFolder | None, mode: str, meters: Callable[[], list]):
    """A new run that fails (bad input, an unusable budget) before spending a query leaves
    its folder as it found it; one that spent queries keeps its checkpoint, to resume."""
    try:
        yield
    except BBPTError:
        if folder is not None and mode == "new" and not any(m is not None and any(m.counts.values()) for m in meters()):
            folder.abandon()
        raise


def _run(cfg, cls, mcfg, config, folder, mode, ckpt, t0, progress, log, on_step, force, key_file=None) -> dict:
    set_seed(cfg.seed)
    task = subsample_classes(load_task(cfg.dataset), cfg.classes)
    train, val = fewshot_split(task, cfg.shots, cfg.seed)
    test = task.test if cfg.test_subset is None else stratified_subset(task.test, cfg.test_subset, TEST_SUBSET_SEED)
    for split, images in (("train", train), ("val", val), ("test", test)):  # before any query is spent
        check_images(images, split, progress=progress)
    unit = cls.unit(mcfg)
    meter = QueryMeter({unit: mcfg.budget} if mcfg.budget is not None else {}, cfg.max_images_per_call)
    box = _open_box(cfg, task.classnames, meter, key_file)
    eval_box = box.for_classes(task.classnames, QueryMeter(max_images_per_call=cfg.max_images_per_call), "eval")
    data = FewShotData(train, box.image_size, views=train_views(mcfg, task, train, box.image_size, cfg.seed))
    for chunk in data.chunks(box.encode_chunk):  # features of the few-shot set once, in a fixed order
        box.upload(chunk)
    if cls.cached_images:
        data.attach(box)  # training views: uploaded in fixed blocks as they are first drawn
    val_data = FewShotData(val, box.image_size)
    env = Env(box, data, {"name": task.name, "classnames": task.classnames, "templates": task.templates},
              cfg.seed, cls, white_box=lambda: box.white_box(meter), val=val_data)
    method = cls(mcfg, env)
    if folder is not None and mode == "new":
        folder.start(config, force)  # everything loaded: now the folder is this run's (checked again)
    with _discard_unless_spent(folder, mode, lambda: [meter, env.side_meter]):
        total = mcfg.budget or (method.total_steps() or 0)
        loop = _Loop(cfg.eval_every or max(1, total // 20))
        meters = lambda: {"train": meter, "eval": eval_box.meter, "side": env.side_meter}  # noqa: E731
        if ckpt is not None:
            _restore(ckpt, config, folder, method, loop, env, meters)
            log(f"resuming {folder.path}: {cfg.method} on {task.name} from its checkpoint at step {loop.steps} "
                f"({meter.counts[unit]} {unit} spent)")
        elif mode == "resume":
            log(f"resuming {folder.path}: no checkpoint was written yet, starting the run from step 0")

        def checkpoint() -> None:
            nonlocal last_save
            if folder is not None:
                loop.elapsed = prior + time.time() - t0
                folder.save_checkpoint({"method": method.state_dict(), "loop": loop.state_dict(), "rng": global_rng_state(),
                                        "meters": {k: m.state_dict() if m else None for k, m in meters().items()},
                                        "config": config})
            last_save = time.time()

        def done() -> int:
            return meter.counts[unit] if mcfg.budget else loop.steps

        def add_point() -> None:
            if loop.last_loss is None:  # a method that has not trained yet: its loss on the train set, uncounted
                loop.last_loss = evaluate(method, eval_box, data, cfg.eval_batch, "train", progress, cache=True)["loss"]
            v = evaluate(method, eval_box, val_data, cfg.eval_batch, "val", progress, cache=True)
            point = {"api_calls": meter.counts["api_calls"], "prompt_evals": meter.counts["prompt_evals"],
                     "train_loss": loop.last_loss, "val_accuracy": v["accuracy"]}
            loop.curve.append(point)
            bar.point(done(), point)
            tracker.point(done(), point, v["loss"])

        def result(status: str, test_r: dict | None) -> dict:
            side = env.side_meter
            return {
                "method": cfg.method, "dataset": task.name,
                "model": cfg.model if cfg.pretrained is None else f"{cfg.model}:{cfg.pretrained}",
                "shots": cfg.shots, "seed": cfg.seed, "status": status, "stopped_by": loop.stopped_by, **loop.stop_details,
                "steps": loop.steps,
                "black_box": cls.black_box,
                "budget": {unit: mcfg.budget} if unit == "api_calls" else {"api_calls": None, unit: mcfg.budget},
                "queries": meter.counts,
                **({"aux_queries": side.counts, "queries_total": _summed(meter.counts, side.counts)}
                   if side is not None else {}),
                "eval_queries": eval_box.meter.counts,
                "accuracy": {"test": None if test_r is None else test_r["accuracy"],
                             "val": loop.curve[-1]["val_accuracy"] if loop.curve else None},
                **({"test_subset": {"n": len(test), "of": len(task.test), "seed": TEST_SUBSET_SEED,
                                    "comparable_to_full_test": False}} if cfg.test_subset is not None else {}),
                "curve": loop.curve,
                "wall_seconds": round(prior + time.time() - t0, 2),
                "config": config,
            }

        def interrupted(signum: int, save: bool = True) -> RunInterrupted:
            if save:  # not during the test split: the checkpoint before it is current, its meters included
                checkpoint()
            r = result("interrupted", None)
            if folder is not None:
                write_outputs(folder.path, r, method)
            return RunInterrupted(signum, folder.path if folder else None, r)

        prior, last_save = loop.elapsed, time.time()
        budget = Budget.of(meter, unit, mcfg.budget)
        tracker = Tracker.open(cfg.loggers, folder.path if folder else None, config,
                               f"{cfg.method} on {task.name} seed {cfg.seed}",
                               resumed_at=None if mode == "new" else done() if ckpt is not None else -1)
        bar = Progress(progress, f"{cfg.method} on {task.name}", total, unit if mcfg.budget else "step", done())
        with Interrupts(folder.path if folder else None) as stop:
            try:
                if not loop.curve:
                    add_point()  # the starting point (api_calls = 0)
                    checkpoint()
                while loop.stopped_by is None:
                    if stop.signum is not None:
                        raise interrupted(stop.signum)
                    if cfg.max_steps is not None and loop.steps >= cfg.max_steps:
                        loop.stopped_by = "max_steps"
                        break
                    try:
                        stats = method.step(budget)
                    except BudgetExhausted as e:
                        if meter.counts[unit] == 0:  # not even one step fits: the budget is unusable
                            raise e from None
                        loop.stopped_by, loop.stop_details = e.stopped_by, e.details()
                        if e.stopped_by != BudgetExhausted.stopped_by:  # not the run's own budget: say whose
                            log(f"training stopped after {meter.counts[unit]} {unit} (stopped_by: {e.stopped_by}): {e}")
                        break
                    if stats is None:
                        loop.stopped_by = "done"
                        break
                    loop.steps += 1
                    loop.last_loss = stats.get("train_loss", loop.last_loss)
                    bar.update(done(), loop.last_loss)
                    if done() >= loop.next_eval:
                        add_point()
                        loop.next_eval = done() + loop.every
                        checkpoint()
                    elif time.time() - last_save >= CHECKPOINT_SECONDS:
                        checkpoint()
                    if on_step is not None:
                        on_step(loop.steps, stats)
                last = loop.curve[-1]
                if (last["api_calls"], last["prompt_evals"]) != (meter.counts["api_calls"], meter.counts["prompt_evals"]):
                    add_point()  # the end point
                checkpoint()  # training is over: a resumed run goes straight to the test split
                if stop.signum is not None:
                    raise interrupted(stop.signum, save=False)
                stop.phase = "test"
                test_r = evaluate(method, eval_box, test, cfg.eval_batch, "test", progress,
                                  should_stop=lambda: stop.signum is not None)
                if test_r.get("stopped"):
                    raise interrupted(stop.signum, save=False)
                r = result("finished", test_r)
                if folder is not None:
                    write_outputs(folder.path, r, method)
                tracker.finish(done(), r, test_r["loss"])
                if stop.signum is not None:  # it came during the last batch: nothing was left to stop
                    where = f"its result is in {folder.path}" if folder is not None else "nothing is saved (no --out)"
                    log(f"{signal.Signals(stop.signum).name} came during the test evaluation's last batch: the run "
                        f"finished; {where}")
            finally:
                bar.close()
                tracker.close()
        return r


def _restore(ckpt: dict, config: dict, folder: RunFolder, method, loop: _Loop, env: Env, meters) -> None:
    """Load a checkpoint into the run, or refuse in one line: one written by another run
    (its configuration differs) or one that does not fit this method's state."""
    where = folder.file(CHECKPOINT)
    as_stored = lambda c: json.loads(json.dumps(c))  # noqa: E731 -- tuples are lists in JSON
    diff = config_diff(as_stored(ckpt["config"]), as_stored(config)) if "config" in ckpt else []
    if diff:
        shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
        raise CorruptCheckpoint(f"checkpoint {where} belongs to another run ({shown}); pass --force to start this run "
                                "afresh, or choose another --out")
    try:
        method.load_state_dict(ckpt["method"])
        loop.load_state_dict(ckpt["loop"])
        if ckpt["meters"].get("side") is not None and env.side_meter is None:
            env.side_box()  # created on demand by the first run: create it before restoring its counts
        for k, m in meters().items():
            if ckpt["meters"].get(k) is not None:
                m.load_state_dict(ckpt["meters"][k])
        set_global_rng_state(ckpt["rng"])
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise CorruptCheckpoint(f"checkpoint {where} does not fit this {config['method']} run ({type(e).__name__}: "
                                f"{excerpt(e, 80)}); it was written by another run or another bbpt: pass --force to start "
                                "afresh") from None


def train_views(mcfg, task, train: ImageSet, size: int, seed: int) -> TrainViews | None:
    """The training views every method config describes alike (augment, crop_min, flip,
    view_pool); None when the method trains on the test transform. ``augment=None``: the
    task's default (off for the offline tasks, whose 28-32 px images crops would destroy)."""
    if not (task.views if mcfg.augment is None else mcfg.augment):
        return None
    flip = task.flip if mcfg.flip is None else mcfg.flip
    crop = mcfg.official_crop_min if mcfg.crop_min is None else mcfg.crop_min
    pool = mcfg.default_view_pool if mcfg.view_pool is None else mcfg.view_pool
    return TrainViews(train, size, ViewSpec((crop, 1.0), flip, pool), seed)


# A process that runs many runs (a sweep worker) sets this to {} to build each backbone once;
# backbones are frozen and every run has its own black box (feature cache, meters).
BACKBONE_CACHE: dict | None = None


def _backbone(cfg: RunConfig):
    if BACKBONE_CACHE is None:
        return create_backbone(cfg.model, cfg.pretrained, cfg.device)
    key = (cfg.model, cfg.pretrained, cfg.device)
    if key not in BACKBONE_CACHE:
        BACKBONE_CACHE[key] = create_backbone(*key)
    return BACKBONE_CACHE[key]


def _summed(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) + b.get(k, 0) for k in {**a, **b}}


def box_spec(cfg: RunConfig):
    """The run's box (:func:`bbpt.boxes.parse`): ``box``, else ``remote`` (a bbpt server's URL)."""
    from . import boxes

    if cfg.box is not None and cfg.remote is not None:
        raise BadInput(f"--box {cfg.box} and --remote {cfg.remote} both name the black box; give --box alone")
    return boxes.parse(cfg.box or cfg.remote)


def check_box(cfg: RunConfig, cls) -> None:
    """Refuse, before anything is loaded or queried, a method the run's box cannot serve."""
    from . import boxes

    boxes.check_fit(cls, box_spec(cfg))


def _open_box(cfg: RunConfig, classnames: list[str], meter: QueryMeter, key_file: str | None):
    """The run's black box, by its transport (:mod:`bbpt.boxes`), checked against the run."""
    from . import boxes

    return boxes.open_box(box_spec(cfg), classnames, meter, key_file=key_file,
                          **{"backbone_loader": lambda: _backbone(cfg), "model": cfg.model, "pretrained": cfg.pretrained,
                             "device": cfg.device, "precision": cfg.precision,
                             "max_images_per_call": cfg.max_images_per_call, **(cfg.box_options or {})})


class _Saved:
    """A saved prompt (+ extra state) behaving like a method for :func:`evaluate`."""

    def __init__(self, cls, prompt, extra, source: Path | str = "the prompt file"):
        self.cls, self.prompt, self.extra, self.source = cls, prompt, extra, source

    def predict(self, box, images):
        try:
            return self.cls.apply(self.prompt, self.extra, box, images)
        except (KeyError, RuntimeError) as e:  # a tensor the method reads by name is missing, or has another shape
            if isinstance(e, RuntimeError) and not str(e).startswith("Error(s) in loading state_dict"):
                raise
            what = e.args[0] if isinstance(e, KeyError) and e.args else excerpt(e, 80)
            raise CorruptCheckpoint(f"prompt file {self.source} does not fit {self.cls.name} ({what}); pass the "
                                    "prompt.safetensors of that method's run folder") from None


def evaluate_prompt(prompt_path: str | Path, dataset: str, model: str | None = None, pretrained: str | None = None,
                    device: str = "cpu", split: str = "test", batch: int = 500, progress: bool = True) -> dict:
    """Test accuracy of a saved prompt (``runs/x/prompt.safetensors``) on a task."""
    from .results import load_prompt

    if split not in ("test", "val", "train"):
        raise BadInput(f"split {split!r} must be test, val or train")
    prompt, extra, meta = load_prompt(prompt_path)
    cls = METHODS.get(meta.get("method", "zeroshot"))
    if model is None:
        model, _, tag = meta.get("model", "mini").partition(":")
        pretrained = pretrained or (tag or None)
    task = load_task(dataset)
    images = getattr(task, split)
    check_images(images, split, progress=progress)
    backbone = create_backbone(model, pretrained, device)
    box = BlackBox(backbone, task.classnames, QueryMeter())
    r = evaluate(_Saved(cls, prompt, extra, prompt_path), box, images, batch, split, progress)
    return {"dataset": task.name, "split": split, "method": cls.name, "model": model, **r, "queries": box.meter.counts}
