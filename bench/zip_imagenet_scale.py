"""End to end at ImageNet's scale: a 16-shot ZIP run at C = 1000 on random ViT-B/16 weights.

Generates a synthetic CoOp-layout ImageNet tree (``imagenet/images/{train,val}/<wnid>/`` plus
``classnames.txt``; random 256 x 256 JPEGs written by a process per core, 16 train and ``--val-per-class`` val images per
class), then runs ``bbpt run --method zip`` on it: training views, the fast path, streamed
evaluation at 224 px. Prints where the wall time goes. Meant for a GPU machine:

    python bench/zip_imagenet_scale.py --device cuda                      # C = 1000, 5000 api_calls
    python bench/zip_imagenet_scale.py --classes 10 --api-calls 10 --view-pool 1   # a CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bbpt.engine import make_run_config, run  # noqa: E402


def _write_class(job: tuple) -> None:
    """One class's train and val JPEGs, from a seed of its own (classes are written in parallel)."""
    base, i, w, counts, seed = job
    rng = np.random.default_rng([seed, i])
    for split, n in counts:
        d = base / "images" / split / w
        d.mkdir(parents=True, exist_ok=True)
        for k in range(n):
            Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(d / f"{w}_{k}.JPEG", quality=85)


def make_tree(root: Path, classes: int, train: int, val: int, seed: int = 0) -> Path:
    from concurrent.futures import ProcessPoolExecutor

    from open_clip import IMAGENET_CLASSNAMES

    base = root / "imagenet"
    if (base / "classnames.txt").is_file():
        return base
    wnids = [f"n{i:08d}" for i in range(classes)]
    names = [IMAGENET_CLASSNAMES[i % len(IMAGENET_CLASSNAMES)] + ("" if i < 1000 else f" {i}") for i in range(classes)]
    jobs = [(base, i, w, (("train", train), ("val", val)), seed) for i, w in enumerate(wnids)]
    with ProcessPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
        list(pool.map(_write_class, jobs, chunksize=max(1, len(jobs) // 64)))
    (base / "classnames.txt").write_text("".join(f"{w} {c}\n" for w, c in zip(wnids, names)))  # last: the tree is whole
    return base


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--api-calls", type=int, default=5000)
    ap.add_argument("--val-per-class", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="ViT-B-16", help="open_clip architecture, random weights")
    ap.add_argument("--view-pool", type=int, default=None, help="views per image (default: bbpt's 16)")
    ap.add_argument("--precision", default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--root", type=Path, default=Path("/tmp/bbpt-imagenet-scale"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    t0 = time.time()
    # 16 train images per class for 16 shots, and at least 5 for the carved validation split
    tree = make_tree(args.root / f"C{args.classes}-val{args.val_per_class}", args.classes, 21, args.val_per_class)
    t_tree = time.time() - t0
    cfg = make_run_config(method="zip", dataset=str(tree), model=args.model, pretrained="random", shots=16,
                          device=args.device, precision=args.precision or ("bf16" if args.device.startswith("cuda") else "fp32"),
                          options={"budget": args.api_calls,
                                   **({"view_pool": args.view_pool} if args.view_pool is not None else {})})
    out = args.out or args.root / f"run-C{args.classes}-{args.api_calls}"
    t1 = time.time()
    r = run(cfg, out=out, progress=True, force=True)
    wall = time.time() - t1
    q = r.queries
    print(f"tree: {args.classes} classes in {t_tree:.0f} s -> {tree}")
    print(f"zip, C = {args.classes}, 16 shots, {q['api_calls']} api_calls ({q['images_forwarded']} images): "
          f"{wall:.1f} s wall, {q['api_calls'] / wall:.1f} api_calls/s; test {100 * r.accuracy.test:.2f}% "
          f"(random weights: chance is {100 / args.classes:.2f}%) on {args.device}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"classes": args.classes, "device": args.device, "api_calls": q["api_calls"],
                       "images_forwarded": q["images_forwarded"], "tree_s": t_tree, "run_s": wall,
                       "api_calls_per_s": q["api_calls"] / wall, "test_accuracy": r.accuracy.test}, f, indent=1)


if __name__ == "__main__":
    main()
