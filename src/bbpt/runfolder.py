"""A run folder (``--out DIR``) and what may happen to it.

| DIR holds                                   | ``bbpt run ... --out DIR``           | with ``--force``          |
|---------------------------------------------|--------------------------------------|---------------------------|
| nothing (or does not exist)                 | a new run                            | a new run                 |
| an unfinished run, same configuration       | resumes it from its checkpoint       | removes it, a new run     |
| an unfinished run, another configuration    | refuses, naming the fields that differ | removes it, a new run   |
| a finished run                              | refuses                              | removes it, a new run     |
| bbpt outputs without ``run.json`` (old run) | refuses                              | removes them, a new run   |
| files bbpt did not write                    | refuses, naming them                 | refuses, naming them      |

``run.json`` (written first) records the run's resolved configuration; ``checkpoint.safetensors``
its latest state (:mod:`bbpt.state`); ``result.json`` is written last. Every file is replaced
atomically, so a process killed at any moment leaves a folder in one of the states above.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .errors import BadInput, BBPTError, CorruptCheckpoint, excerpt
from .state import atomic_write_text, load_state, save_state

RUN_JSON, CHECKPOINT, RESULT = "run.json", "checkpoint.safetensors", "result.json"
OUTPUTS = (RUN_JSON, CHECKPOINT, RESULT, "curve.csv", "curve.png", "prompt.safetensors", "progress.json",
           "tb", "wandb")  # tb/, wandb/: the trackers' folders (bbpt.tracking)
LOCK = ".bbpt.lock"  # held (flock) by the process running in the folder


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(old: dict, new: dict) -> list[str]:
    """Fields that differ between two configurations, as "key: old -> new". A field one side
    lacks counts as None (a field added since, off by default, e.g. ``remote``)."""
    a, b = _flat(old), _flat(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_fd: int | None = None
        self._created: list[Path] = []  # folders this run created (outermost first), removed if it leaves nothing
        self._abandoned = False
        self._seen: tuple | None = None  # the folder as check() read it (what --force replaces)

    def file(self, name: str) -> Path:
        return self.path / name

    def _entries(self) -> list[Path]:
        if not self.path.exists():
            return []
        if not self.path.is_dir():
            raise BadInput(f"--out {self.path} is a file, not a folder; choose another --out")
        return [p for p in self.path.iterdir() if not p.name.startswith(".")]  # hidden: ours (temp, lock) or the OS's

    def result(self) -> dict | None:
        try:
            return json.loads(self.file(RESULT).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def stored_config(self) -> dict | None:
        try:
            return json.loads(self.file(RUN_JSON).read_text())["config"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return None

    def check(self, config: dict, force: bool = False, keep_finished: bool = False) -> str:
        """What a run of ``config`` may do with the folder, without changing it: "new",
        "resume", or "finished" (only with ``keep_finished``, when the finished run has this
        very configuration); refuses (BadInput) as the module's table says."""
        config = json.loads(json.dumps(config))  # compare as stored (tuples are lists in JSON)
        self._seen = self._snapshot()
        entries = self._entries()
        foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in entries if p.name not in OUTPUTS)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise BadInput(f"--out {self.path} holds files bbpt did not write ({shown}); choose an empty or new --out")
        result, stored = self.result(), self.stored_config()
        if entries and not force:
            if result is not None and result.get("status") == "finished":
                if keep_finished and not config_diff(stored, config):
                    return "finished"
                acc = (result.get("accuracy") or {}).get("test")
                what = f"{result.get('method')} on {result.get('dataset')}, seed {result.get('seed')}"
                what += f", test {100 * acc:.2f}%" if isinstance(acc, (int, float)) else ""
                raise BadInput(f"--out {self.path} holds a finished run ({what}); pass --force to replace it, "
                               "or choose another --out")
            if stored is None:
                raise BadInput(f"--out {self.path} holds outputs of a run that cannot be resumed (no {RUN_JSON}); "
                               "pass --force to replace them, or choose another --out")
            diff = config_diff(stored, config)
            if diff:
                shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
                raise BadInput(f"--out {self.path} holds an unfinished run with another configuration ({shown}); "
                               "rerun with its options to resume it, pass --force to start afresh, or choose another --out")
            return "resume"
        return "new"

    def start(self, config: dict, force: bool = False) -> None:
        """Begin a new run: take the folder, check it again under the lock (another run may
        have used it while this one was loading), remove what an earlier run left (``check``
        allowed it, or ``force``), write run.json."""
        missing = [p for p in (self.path, *self.path.parents) if not p.exists()]
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BadInput(f"cannot create output folder {self.path}: {e.strerror}; choose another --out") from None
        self._created = [p for p in reversed(missing) if p.is_dir()]
        self.lock()
        if force and self._snapshot() != self._seen:  # --force replaces what the folder held when it was read
            raise BadInput(f"--out {self.path} changed while this run was loading (another bbpt run wrote there); "
                           "rerun the command to decide again what --force replaces")
        if not force and self.check(config) != "new":  # finished or another configuration: check() refused
            raise BadInput(f"--out {self.path} was taken by another bbpt run while this one was loading (its run is "
                           "unfinished); rerun this command to resume that run, or choose another --out")
        self.discard()
        try:
            atomic_write_text(self.file(RUN_JSON), json.dumps({"config": config}, indent=1) + "\n")
        except BBPTError:
            self.abandon()
            raise

    def _snapshot(self) -> tuple:
        """What the folder holds, as (name, size, mtime) of its bbpt outputs."""
        out = []
        for name in OUTPUTS:
            try:
                st = self.file(name).stat()
                out.append((name, st.st_size, st.st_mtime_ns))
            except OSError:
                pass
        return tuple(out)

    def clean_temp(self) -> None:
        """Remove temporary files a killed write left (the folder is locked: none is live)."""
        if self.path.is_dir():
            for p in self.path.iterdir():
                if p.is_file() and any(p.name.startswith(f".{n}.tmp") for n in OUTPUTS):
                    p.unlink(missing_ok=True)

    def discard(self) -> None:
        """Remove every bbpt output from the folder, and temp files a killed write left."""
        if not self.path.is_dir():
            return
        for p in self.path.iterdir():
            ours = p.name in OUTPUTS or any(p.name.startswith(f".{n}.tmp") for n in OUTPUTS)
            if ours:
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    def lock(self) -> None:
        """Hold the folder for this process (one run per folder at a time); no-op if held.
        The lock file is removed on unlock, so a lock taken on a file another process has
        just unlinked is detected (the path no longer names it) and taken again."""
        if self._lock_fd is not None or not self.path.is_dir():
            return
        try:
            import fcntl
        except ImportError:  # no flock (Windows): run without the guard
            return
        path = self.file(LOCK)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise BadInput(f"another bbpt process is running in --out {self.path}; wait for it to end, "
                               "or choose another --out") from None
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    self._lock_fd = fd
                    return
            except FileNotFoundError:
                pass
            os.close(fd)  # the holder unlinked it meanwhile: take the new file

    def abandon(self) -> None:
        """A new run that failed before spending anything: remove its outputs now, and on
        unlock the folders it created, so the disk is as the run found it."""
        self.discard()
        self._abandoned = True

    def unlock(self) -> None:
        if self._lock_fd is not None:
            try:
                os.unlink(self.file(LOCK))
            except FileNotFoundError:
                pass
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None
        if self._abandoned:
            for p in reversed(self._created):  # innermost first; one that holds anything stays
                try:
                    p.rmdir()
                except OSError:
                    break
            self._created, self._abandoned = [], False

    def save_checkpoint(self, state: dict) -> int:
        return save_state(self.file(CHECKPOINT), state)

    def load_checkpoint(self) -> dict | None:
        f = self.file(CHECKPOINT)
        if not f.exists():
            return None
        try:
            return load_state(f)
        except CorruptCheckpoint as e:
            raise CorruptCheckpoint(f"{e}; pass --force to start the run afresh") from None
        except Exception as e:  # noqa: BLE001 -- any unreadable checkpoint is the same problem for the user
            raise CorruptCheckpoint(f"checkpoint {f} is unreadable ({type(e).__name__}: {excerpt(e, 100)}); "
                                    "pass --force to start the run afresh") from None
