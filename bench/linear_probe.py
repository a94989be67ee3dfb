"""How far a k-shot classifier on the embedded model's image features gets, next to zero-shot.

    python bench/linear_probe.py [--shots 16] [--seed 1]
    python bench/linear_probe.py --pretrained bench/weights/mini-v1.safetensors,default   # side by side

For each offline task: zero-shot test accuracy, and a k-shot linear probe (logistic
regression on the L2-normalised image features, Adam, weight decay 1e-3, 300 steps) - the
head-room that tuning has on this model. A white-box diagnostic: it reads image features,
which no black-box method may do.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bbpt.data import fewshot_split, load_task
from bbpt.data.offline import TASKS
from bbpt.models import create_backbone
from bbpt.models.pretrain import zero_shot


def probe(bb, name: str, shots: int, seed: int) -> float:
    task = load_task(name)
    train, _ = fewshot_split(task, shots, seed)
    with torch.no_grad():
        x = bb.encode_images(train.pixels(size=bb.image_size))
        xt = bb.encode_images(task.test.pixels(size=bb.image_size))
    y, yt = torch.from_numpy(train.labels), torch.from_numpy(task.test.labels)
    torch.manual_seed(seed)
    W = torch.zeros(x.shape[1], task.num_classes, requires_grad=True)
    opt = torch.optim.Adam([W], lr=0.05)
    for _ in range(300):
        loss = F.cross_entropy(20 * x @ W, y) + 1e-3 * (W**2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(((xt @ W).argmax(-1) == yt).float().mean())


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
