"""Milliseconds per query: bbpt's fast path against the official ZIP loop, side by side.

One query = one candidate prompt scored on one batch of 128 images (ZIP's API call).

- reference: what the official ZIP training loop does per query: re-encode the 128-image
  batch, encode all C class texts at the full 77 tokens, one candidate per forward, fp16
  autocast on CUDA (fp32 on CPU) -- ``BlackBox(fast=False)``.
- fast: image features cached by id, all P candidates x C classes in one batched forward,
  sequences cut to the longest real length, bf16 autocast on CUDA -- ``BlackBox(fast=True)``.

    python bench/query_speed.py                       # CUDA if present: ViT-B-16, C = 10, 100, 1000
    python bench/query_speed.py --device cpu --arch ViT-B-16 --classes 10,100 --repeats 2

Prints a table (ms per query and the ratio) measured in this one run; random weights (the
architecture is what costs time, not the values). The FLOP bound of a fast query is its
FLOPs (counted by ``torch.utils.flop_counter`` on one call: the C class sequences through the
text tower, cut length, and the logits) over the device's peak (``--peak-tflops``; known
for H100 / H200 / A100 bf16 dense); "x bound" is the measured time over that bound.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bbpt.models import BlackBox, Images, SoftPrompt, create_backbone  # noqa: E402


def classnames(n: int) -> list[str]:
    from open_clip import IMAGENET_CLASSNAMES

    names = list(IMAGENET_CLASSNAMES)
    return [names[i % len(names)] for i in range(n)]


def timeit(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


# dense bf16, vendor sheets; the first name contained in the device's name wins
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def flops_of(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="ViT-B-16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--classes", default="10,100,1000")
    ap.add_argument("--prompts", type=int, default=10, help="candidates per fast-path call (ZIP: 10 per step)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for the FLOP bound (default: by GPU name)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    torch.manual_seed(0)

    from bbpt.models.backbone import timed_load

    create_backbone("mini")  # first build pays one-off import and tokenizer costs
    mini_load = min(timed_load("mini") for _ in range(3))
    bb = create_backbone(args.arch, "random", args.device)
    on_cuda = dev.type == "cuda"
    px = torch.rand(args.batch, 3, bb.image_size, bb.image_size)
    keys = [f"img{i}" for i in range(args.batch)]
    name = torch.cuda.get_device_name(dev) if on_cuda else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"device: {name}; arch {args.arch} (random weights); batch {args.batch}; torch {torch.__version__}")
    print(f"mini: built and loaded in {mini_load * 1000:.0f} ms (imports excluded)")
    print()
    peak = args.peak_tflops or (peak_tflops(name) if on_cuda else None)
    print(f"peak for the FLOP bound: {f'{peak:.0f} TFLOP/s' if peak else 'unknown (pass --peak-tflops)'}")
    print()
    print("| classes C | reference ms/query | fast ms/query | speed-up | GFLOP/query | fast TFLOP/s | x FLOP bound |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for C in (int(c) for c in args.classes.split(",")):
        names = classnames(C)
        ref = BlackBox(bb, names, fast=False, precision="fp16" if on_cuda else "fp32")
        fast = BlackBox(bb, names, fast=True, precision="bf16" if on_cuda else "fp32")
        base = ref.embed_words("X X X X X X X X")  # (8, D): ZIP's 8 context tokens
        one = SoftPrompt(base[None] + 0.02 * torch.randn(1, *base.shape))
        many = SoftPrompt(base[None] + 0.02 * torch.randn(args.prompts, *base.shape))
        imgs_ref = Images(px)  # no keys: re-encoded every call, as the official loop does
        imgs_fast = Images(px, keys)
        t_ref = timeit(lambda: ref.query(one, imgs_ref), args.repeats, dev)
        t_fast = timeit(lambda: fast.query(many, imgs_fast), args.repeats, dev) / args.prompts
        fl = flops_of(lambda: fast.query(many, imgs_fast)) / args.prompts  # images cached: text + logits
        bound = f"{t_fast / (fl / (peak * 1e12)):.2f}x" if peak else "-"
        print(f"| {C} | {t_ref * 1e3:.2f} | {t_fast * 1e3:.3f} | {t_ref / t_fast:.1f}x | {fl / 1e9:.2f} | "
              f"{fl / t_fast / 1e12:.2f} | {bound} |", flush=True)
        rows.append({"classes": C, "reference_ms": t_ref * 1e3, "fast_ms": t_fast * 1e3, "speedup": t_ref / t_fast,
                     "gflop_per_query": fl / 1e9, "x_flop_bound": t_fast / (fl / (peak * 1e12)) if peak else None})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "arch": args.arch, "batch": args.batch, "prompts": args.prompts,
                       "peak_tflops": peak, "mini_load_ms": mini_load * 1e3, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
