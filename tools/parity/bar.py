"""Parity fixtures for bbpt's ``bar`` (BAR: a learned frame around the shrunk image, trained by
one-sided RGF under poly decay): the official trainers, run unchanged on the toy CLIP.

    python tools/parity/bar.py /path/to/ZIP /path/to/BlackVIP

writes tests/parity/bar.json from ZIP's re-implementation (``trainers/bar.py``, whose settings
are bbpt's defaults) and tests/parity/bar_blackvip.json from BlackVIP's original
(``trainers/reprogramming.py``); pass either path alone to write one. Each runs the official
``train()`` (its ``run_epoch`` with the decay counter, ``forward_backward`` with the RGF step)
over ``EPOCHS`` x 2 batches, with the official ``PROGRAM`` (``trainers/visual_prompters.py``)
and ``FocalLoss`` (``trainers/utils.py``), and records, per step, what a trace of
``forward_backward`` sees: the unit directions u, the pivot and perturbed losses, a_k, t,
decay_steps, ĝ and the new W; and what the image encoder receives (the programmed images).

Stubs stand in only for the Dassl engine (trainer base class, meters, registry, seeding), the
data loader (fixed batches), ``clip`` (the toy CLIP of :mod:`toy`), ``transformers`` and
``wandb`` (imported, unused by BAR) and ``trainers.zsclip`` (the template dict).
"""
from __future__ import annotations

import ast
import contextlib
import io
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from clipstub import ToyClipModel, clip_modules
from fixture import write
from official import Checkout, command, cpu_for_cuda, environment, function, official_section, stub
from toy import ToyCLIP, generate

SIZE, INNER = 16, 14  # frame and embedded image: 194 in 224 at the toy's scale (round(16·194/224) = 14)
CLASSNAMES = ["cat", "dog", "bird"]
N_IMAGES, BATCH, EPOCHS = 8, 4, 2  # 2 batches per epoch: total_length 4, decay_steps 3.6 (step 4 is clamped)
SEED = 1
TEMPLATE = "a photo of a {}."
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

OFFICIAL = {  # fixture -> (repo, trainer file, Dassl package name)
    "bar": ("LOG-postech/ZIP", "trainers/bar.py", "dassl"),
    "bar_blackvip": ("changdaeoh/BlackVIP", "trainers/reprogramming.py", "my_dassl"),
}


# ---- stubs: the Dassl engine, meters and seeding; wandb; transformers --------------------------
class TrainerX:
    """What the official BAR trainer reads of Dassl's TrainerX (no checkpoints, no writer)."""

    def register_model(self, *a, **k): pass
    def set_model_mode(self, *a, **k): pass
    def write_scalar(self, *a, **k): pass
    def before_epoch(self): pass
    def close_writer(self): pass
    def save_model(self, *a, **k): pass
    def get_current_lr(self): return 0.0
    def resume_model_if_exist(self, directory): return 0

    def before_train(self):
        self.start_epoch, self.time_start = 0, time.time()


class AverageMeter:
    def __init__(self):
        self.sum, self.count, self.val, self.avg = 0.0, 0, 0.0, 0.0

    def update(self, v, n=1):
        self.val = float(v)
        self.sum, self.count = self.sum + self.val * n, self.count + n
        self.avg = self.sum / self.count


class MetricMeter:
    def __init__(self):
        self.meters = {}

    def update(self, d):
        for k, v in d.items():
            self.meters.setdefault(k, AverageMeter()).update(v.item() if torch.is_tensor(v) else v)

    def __str__(self):
        return " ".join(f"{k} {m.val:.4f} ({m.avg:.4f})" for k, m in self.meters.items())


def set_random_seed(seed):  # Dassl's
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def compute_accuracy(output, target, topk=(1,)):
    return [(output.argmax(1) == target).float().mean() * 100]


def dassl_stubs(pkg: str) -> dict:
    engine = stub(f"{pkg}.engine", TRAINER_REGISTRY=NS(register=lambda *a: (lambda cls: cls)), TrainerX=TrainerX)
    utils = stub(f"{pkg}.utils", load_pretrained_weights=None, load_checkpoint=None, set_random_seed=set_random_seed,
                 AverageMeter=AverageMeter, MetricMeter=MetricMeter, mkdir_if_missing=lambda *a: None)
    mods = {pkg: stub(pkg), f"{pkg}.engine": engine, f"{pkg}.utils": utils,
            f"{pkg}.metrics": stub(f"{pkg}.metrics", compute_accuracy=compute_accuracy),
            f"{pkg}.optim": stub(f"{pkg}.optim", build_optimizer=lambda *a: None, build_lr_scheduler=lambda *a: None)}
    mods[pkg].__path__ = []
    return mods


class Visual(nn.Module):
    """``clip_model.visual``: the toy's image encoder, recording what it is sent."""

    def __init__(self, toy: ToyCLIP):
        super().__init__()
        self.toy, self.seen = toy, []

    def forward(self, x):  # (B, 3, S, S), CLIP-normalised
        self.seen.append(x.detach().clone())
        return self.toy.encode_image(x)


class BarClip(ToyClipModel):
    """The toy CLIP as ``load_clip_to_cpu`` returns it to the BAR trainer."""

    def __init__(self, toy: ToyCLIP):
        super().__init__(toy)
        self.visual = Visual(toy)

    def encode_text(self, ids):  # (N, L) -> (N, E)
        return self.toy.encode_text(self.toy.token_embedding(ids), ids)


def load_official(co: Checkout, trainer_file: str, pkg: str, toy: ToyCLIP):
    """The official trainer module with its own ``trainers.utils`` and ``trainers.visual_prompters``."""
    clip = clip_modules(toy)
    clip["clip"].clip = clip["clip"]  # `from clip import clip`
    common = {**clip, "wandb": stub("wandb", log=lambda *a, **k: None),
              "transformers": stub("transformers", ViTFeatureExtractor=None, ResNetModel=None, ViTModel=None,
                                   ViTMAEModel=None, ViTForImageClassification=None)}
    utils = co.load_module("trainers/utils.py", "trainers.utils", common)
    vp = co.load_module("trainers/visual_prompters.py", "trainers.visual_prompters",
                        {**common, "trainers": stub("trainers", utils=utils), "trainers.utils": utils})
    trainers = stub("trainers", utils=utils, visual_prompters=vp)
    trainers.__path__ = []
    zsclip = stub("trainers.zsclip", CUSTOM_TEMPLATES={"toy": TEMPLATE})
    mod = co.load_module(trainer_file, f"official_{pkg}_bar", {
        **common, **dassl_stubs(pkg), "trainers": trainers, "trainers.utils": utils,
        "trainers.visual_prompters": vp, "trainers.zsclip": zsclip})
    return mod, utils, vp


def config(max_epoch: int):
    """The official cfg nodes BAR reads: ZIP's configs/trainers/BAR/vit_b16.yaml and train.py
    defaults (BlackVIP's are the same), at the toy's frame size."""
    bar = NS(METHOD="reprogramming", LRS=[10.0, 0.1], FRAME_SIZE=SIZE, SMOOTH=0.01, SIMGA=1.0, SP_AVG=5, FOCAL_G=2.0,
             DECAYING=0.9, PREC="fp32")
    return NS(TRAINER=NS(NAME="BAR", BAR=bar, BASIC=NS(SP_AVG=5, MAX_API_CALLS=5000)), INPUT=NS(SIZE=(INNER, INNER)),
              USE_CUDA=False, DATASET=NS(NAME="toy"), MODEL=NS(INIT_WEIGHTS="", BACKBONE=NS(NAME="toy")),
              OPTIM=NS(MAX_EPOCH=max_epoch), TRAIN=NS(PRINT_FREQ=20, CHECKPOINT_FREQ=0),
              TEST=NS(NO_TEST=True, FINAL_MODEL="last_step"), OUTPUT_DIR="", RESUME="", SEED=SEED, use_wandb=False)


class Loader:
    """``train_loader_x``: each epoch's fixed batches (a Dassl batch: CLIP-normalised images at INPUT.SIZE)."""

    def __init__(self, epochs: list[list[dict]]):
        self.epochs, self.n = iter(epochs), len(epochs[0])

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter(next(self.epochs))


def rgf_lines(tree) -> dict:
    """Line numbers in forward_backward: ``w_r = w + beta * u`` and the ĝ update in the loop."""
    fb = function(tree, "forward_backward")
    loop = next(n for n in ast.walk(fb) if isinstance(n, ast.For))
    assigns = {ast.unparse(s.targets[0]): s.lineno for s in loop.body if isinstance(s, ast.Assign)}
    return {"w_r": assigns["w_r"], "ghat": assigns["ghat"], "first": fb.lineno, "last": fb.end_lineno}


@contextlib.contextmanager
def trace(code, lines: dict, steps: list):
    """Record forward_backward's locals: u at ``w_r = ...``, loss_pt at the ĝ update, the rest on return."""

    def local(frame, event, arg):
        rec = steps[-1]
        if event == "line" and frame.f_lineno == lines["w_r"]:
            rec["directions"].append(frame.f_locals["u"].detach().clone())
        elif event == "line" and frame.f_lineno == lines["ghat"]:
            rec["loss_pt"].append(frame.f_locals["loss_pt"].detach().clone())
        elif event == "return":
            f = frame.f_locals
            rec.update(ak=float(f["ak"]), decay_steps=float(f["decay_steps"]), t=float(f["self"].step_for_pdecay),
                       w=f["w"].clone(), ghat=f["ghat"].clone(), w_new=f["w_new"].clone(),
                       loss_pivot=f["loss_pivot"].detach().clone())
        return local

    def glob(frame, event, arg):
        if frame.f_code is code:
            steps.append({"directions": [], "loss_pt": []})
            return local
        return None

    sys.settrace(glob)
    try:
        yield
    finally:
        sys.settrace(None)


def run(name: str, path: str) -> None:
    repo, trainer_file, pkg = OFFICIAL[name]
    co = Checkout(path, repo)
    arrays = generate(SEED, CLASSNAMES, N_IMAGES, size=SIZE)
    toy = ToyCLIP(arrays, CLASSNAMES)
    mod, utils, vp = load_official(co, trainer_file, pkg, toy)

    # the batches: the toy images (N, 3, 16, 16) in [0, 1] shrunk to INNER (the resize bbpt's
    # reprogram does; Dassl's transform is not covered), CLIP-normalised as Dassl's loader gives them
    px = toy.pixels(arrays)
    small = F.interpolate(px, size=(INNER, INNER), mode="bilinear", antialias=True, align_corners=False)
    normed = (small - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    labels = torch.from_numpy(arrays["labels"])
    rng = np.random.default_rng(SEED)
    orders = [rng.permutation(N_IMAGES) for _ in range(EPOCHS)]
    batches = [[o[i : i + BATCH] for i in range(0, N_IMAGES, BATCH)] for o in orders]
    loader = Loader([[{"img": normed[b], "label": labels[b]} for b in ep] for ep in batches])

    cfg = config(EPOCHS)
    clip_model = BarClip(toy)
    tr = mod.BAR.__new__(mod.BAR)
    tr.cfg, tr.dm, tr.device, tr.output_dir = cfg, NS(dataset=NS(classnames=CLASSNAMES)), "cpu", ""
    tr.max_epoch, tr.train_loader_x = cfg.OPTIM.MAX_EPOCH, loader
    mod.load_clip_to_cpu = lambda c: clip_model
    steps: list[dict] = []
    tree = ast.parse(co.source(trainer_file))
    lines = rgf_lines(tree)
    with cpu_for_cuda(), contextlib.redirect_stdout(io.StringIO()):
        set_random_seed(cfg.SEED)  # train.py main(), before build_trainer
        tr.build_model()  # PROGRAM: W = randn(3, F, F)
        w0 = torch.nn.utils.parameters_to_vector(tr.model.program.parameters()).clone()
        clip_model.visual.seen.clear()
        with trace(mod.BAR.forward_backward.__code__, lines, steps):
            tr.train()
    q = cfg.TRAINER.BAR.SP_AVG
    seen = clip_model.visual.seen  # (q + 1) encoder calls per step: the pivot first
    assert len(seen) == (q + 1) * len(steps) and all(len(s["directions"]) == q for s in steps)
    traj = []
    for k, s in enumerate(steps):
        traj.append({
            "t": s["t"], "decay_steps": s["decay_steps"], "lr": s["ak"],
            "batch": batches[k // len(batches[0])][k % len(batches[0])],
            "directions": torch.stack(s["directions"]),  # (q, d) unit vectors
            "losses": torch.stack([s["loss_pivot"], *s["loss_pt"]]),  # (q + 1,): pivot, then w + βu_j
            "ghat": s["ghat"], "w_new": s["w_new"],  # (d,)
            "pivot_image": seen[(q + 1) * k],  # (B, 3, S, S): what the image encoder receives
        })
    traj[0]["perturbed_image"] = seen[1]  # (B, 3, S, S) at w + βu_1
    assert torch.equal(steps[0]["w"], w0)

    fb = function(tree, "forward_backward")
    re = function(tree, "run_epoch")
    tr_fn = function(tree, "train")
    bm = function(tree, "build_model")
    vp_tree = ast.parse(co.source("trainers/visual_prompters.py"))
    prog = next(n for n in vp_tree.body if isinstance(n, ast.ClassDef) and n.name == "PROGRAM")
    focal = next(n for n in ast.parse(co.source("trainers/utils.py")).body
                 if isinstance(n, ast.ClassDef) and n.name == "FocalLoss")
    write(name, {
        "method": "bar",
        "official": official_section(co, [
            {"file": trainer_file, "lines": [fb.lineno, fb.end_lineno],
             "what": "forward_backward: a_k from the clamped decay counter, pivot loss, q unit directions "
                     "(torch.normal then normalised), ĝ += (d/q)·u·(L(w+βu) − L(w))/β, W ← W − a_k·ĝ"},
            {"file": trainer_file, "lines": [re.lineno, re.end_lineno],
             "what": "run_epoch: total_length = num_batches·max_epoch; step_for_pdecay += 1 before each step"},
            {"file": trainer_file, "lines": [tr_fn.lineno, tr_fn.end_lineno], "what": "train(): the epoch loop"},
            {"file": trainer_file, "lines": [bm.lineno, bm.end_lineno],
             "what": "build_model: CustomCLIP with PROGRAM, LRS / SP_AVG / SMOOTH / SIMGA, FocalLoss(FOCAL_G)"},
            {"file": "trainers/visual_prompters.py", "lines": [prog.lineno, prog.end_lineno],
             "what": "PROGRAM: W ~ randn(3, F, F); un-normalise, paste into the frame centre, + sigmoid(W)·M, "
                     "CLIP-normalise"},
            {"file": "trainers/utils.py", "lines": [focal.lineno, focal.end_lineno], "what": "FocalLoss (γ = 2)"},
        ]),
        "regenerate": command("bar.py", co),
        "environment": environment(),
        "notes": [
            f"frame FRAME_SIZE={SIZE} with INPUT.SIZE={INNER} instead of 224 / 194 (both are config options of the "
            f"official code; {INNER} = round({SIZE}·194/224), bbpt's inner_ratio), so d = 3·{SIZE}² = {3 * SIZE * SIZE}",
            f"{N_IMAGES} images, batch {BATCH}, {EPOCHS} epochs: total_length = {EPOCHS * N_IMAGES // BATCH}, "
            "decay_steps = 0.9·total_length; the last step's counter is clamped (a_k = lr_min)",
            "the loader is a stub yielding fixed batches (trajectory[k].batch); the images reach the official "
            "PROGRAM shrunk to INPUT.SIZE by F.interpolate(bilinear, antialias) from the toy's 16 px pixels and "
            "CLIP-normalised: bbpt's reprogram resize, not Dassl's transform (Resize / RandomResizedCrop on the "
            "original image), which is not covered",
            "the stub loader draws nothing from torch's RNG (Dassl's DataLoader draws its seeds from it at each "
            "epoch start, between the official direction draws); bbpt's test injects the recorded directions",
            "the toy CLIP stands in for CLIP; bbpt's side must normalise with CLIP's mean/std, as PROGRAM does",
            "each loss difference is amplified by d/(qβ) in ĝ: bbpt's update is compared given the official losses; "
            "its own losses are compared separately",
        ],
        "inputs": {"model": arrays, "classnames": CLASSNAMES, "templates": [TEMPLATE],
                   "cfg": {"frame_size": SIZE, "inner": INNER, "lrs": cfg.TRAINER.BAR.LRS, "q": q,
                           "beta": cfg.TRAINER.BAR.SMOOTH, "sigma": cfg.TRAINER.BAR.SIMGA,
                           "gamma": cfg.TRAINER.BAR.FOCAL_G, "power": 0.9, "max_epoch": EPOCHS, "batch_size": BATCH,
                           "num_batches": N_IMAGES // BATCH, "total_length": EPOCHS * N_IMAGES // BATCH,
                           "seed": SEED},
                   "w0": w0},
        "trajectory": traj,
    })


def main(*paths: str) -> None:
    if not paths:
        sys.exit(__doc__)
    for p in paths:
        names = [n for n, (_, f, _) in OFFICIAL.items() if (Path(p) / f).is_file()]
        if not names:
            sys.exit(f"{p}: neither ZIP (trainers/bar.py) nor BlackVIP (trainers/reprogramming.py)")
        run(names[0], p)


if __name__ == "__main__":
    main(*sys.argv[1:])
