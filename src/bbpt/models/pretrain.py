"""Pretrain the embedded model ``mini`` on offline data only (reproducible, CPU-friendly).

    python -m bbpt.models.pretrain --out src/bbpt/models/weights/mini.safetensors

Data mix, per batch of 256 (half and half):
- procedurally drawn captioned scenes (1-3 coloured shapes; ``bbpt.data.shapes``), drawn
  from the *seen* colour-shape pairs only, so the ``shapes`` task's class names are never
  captioned;
- captioned images from the *training* splits (validation and test held out) of mnist,
  fashion-mnist and animal-mnist, ``--images-per-class`` per class, with varied captions;
  ``--caption-invert`` of them colour-inverted, so the names are learnt mostly in a shifted
  domain and zero-shot accuracy on the task domain stays well below what tuning can reach,
  as a real CLIP's does on SVHN, EuroSAT or CLEVR.

Loss: CLIP's symmetric contrastive loss with multi-positive targets (identical captions in
a batch are all positives), plus an image-only contrastive loss (SimCLR's NT-Xent between two
random affine views, through a throw-away projection head) on ``--ssl-per-class``
*uncaptioned* training images per class. The image tower so learns features that separate
the classes far better than the few captions align them with their names: like a real
CLIP on EuroSAT, a linear probe beats zero-shot, and prompt tuning has room to act. AdamW, cosine schedule.

Temperature: CLIP's regime. The logit scale is learnt, clamped at 100 after every step as in
CLIP's training code, and starts at 100 (``--init-logit-scale``), the value a trained CLIP
ends at: from CLIP's own start of 1 / 0.07, 1500 steps learn it only to 24.75 (mini v1),
and a black box at a quarter of CLIP's scale ranks methods differently. Same seed and arguments -> the same
weights (single process, CPU). Writes fp16 safetensors plus a JSON card with the config and
the measured zero-shot accuracy of every offline task.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data import shapes
from ..data.offline import TASKS
from .backbone import WEIGHTS_DIR, create_backbone, save_weights

CAPTIONS = {
    "mnist": ["a photo of the digit {}.", "the number {}", "a handwritten {}", "{} written by hand", "digit {}"],
    "fashion-mnist": ["a photo of a {}.", "a {}, a type of clothing", "a grayscale photo of a {}", "a {}"],
    "animal-mnist": ["a silhouette of a {}.", "a {}", "a black and white picture of a {}", "the shape of a {}"],
}
DIGIT_CHARS = [str(i) for i in range(10)]


def build_pool(images_per_class: int, seed: int, size: int, invert: float = 0.0):
    """Pretraining images (N, 3, size, size) in [0,1] and their caption choices; a fraction
    ``invert`` of them (seeded) is colour-inverted: captions then come mostly from a shifted
    domain, as a real CLIP's captions come from photos rather than from satellite images."""
    rng = np.random.default_rng(seed)
    pix, caps = [], []
    for name, forms in CAPTIONS.items():
        task = TASKS.get(name).load()
        for c in range(task.num_classes):
            idx = np.flatnonzero(task.train.labels == c)
            idx = rng.choice(idx, size=min(images_per_class, len(idx)), replace=False)
            pix.append(task.train.pixels(idx, size=size))
            words = [task.classnames[c]] + ([DIGIT_CHARS[c]] if name == "mnist" else [])
            caps += [[f.format(w) for f in forms for w in words]] * len(idx)
    pix = torch.cat(pix)
    flip = torch.from_numpy(rng.random(len(pix)) < invert)
    pix[flip] = 1.0 - pix[flip]
    return pix, caps


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, captions: list[str], scale: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss; every pair with the same caption counts as a positive."""
    logits = scale * img @ txt.T  # (B, B)
    _, inv = np.unique(np.asarray(captions), return_inverse=True)
    inv = torch.from_numpy(inv)
    target = (inv[:, None] == inv[None, :]).float()
    target = target / target.sum(1, keepdim=True)
    return 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean() + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean())


def random_views(px: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random affine view per image (scale 0.75-1.1, rotation ±12°, shift ±12 %) plus
    brightness jitter: the augmentations of the image-only contrastive loss."""
    n = len(px)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=gen)  # noqa: E731
    s, a = u(0.75, 1.1), u(-0.21, 0.21)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = s * torch.cos(a), -s * torch.sin(a)
    theta[:, 1, 0], theta[:, 1, 1] = s * torch.sin(a), s * torch.cos(a)
    theta[:, :, 2] = torch.stack([u(-0.12, 0.12), u(-0.12, 0.12)], 1)
    grid = F.affine_grid(theta, list(px.shape), align_corners=False)
    out = F.grid_sample(px, grid, align_corners=False, padding_mode="zeros")
    return (out * u(0.7, 1.3)[:, None, None, None]).clamp(0, 1)


def ssl_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """NT-Xent between two views: each image's other view is its one positive among 2n - 1."""
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    n = len(z1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


def zero_shot(backbone, name: str, batch: int = 1000) -> float:
    from .blackbox import BlackBox, Images, TextPrompt

    task = TASKS.get(name).load()
    box = BlackBox(backbone, task.classnames)
    correct = 0
    for i in range(0, len(task.test), batch):
        idx = np.arange(i, min(i + batch, len(task.test)))
        logits = box.query(TextPrompt(tuple(task.templates[:1])), Images(task.test.pixels(idx, backbone.image_size)))
        correct += int((logits[0].argmax(-1).numpy() == task.test.labels[idx]).sum())
    return correct / len(task.test)


def train(args) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    bb = create_backbone("mini", "random")
    model, tower = bb.model, bb.text
    model.train().requires_grad_(True)
    with torch.no_grad():  # CLIP's temperature regime: a learnable scale, started here, clamped at the cap
        model.logit_scale.fill_(math.log(args.init_logit_scale))
    max_log_scale = math.log(args.max_logit_scale)
    size = bb.image_size

    pool_px, pool_caps = build_pool(args.images_per_class, args.seed, size, args.caption_invert)
    ssl_px = build_pool(args.ssl_per_class, args.seed + 3, size)[0] if args.ssl_batch else None
    ssl_head = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128))
    gen = torch.Generator().manual_seed(args.seed + 4)
    scenes_px, scenes_caps = shapes.scene_batch(args.scenes, args.seed + 1, size)
    scenes_px = torch.from_numpy(scenes_px).permute(0, 3, 1, 2).float() / 255.0
    print(f"pool: {len(pool_px)} dataset images, {len(scenes_px)} scenes", flush=True)

    named = list(model.named_parameters()) + [(f"ssl_head.{n}", p) for n, p in ssl_head.named_parameters()]
    decay = [p for n, p in named if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    rng = np.random.default_rng(args.seed + 2)
    half = args.batch // 2
    t0, log = time.time(), []
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        i = rng.choice(len(pool_px), half, replace=False)
        j = rng.choice(len(scenes_px), args.batch - half, replace=False)
        px = torch.cat([pool_px[i], scenes_px[j]])
        caps = [pool_caps[k][rng.integers(len(pool_caps[k]))] for k in i] + [scenes_caps[k] for k in j]
        img = F.normalize(model.encode_image(bb.normalize(px)), dim=-1)
        ids = bb.tokenize(caps)
        txt = F.normalize(tower.encode(tower.embed(ids), ids), dim=-1)
        loss = contrastive_loss(img, txt, caps, model.logit_scale.exp())
        if ssl_px is not None:  # image-only contrastive loss on uncaptioned images: features, not names
            k = torch.from_numpy(rng.choice(len(ssl_px), args.ssl_batch, replace=False))
            views = torch.cat([random_views(ssl_px[k], gen), random_views(ssl_px[k], gen)])
            z = ssl_head(model.encode_image(bb.normalize(views)))
            loss = loss + args.ssl_weight * ssl_loss(*z.chunk(2))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # as CLIP's training code: the stored scale never exceeds the cap
            model.logit_scale.clamp_(0, max_log_scale)
        if step % 100 == 0 or step == args.steps - 1:
            scale = model.logit_scale.exp().item()
            log.append({"step": step, "loss": round(loss.item(), 4), "logit_scale": round(scale, 3),
                        "seconds": round(time.time() - t0, 1)})
            print(f"step {step:5d}  loss {loss.item():.3f}  scale {scale:6.2f}  lr {lr:.2e}  {time.time() - t0:6.0f}s",
                  flush=True)
    return {"log": log, "seconds": round(time.time() - t0, 1), "model": model}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR / "mini.safetensors")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--images-per-class", type=int, default=40)
    ap.add_argument("--scenes", type=int, default=20000)
    ap.add_argument("--ssl-per-class", type=int, default=1000, help="uncaptioned images per class for the image-only loss")
    ap.add_argument("--ssl-batch", type=int, default=128, help="images (x2 views) per step in the image-only loss; 0: off")
    ap.add_argument("--ssl-weight", type=float, default=1.0)
    ap.add_argument("--caption-invert", type=float, default=0.85, help="fraction of captioned images colour-inverted")
    ap.add_argument("--init-logit-scale", type=float, default=100.0,
                    help="initial logit scale (1 / temperature): 100, CLIP's trained value; 14.29 (1 / 0.07) is CLIP's "
                         "initialisation, which mini v1 used and learnt only to 24.75 in its 1500 steps")
    ap.add_argument("--max-logit-scale", type=float, default=100.0, help="clamp of the learnable scale, CLIP's 100")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-eval", action="store_true", help="skip the zero-shot table at the end")
    ap.add_argument("--eval-only", action="store_true", help="only re-measure the zero-shot table of --out")
    args = ap.parse_args(argv)
    for name in TASKS:
        TASKS.get(name).prepare()
    card_path = args.out.with_suffix(".card.json")
    if args.eval_only:
        card = json.loads(card_path.read_text())
    else:
        out = train(args)
        save_weights(out.pop("model"), args.out)
        card = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "eval_only"},
                "train_seconds": out["seconds"], "log": out["log"]}
    if not args.no_eval:
        bb = create_backbone("mini", str(args.out))
        card["zero_shot_test_accuracy"] = {n: round(zero_shot(bb, n), 4) for n in TASKS}
        print(json.dumps(card["zero_shot_test_accuracy"]), flush=True)
    card_path.write_text(json.dumps(card, indent=1) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
