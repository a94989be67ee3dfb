"""What checkpointing costs a run: wall time with and without it, side by side in one process.

    python bench/checkpoint_cost.py [--method zip] [--dataset fashion-mnist] [--repeats 2]

Each repeat runs the same default run twice, alternating: once as bbpt runs it (a checkpoint
at every curve point, written atomically with fsync) and once with the checkpoint write
replaced by a no-op. It also times every checkpoint directly (collecting the state, RNGs
and meters, then writing it), which is the precise figure: wall-time differences between
two runs on a shared 2-core machine carry several percent of noise.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bbpt.engine import make_run_config, run
from bbpt.methods.base import Method
from bbpt.runfolder import RunFolder


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="zip")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    cfg = make_run_config(method=args.method, dataset=args.dataset, shots=16, seed=1)
    real_save, real_state = RunFolder.save_checkpoint, Method.state_dict
    writes: list[tuple[float, int]] = []
    started = [0.0]

    def timed_state(self):  # the first thing a checkpoint does: collect the method's state
        started[0] = time.perf_counter()
        return real_state(self)

    def timed_save(self, state):  # the last: write it; the time between is the checkpoint's cost
        n = real_save(self, state)
        writes.append((time.perf_counter() - started[0], n))
        return n

    Method.state_dict = timed_state  # methods that override it are timed from their save only

    walls = {"with": [], "without": []}
    tmp = Path(tempfile.mkdtemp(prefix="bbpt-ckpt-"))
    run(cfg, out=None, progress=False)  # warm-up: imports, data, caches
    for i in range(args.repeats):
        for mode in ("with", "without") if i % 2 == 0 else ("without", "with"):  # ABBA: no order bias
            RunFolder.save_checkpoint = timed_save if mode == "with" else (lambda self, state: 0)
            t = time.perf_counter()
            run(cfg, out=tmp / f"{mode}{i}", progress=False)
            walls[mode].append(time.perf_counter() - t)
    RunFolder.save_checkpoint, Method.state_dict = real_save, real_state
    shutil.rmtree(tmp)

    w, wo = statistics.mean(walls["with"]), statistics.mean(walls["without"])
    per_run = sum(t for t, _ in writes) / args.repeats
    print(f"{args.method} on {args.dataset}, default budget, {args.repeats} repeats, {torch.get_num_threads()} threads")
    print(f"  wall with checkpoints     {w:7.2f} s  (runs: {', '.join(f'{x:.2f}' for x in walls['with'])})")
    print(f"  wall without checkpoints  {wo:7.2f} s  (runs: {', '.join(f'{x:.2f}' for x in walls['without'])})")
    print(f"  side-by-side difference   {100 * (w - wo) / wo:+6.2f} %")
    print(f"  checkpoints               {len(writes) // args.repeats} per run, {1e3 * per_run / max(1, len(writes) // args.repeats):.1f} ms "
          f"and {statistics.mean(n for _, n in writes) / 1e3:.0f} kB each")
    print(f"  time inside them          {per_run:7.3f} s per run = {100 * per_run / w:.2f} % of the run's wall time")


if __name__ == "__main__":
    main()
