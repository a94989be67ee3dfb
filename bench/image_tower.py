"""The image tower against the machine's matmul rate, before and after, side by side in one process.

    python bench/image_tower.py                      # mini on the CPU, every figure
    python bench/image_tower.py --sizes 128,2048 --steps 3 --json out.json

1. The float32 matmul rate: a 2048² @ 2048² matmul, best of ``--repeats``.
2. The image tower of ``mini``: GFLOP/s at each forward size the methods use (images per
   ``encode_images`` / ``encode_tokens`` call), reference (open_clip's forward) and fast
   (:mod:`bbpt.models.fastvit`), and each as a fraction of the matmul rate. FLOPs are the
   tower's matmuls (qkv, attention, out, MLP, patch embedding, projection), counted by
   ``torch.utils.flop_counter`` on the fast forward; the counter misses the fused
   ``nn.MultiheadAttention`` of the library's forward, whose count it also prints.
3. One query step of BlackVIP, BAR and BPT-VLM (mnist, 16 shots, default options), reference
   and fast, the coordinator and pixel work included, and the share of a step spent in the
   tower (``encode_images``, ``patch_tokens``, ``encode_tokens``).
4. The text side of whole-set candidates on ``union`` (40 classes; P soft-prompt candidates of
   4 context vectors per query, BBT's P = 20, CraFT's 40, and 100): the text tower's GFLOP/s
   against the matmul rate (image features cached, as those methods query), before (every
   sequence in one forward) and after (cache-sized blocks on the CPU), and whether the logits
   are the same.

Steps and forwards are timed interleaved (reference, fast, reference, ...): median of repeats.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bbpt.models import BlackBox, Images, QueryMeter, SoftPrompt, create_backbone  # noqa: E402


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed(fn) -> float:
    _sync()
    t = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t


def median_times(fns: dict, repeats: int) -> dict:
    """{name: median seconds}, the functions run interleaved after one warm-up each."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            times[k].append(_timed(f))
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def matmul_rate(repeats: int, device: str = "cpu", n: int = 2048) -> float:
    a, b = torch.rand(n, n, device=device), torch.rand(n, n, device=device)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def towers(bb, tower: str):
    bb.image_tower = tower
    return bb


def tower_rates(bb, sizes, repeats: int) -> tuple[list[dict], float, float]:
    """Rows of GFLOP/s per forward size, and the FLOPs per image (fast count, library count)."""
    S = bb.image_size
    one = torch.rand(1, 3, S, S, device=bb.device)
    with torch.no_grad():
        per_image = flops(lambda: towers(bb, "fast").encode_images(one))
        per_image_lib = flops(lambda: towers(bb, "reference").encode_images(one))
    rows = []
    for n in sizes:
        px = torch.rand(n, 3, S, S, device=bb.device)
        with torch.no_grad():
            t = median_times({k: (lambda k=k: towers(bb, k).encode_images(px)) for k in ("reference", "fast")}, repeats)
        rows.append({"images": n, **{k: per_image * n / t[k] / 1e9 for k in t}})
    return rows, per_image, per_image_lib


def build(name: str, bb, dataset: str = "mnist", shots: int = 16, seed: int = 1):
    """The method as the engine builds it (default options), its step told the budget."""
    from bbpt.data import fewshot_split, load_task
    from bbpt.methods import METHODS, FewShotData, make_config
    from bbpt.methods.base import Budget, Env

    cls = METHODS.get(name)
    cfg = cls.resolve_config(make_config(cls, {}), shots)
    task = load_task(dataset)
    train, _ = fewshot_split(task, shots, seed)
    unit = cls.unit(cfg)
    meter = QueryMeter({unit: cfg.budget} if cfg.budget else {})
    box = BlackBox(bb, task.classnames, meter)
    env = Env(box, FewShotData(train, box.image_size), {"name": task.name, "classnames": task.classnames,
              "templates": task.templates}, seed, cls, white_box=lambda: None)
    m = cls(cfg, env)
    budget = Budget.of(meter, unit, cfg.budget)
    return lambda: m.step(budget), meter


def step_rates(bb, names, steps: int) -> list[dict]:
    """Seconds per step of each method, reference and fast, and the tower's share of a step."""
    rows = []
    for name in names:
        out = {"method": name}
        for tower in ("reference", "fast"):
            towers(bb, tower)
            step, meter = build(name, bb)
            spent = [0.0]

            def timed(fn):
                def call(*a, **k):
                    res = []
                    spent[0] += _timed(lambda: res.append(fn(*a, **k)))
                    return res[0]
                return call

            step()  # warm-up
            spent[0], before = 0.0, meter.counts["images_forwarded"]
            parts = ("encode_images", "patch_tokens", "encode_tokens")
            for a in parts:  # the tower's time within a step
                setattr(bb, a, timed(getattr(bb, a)))
            try:
                dt = _timed(lambda: [step() for _ in range(steps)]) / steps
            finally:
                for a in parts:
                    delattr(bb, a)
            out[tower] = dt
            out[f"{tower}_tower_share"] = spent[0] / steps / dt
            out["images_per_step"] = (meter.counts["images_forwarded"] - before) // steps
        rows.append(out)
    return rows


def text_rates(bb, ps, repeats: int) -> list[dict]:
    """The text tower's rate on union's 40 classes under P soft-prompt candidates per query:
    before (all P·C sequences in one forward) and after (blocks of ``TEXT_BLOCK`` values per
    forward on the CPU, :meth:`TextEncoder.per_forward`), interleaved; and whether the two
    give the same features."""
    import bbpt.models.backbone as backbone
    from bbpt.data import load_task

    task = load_task("union")
    box = BlackBox(bb, task.classnames)
    px = torch.rand(128, 3, bb.image_size, bb.image_size)  # moved by the box
    images = Images(px, keys=[f"i{i}" for i in range(len(px))])
    box.upload(images)
    ctx = box.embed_words("a photo of a")  # (4, D)
    block = backbone.TEXT_BLOCK
    rows = []
    for P in ps:
        prompt = SoftPrompt(ctx[None] + 0.02 * torch.randn(P, *ctx.shape))

        def query(b):
            def q():
                backbone.TEXT_BLOCK = b
                return box.query(prompt, images)
            return q
        try:
            with torch.no_grad():
                fl = flops(query(block))
                same = bool(torch.equal(query(1 << 62)(), query(block)()))
            t = median_times({"before": query(1 << 62), "after": query(block)}, repeats)
        finally:
            backbone.TEXT_BLOCK = block
        rows.append({"candidates": P, "sequences": P * len(task.classnames), "same_logits": same,
                     **{f"{k}_ms": v * 1e3 for k, v in t.items()}, **{k: fl / v / 1e9 for k, v in t.items()}})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mini")
    ap.add_argument("--device", default="cpu", help="cuda: the same figures on a GPU (the fast tower is CPU-only: "
                    "there both columns are the library's forward)")
    ap.add_argument("--sizes", default="128,256,512,1024,2048", help="images per forward")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=6, help="timed method steps (after one warm-up)")
    ap.add_argument("--methods", default="blackvip,bar,bptvlm")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; sweep workers run 1)")
    ap.add_argument("--candidates", default="20,40,100", help="text side: P soft-prompt candidates on union")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bb = create_backbone(args.model, device=args.device)
    sizes = [int(s) for s in args.sizes.split(",")]
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu_name(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "load": round(os.getloadavg()[0], 2), "model": args.model,
            "device": torch.cuda.get_device_name(bb.device) if bb.device.type == "cuda" else "cpu"}
    print(f"{info['date']}; {info['cpu']}, {info['cpus']} CPUs, {info['threads']} torch threads; torch {info['torch']}; "
          f"load average {info['load']} at the start; device {info['device']}")
    mm = matmul_rate(args.repeats, args.device)
    print(f"float32 matmul 2048²: {mm:.0f} GFLOP/s\n", flush=True)

    rows, per_image, per_lib = tower_rates(bb, sizes, args.repeats)
    print(f"{args.model} image tower: {per_image / 1e6:.2f} MFLOP per image (torch's counter on the library's forward "
          f"sees {per_lib / 1e6:.2f}: it misses the fused attention)\n")
    print("| images per forward | reference GFLOP/s | fast GFLOP/s | reference / matmul | fast / matmul | fast / reference |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['images']} | {r['reference']:.0f} | {r['fast']:.0f} | {r['reference'] / mm:.0%} | {r['fast'] / mm:.0%} "
              f"| {r['fast'] / r['reference']:.2f}x |", flush=True)

    steps = step_rates(bb, args.methods.split(","), args.steps) if args.methods else []
    if steps:
        print("\n| method step (mnist, 16 shots) | images per step | reference s | fast s | speed-up | tower share: reference, fast |")
        print("|---|---|---|---|---|---|")
        for r in steps:
            print(f"| {r['method']} | {r['images_per_step']} | {r['reference']:.3f} | {r['fast']:.3f} | "
                  f"{r['reference'] / r['fast']:.2f}x | {r['reference_tower_share']:.0%}, {r['fast_tower_share']:.0%} |",
                  flush=True)

    text = text_rates(bb, [int(p) for p in args.candidates.split(",")], args.repeats) if args.candidates else []
    if text:
        print("\n| text side, union (40 classes) | sequences per query | before ms | after ms | before GFLOP/s | "
              "after GFLOP/s | before / matmul | after / matmul | after / before | same logits |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in text:
            print(f"| P = {r['candidates']} | {r['sequences']} | {r['before_ms']:.1f} | {r['after_ms']:.1f} | "
                  f"{r['before']:.0f} | {r['after']:.0f} | {r['before'] / mm:.0%} | {r['after'] / mm:.0%} | "
                  f"{r['before_ms'] / r['after_ms']:.2f}x | {'yes' if r['same_logits'] else 'NO'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**info, "matmul_gflops": mm, "tower_mflop_per_image": per_image / 1e6, "tower": rows,
                       "steps": steps, "text": text}, f, indent=1)


if __name__ == "__main__":
    main()
