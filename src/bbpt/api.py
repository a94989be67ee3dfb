"""``bbpt.run``: one run from Python, its configuration as a :class:`RunConfig`, a dict or
keyword arguments (the package exports it lazily: ``import bbpt`` stays cheap)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .config import RunConfig, make_run_config
from .errors import BadInput
from .run_result import RunResult


def run(config: RunConfig | dict[str, Any] | None = None, /, out: str | Path | None = None, *, progress: bool = True,
        force: bool = False, log: Callable[[str], None] | None = None, key_file: str | None = None,
        **fields: Any) -> RunResult:
    """Run one method on one task and return its :class:`RunResult`.

    ``config``: a :class:`RunConfig`, or a mapping of its fields; ``fields`` (keyword
    arguments: ``method="zip", dataset="mnist", options={"budget": 200}``) add to or override
    it. ``out``: a run folder for result.json, curve.csv, the prompt and checkpoints (an
    unfinished run there resumes); None keeps nothing on disk. An unknown field or a value out
    of range raises :class:`bbpt.errors.BadInput` with a one-line message.
    """
    from .engine import run as run_engine  # torch: only once a run starts

    if isinstance(config, RunConfig):
        cfg = make_run_config(**{**{k: getattr(config, k) for k in type(config).model_fields}, **fields}) if fields else config
    elif config is None or isinstance(config, dict):
        cfg = make_run_config(**{**(config or {}), **fields})
    else:
        raise BadInput(f"bbpt.run takes a RunConfig or a dict of run fields, not a {type(config).__name__}")
    return run_engine(cfg, out=out, progress=progress, force=force, log=log, key_file=key_file)
