"""How far a k-shot classifier on the embedded model's image features gets, next to zero-shot.

    python bench/linear_probe.py [--shots 16] [--seed 1]
    python bench/linear_probe.py --pretrained bench/weights/mini-v1.safetensors,default   # side by side

For each offline task: zero-shot test accuracy, and a k-shot linear probe - the head-room
that tuning has on this model. The probe is the `linprobe` method's (bbpt.methods.linprobe:
L2 logistic regression on the L2-normalised image features, C by CoOp's search on the
few-shot val split); here it reads the backbone's features directly, a white-box shortcut
for the same numbers `bbpt run --method linprobe` gets through the embeddings API.
"""
from __future__ import annotations

import argparse

import torch

from bbpt.data import fewshot_split, load_task
from bbpt.data.offline import TASKS
from bbpt.methods.linprobe import coop_search, correct, logistic_regression
from bbpt.models import create_backbone
from bbpt.models.pretrain import zero_shot


def probe(bb, name: str, shots: int, seed: int) -> float:
    task = load_task(name)
    train, val = fewshot_split(task, shots, seed)
    with torch.no_grad():
        x, xv, xt = (torch.nn.functional.normalize(bb.encode_images(s.pixels(size=bb.image_size)), dim=-1)
                     for s in (train, val, task.test))
    y, yv, yt = (torch.from_numpy(s.labels) for s in (train, val, task.test))
    fit = lambda c: logistic_regression(x, y, task.num_classes, c)  # noqa: E731
    _, (W, b) = coop_search(fit, lambda m: correct(*m, xv, yv))
    return correct(W, b, xt, yt) / len(yt)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--pretrained", default="default",
                    help="comma-separated mini weights files; 'default' is the shipped file")
    args = ap.parse_args(argv)
    names = args.pretrained.split(",")
    bbs = [create_backbone("mini", None if p == "default" else p) for p in names]
    head = " | ".join(f"zero-shot / {args.shots}-shot probe ({p}, scale {bb.logit_scale:.2f})" for p, bb in zip(names, bbs))
    print(f"| task | chance | {head} |\n|---|---|" + "---|" * len(bbs))
    for name in TASKS:
        n = len(TASKS.get(name).classnames)
        cells = [f"{100 * zero_shot(bb, name):.1f} / {100 * probe(bb, name, args.shots, args.seed):.1f}" for bb in bbs]
        print(f"| {name} | {100 / n:.1f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
