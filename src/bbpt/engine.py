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

The rooms: :mod:`bbpt.config` (:class:`RunConfig`, reading it), :mod:`bbpt.signals`
(:class:`Interrupts`, :class:`RunInterrupted`), :mod:`bbpt.evaluation` (:func:`evaluate`),
:mod:`bbpt.loop` (:class:`Loop`, the step loop and its checkpoints), :mod:`bbpt.run_result`
(:class:`RunResult`) and :mod:`bbpt.models.cache` (backbones kept across runs). This module
builds a run (:func:`build_run`) and runs it in its folder (:func:`run`); it re-exports the
names it held before the split, so ``from bbpt.engine import run, RunConfig, evaluate`` works.
"""
from __future__ import annotations

import contextlib
import logging
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .config import LATE_FIELDS, MAX_SEED, RunConfig, identity, load_config_file, make_run_config
from .data import check_images, fewshot_split, load_task, stratified_subset, subsample_classes
from .data.core import ImageSet
from .data.staging import FewShotData
from .data.views import TrainViews, ViewSpec
from .errors import BadInput, BBPTError
from .evaluation import SavedPrompt, _Saved, evaluate, evaluate_prompt  # noqa: F401 -- _Saved: the old name
from .loop import CHECKPOINT_SECONDS, TEST_SUBSET_SEED, Loop, LoopState
from .methods import METHODS, make_config
from .methods.base import Env
from .models import QueryMeter
from .models.cache import backbone_cache
from .run_result import RunResult
from .runfolder import RunFolder
from .signals import Interrupts, RunInterrupted

__all__ = [  # what `from bbpt.engine import ...` gave before the split, and build_run
    "CHECKPOINT_SECONDS", "LATE_FIELDS", "MAX_SEED", "TEST_SUBSET_SEED", "Interrupts", "Loop", "LoopState", "RunConfig",
    "RunInterrupted", "RunResult", "SavedPrompt", "box_spec", "build_run", "check_box", "evaluate", "evaluate_prompt",
    "identity", "load_config_file", "make_run_config", "run", "set_seed", "train_views",
]
_Loop = LoopState  # the names before the split

logger = logging.getLogger(__name__)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: RunConfig, out: str | Path | None = None, progress: bool = True, force: bool = False,
        keep_finished: bool = False, log: Callable[[str], None] | None = None,
        on_step: Callable[[int, dict], None] | None = None, key_file: str | None = None) -> RunResult:
    """Run one method on one task; returns its :class:`RunResult` (also written to ``out``).

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
            return RunResult.from_dict(folder.result())
        if mode == "resume":
            folder.clean_temp()  # what a killed write left
        ckpt = folder.load_checkpoint() if mode == "resume" else None
        loop = build_run(cfg, folder=folder, progress=progress, log=log, on_step=on_step, key_file=key_file, t0=t0)
        if folder is not None and mode == "new":
            folder.start(config, force)  # everything loaded: now the folder is this run's (checked again)
        with _discard_unless_spent(folder, mode, lambda: [loop.meter, loop.env.side_meter]):
            if ckpt is not None:
                loop.restore(ckpt)
                log(f"resuming {folder.path}: {cfg.method} on {loop.task.name} from its checkpoint at step "
                    f"{loop.state.steps} ({loop.meter.counts[loop.unit]} {loop.unit} spent)")
            elif mode == "resume":
                log(f"resuming {folder.path}: no checkpoint was written yet, starting the run from step 0")
            return loop.run(resumed=mode == "resume")
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


def build_run(cfg: RunConfig, *, folder: RunFolder | None = None, progress: bool = True,
              log: Callable[[str], None] | None = None, on_step: Callable[[int, dict], None] | None = None,
              key_file: str | None = None, t0: float | None = None) -> Loop:
    """Everything one run needs, built from its configuration: the task's few-shot train / val
    and test splits (checked before any query), the training box and its budgeted meter, the
    evaluation box, the method; returned as a :class:`Loop` ready to :meth:`~Loop.run`. Seeds
    the global RNGs first, so a run built twice steps alike."""
    t0 = time.time() if t0 is None else t0
    cls = METHODS.get(cfg.method)
    mcfg = cls.resolve_config(make_config(cls, cfg.options), cfg.shots)
    config = {**identity(cfg), "options": mcfg.model_dump()}
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
    return Loop(cfg, cls, mcfg, config, task=task, test=test, data=data, val_data=val_data, unit=unit, meter=meter,
                box=box, eval_box=eval_box, env=env, method=method, folder=folder, progress=progress,
                log=log or logger.info, on_step=on_step, t0=t0)


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


def _backbone(cfg: RunConfig):
    """The run's backbone, through the process's :data:`~bbpt.models.cache.backbone_cache`."""
    return backbone_cache.get(cfg.model, cfg.pretrained, cfg.device)


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
