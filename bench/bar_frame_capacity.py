"""Diagnostic (white-box, not a method): how much can BAR's frame give on this model at all?

Trains BAR's exact parameterisation (image shrunk into the centre, sigmoid(W) ⊙ mask around
it, focal loss γ 2, W ~ N(0, 1)) with true gradients through the image tower (Adam, lr 0.1,
full 16-shot set per step) and prints test accuracy every 100 steps next to zero-shot. It
reads the model's gradients, so it is an upper reference for what the black-box RGF can
reach with the frame, nothing more.

    python bench/bar_frame_capacity.py                     # the four offline tasks, seed 1
    python bench/bar_frame_capacity.py --tasks mnist --steps 500 --init black
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bbpt.data import fewshot_split, load_task
from bbpt.methods.bar import BARConfig, inner_size, reprogram
from bbpt.methods.common import focal_per_candidate
from bbpt.models import create_backbone


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="mnist,fashion-mnist,animal-mnist,shapes")
    ap.add_argument("--model", default="mini")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--init", choices=["randn", "black"], default="randn",
                    help="randn: BAR's W ~ N(0, 1); black: W = -4 (a near-black frame, the shrunk image alone)")
    a = ap.parse_args(argv)

    bb = create_backbone(a.model)
    S = bb.image_size
    inner = inner_size(S, BARConfig().inner_ratio)
    print(f"| task | zero-shot | frame test acc at steps 0/100/.../{a.steps} | final train focal loss |")
    print("|---|---|---|---|")
    for name in a.tasks.split(","):
        task = load_task(name)
        train, _ = fewshot_split(task, a.shots, a.seed)
        with torch.no_grad():
            ids = bb.tokenize([task.templates[0].format(c) for c in task.classnames])
            text = F.normalize(bb.model.encode_text(ids).float(), dim=-1)  # (C, E)

        def logits(px):  # (B, 3, S, S) -> (B, C)
            return bb.logit_scale * bb.encode_images(px) @ text.T

        x_tr, y_tr = train.pixels(None, S), torch.as_tensor(train.labels)
        x_te, y_te = task.test.pixels(None, S), torch.as_tensor(task.test.labels)

        def test_acc(W=None):
            with torch.no_grad():
                x = x_te if W is None else reprogram(x_te, W, inner)[0]
                return round(100 * (logits(x).argmax(-1) == y_te).float().mean().item(), 1)

        g = torch.Generator().manual_seed(a.seed)
        W0 = torch.randn(1, 3, S, S, generator=g) if a.init == "randn" else torch.full((1, 3, S, S), -4.0)
        W = W0.requires_grad_(True)
        opt = torch.optim.Adam([W], lr=a.lr)
        accs = []
        for step in range(a.steps + 1):
            if step % 100 == 0 or step == a.steps:
                accs.append(test_acc(W.detach()))
            if step == a.steps:
                break
            loss = focal_per_candidate(logits(reprogram(x_tr, W, inner)[0])[None], y_tr, 2.0)[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"| {name} | {test_acc()} | {' / '.join(map(str, accs))} | {loss.item():.3f} |", flush=True)


if __name__ == "__main__":
    main()
