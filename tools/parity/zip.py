"""Parity fixtures for ZIP and the plain ZO-SGD baseline: the official ZIP trainer
(``trainers/zip.py``) built and trained for a few steps on the toy CLIP, its own statements
executed unchanged.

    python tools/parity/zip.py /path/to/ZIP

writes tests/parity/zip.json (OPT_TYPE 'spsa-clip', ZIP's config) and tests/parity/zosgd.json
(OPT_TYPE 'spsa' on the raw context, see below).

What runs is the official code: ``train.py``'s ``extend_cfg`` with ``configs/trainers/ZIP/vit_b16.yaml``
and the options of ``scripts/few_shot/ZIP.sh``; ``PromptLearner``, ``IntrinsicLearner`` (with
``projections/intrinsic.py``'s Fastfood), ``CustomCLIP``, ``TextEncoder``, and the trainer's
``build_model``, ``run_epoch``, ``forward_backward`` and ``spsa_grad_estimate_bi``. Stubs stand in
for Dassl (the base trainer, meters, registry, accuracy), yacs (an attribute dict), ``clip`` (the
toy tokenizer) and ``load_clip_to_cpu`` (the toy CLIP in OpenAI's shape, :mod:`clipstub`, plus a
``visual`` tower). What the statements draw and compute is read off as they run: the Δ of every
pair (each passes through ``.cuda()``), each query's loss (``self.loss_fn``), and the locals of
``forward_backward``, ``spsa_grad_estimate_bi`` and ``IntrinsicLearner.forward`` when they
return (a trace function); nothing is recomputed here.
"""
from __future__ import annotations

import ast
import random
import re
import sys
import types
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn
import yaml

import toy
from clipstub import ToyClipModel, clip_modules
from fixture import write
from official import Checkout, command, environment, function, official_section, stub

CLASSES = ["cat", "dog", "ship", "tree", "car"]
N_TRAIN, BATCH, STEPS, SEED = 96, 32, 3, 1
TRAINER, CFG_FILE, SCRIPT = "trainers/zip.py", "configs/trainers/ZIP/vit_b16.yaml", "scripts/few_shot/ZIP.sh"


# ---------------------------------------------------------------------------------------
# stand-ins for Dassl, yacs and the CLIP loader
class CN(dict):
    """yacs' CfgNode as far as the official code uses it: a dict with attribute access."""

    def __getattr__(self, k):
        try:
            return self[k]
        except KeyError:
            raise AttributeError(k) from None

    def __setattr__(self, k, v):
        self[k] = v


def merge(cfg: CN, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict):
            merge(cfg.setdefault(k, CN()), v)
        else:
            cfg[k] = v


def plain(cfg):
    return {k: plain(v) for k, v in cfg.items()} if isinstance(cfg, dict) else list(cfg) if isinstance(cfg, tuple) else cfg


class Meter:
    def __init__(self):
        self.vals: list[float] = []

    def update(self, v, n=1):
        self.vals.append(float(v))

    @property
    def val(self):
        return self.vals[-1]

    @property
    def avg(self):
        return float(np.mean(self.vals))


class MetricMeter:
    """Dassl's: a Meter per key, tensors as floats; keeps every value (the reported losses)."""

    def __init__(self):
        self.meters: dict[str, Meter] = {}

    def update(self, d):
        for k, v in d.items():
            self.meters.setdefault(k, Meter()).update(v.item() if torch.is_tensor(v) else v)


class TrainerX:
    """Dassl's base trainer, as far as ZIP's trainer calls it."""

    def register_model(self, name, model, optim, sched):
        self._models[name] = model

    def set_model_mode(self, mode="train", names=None):
        pass  # the toy has no dropout or normalisation layers

    def write_scalar(self, *a, **k):
        pass

    def get_current_lr(self, names=None):
        return 0.0


def compute_accuracy(output, target, topk=(1,)):
    return [(output.argmax(1) == target).float().mean() * 100]


def dassl_modules() -> dict:
    registry = types.SimpleNamespace(register=lambda *a, **k: (lambda cls: cls))
    mods = {"dassl": stub("dassl"),
            "dassl.engine": stub("dassl.engine", TRAINER_REGISTRY=registry, TrainerX=TrainerX),
            "dassl.metrics": stub("dassl.metrics", compute_accuracy=compute_accuracy),
            "dassl.utils": stub("dassl.utils", MetricMeter=MetricMeter, AverageMeter=Meter, load_checkpoint=None,
                                load_pretrained_weights=None),
            "dassl.optim": stub("dassl.optim", build_optimizer=lambda *a, **k: None,
                                build_lr_scheduler=lambda *a, **k: None)}
    mods["dassl"].__path__ = []
    return mods


class _Visual(nn.Module):
    def __init__(self, t: toy.ToyCLIP):
        super().__init__()
        self.toy, self.input_resolution = t, t.image_size

    def forward(self, images):  # (B, 3, S, S) in [0, 1] -> (B, E), unit length
        return self.toy.encode_image(images)


class ToyZipClip(ToyClipModel):
    """The toy CLIP with the ``visual`` tower ZIP's CustomCLIP calls."""

    def __init__(self, t: toy.ToyCLIP):
        super().__init__(t)
        self.visual = _Visual(t)


# ---------------------------------------------------------------------------------------
# reading what the official statements compute
@contextmanager
def returns(filename: str, qualnames: set[str], into: list):
    """Append (qualname, locals) for every return of those functions of ``filename``."""

    def local(frame, event, arg):
        if event == "return":
            loc = dict(frame.f_locals)
            if isinstance(loc.get("self"), nn.Module):  # its parameters now (they are replaced later)
                loc["_params"] = nn.utils.parameters_to_vector(loc["self"].parameters()).detach().clone()
            into.append((frame.f_code.co_qualname, loc))
        return local

    def tracer(frame, event, arg):
        code = frame.f_code
        if event == "call" and code.co_filename == filename and code.co_qualname in qualnames:
            return local
        return None

    sys.settrace(tracer)
    try:
        yield
    finally:
        sys.settrace(None)


@contextmanager
def cuda_recorder(into: list):
    """``.cuda()`` is a no-op that records the tensor it is called on (the official Δ)."""
    saved = torch.Tensor.cuda, torch.nn.Module.cuda
    torch.Tensor.cuda = lambda self, *a, **k: (into.append(self.detach().clone()), self)[1]
    torch.nn.Module.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda = saved


def lines_of(co: Checkout, rel: str, *qualnames: str) -> list[dict]:
    """[{'file', 'lines', 'what'}] for classes / functions ``Class.func`` of file ``rel``."""
    tree = ast.parse(co.source(rel))
    out = []
    for q in qualnames:
        node = tree
        for part in q.split("."):
            node = next(n for n in ast.walk(node) if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == part)
        out.append({"file": rel, "lines": [node.lineno, node.end_lineno], "what": q})
    return out


def official_cfg(co: Checkout, image_size: int, opt_type: str | None) -> CN:
    """Dassl's defaults that the trainer reads, then train.py's extend_cfg, the config file and
    the few-shot script's options, as ``train.py`` / ``ZIP.sh`` assemble them."""
    cfg = CN(DATASET=CN(), TRAINER=CN(NAME="ZIP"), INPUT=CN(), TRAIN=CN(PRINT_FREQ=5), TEST=CN(NO_TEST=True),
             OPTIM=CN(MAX_EPOCH=200), MODEL=CN(INIT_WEIGHTS="", BACKBONE=CN(NAME="ViT-B/16")), SEED=SEED)
    code, _ = co.block("train.py", lambda t: [function(t, "extend_cfg")])
    ns: dict = {}
    saved = {k: sys.modules.get(k) for k in ("yacs", "yacs.config")}
    sys.modules.update({"yacs": stub("yacs"), "yacs.config": stub("yacs.config", CfgNode=CN)})
    try:
        exec(code, ns)
        ns["extend_cfg"](cfg)
    finally:
        for k, v in saved.items():
            sys.modules.pop(k) if v is None else sys.modules.__setitem__(k, v)
    merge(cfg, yaml.safe_load(co.source(CFG_FILE)))
    sh = dict(re.findall(r"^(\w+)=(\S+)$", co.source(SCRIPT), re.M))
    cfg.TRAINER.ZIP.N_CTX, cfg.TRAINER.ZIP.INTRINSIC_DIM = int(sh["NCTX"]), int(sh["INTRINSIC_DIM"])
    cfg.TRAINER.ZIP.RANK, cfg.TRAINER.BASIC.MAX_API_CALLS = int(sh["RANK"]), int(sh["MAX_API_CALLS"])
    cfg.INPUT.SIZE = (image_size, image_size)  # the toy's images (PromptLearner asserts it)
    cfg.DATALOADER.TRAIN_X.BATCH_SIZE = BATCH
    if opt_type:
        cfg.TRAINER.BASIC.OPT_TYPE = opt_type
    return cfg


# ---------------------------------------------------------------------------------------
def run_official(co: Checkout, arrays: dict, *, direct: bool) -> dict:
    """Build the official trainer on the toy and run STEPS batches of its run_epoch."""
    tc = toy.ToyCLIP(arrays, CLASSES)
    clip_model = ToyZipClip(tc)
    mods = clip_modules(tc)
    mods["clip"].clip = mods["clip"]  # `from clip import clip; clip.tokenize(...)`
    stubs = {**mods, **dassl_modules(), "torchinfo": stub("torchinfo", summary=None),
             "trainers": stub("trainers"), "trainers.utils": stub("trainers.utils", load_clip_to_cpu=lambda cfg: clip_model)}
    stubs["trainers"].__path__ = []
    off = co.load_module(TRAINER, "zip_trainer_official", stubs=stubs)
    off.print = lambda *a, **k: None
    cfg = official_cfg(co, tc.image_size, "spsa" if direct else None)
    if direct:
        class DirectCLIP(off.CustomCLIP):
            """ZO-SGD: the trainer's 'intrinsic_learner' is the official PromptLearner itself, so
            the SPSA statements act on the raw context ctx (m, D)."""

            def __init__(self, cfg, classnames, clip_model, device):
                super().__init__(cfg, classnames, clip_model, device)
                self.intrinsic_learner = off.PromptLearner(cfg, classnames, clip_model)

        off.CustomCLIP = DirectCLIP

    # train.py main(): set_random_seed(cfg.SEED), as Dassl does it
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    tr = off.ZIP.__new__(off.ZIP)
    tr.cfg, tr.device, tr._models = cfg, torch.device("cpu"), {}
    tr.dm = types.SimpleNamespace(dataset=types.SimpleNamespace(classnames=CLASSES))
    with cuda_recorder([]):
        tr.build_model()
    learner = tr.model.intrinsic_learner
    w0 = nn.utils.parameters_to_vector(learner.parameters()).detach().clone()
    start = {"w0": w0}
    if direct:
        start["ctx0"] = learner.ctx.detach().clone()
    else:
        names = [f"ctx_{i}" for i in range(learner.nctx)]
        ff = [learner.fastfood_params[n] for n in names]  # [BB, Pi, GG, divisor, LL] per token
        start.update({"ctx0": torch.stack([learner.initial_value[n] for n in names]),
                      "B": torch.stack([f[0] for f in ff]).to(torch.int8), "Pi": torch.stack([f[1] for f in ff]).to(torch.int16),
                      "G": torch.stack([f[2] for f in ff]), "divisor": torch.stack([f[3] for f in ff]), "LL": int(ff[0][4])})
    with torch.no_grad():
        start["initial_prompt"] = learner()[0, 1 : 1 + cfg.TRAINER.ZIP.N_CTX].clone()  # at w0: θ0

    # the official train loader's batches: STEPS distinct batches of the toy training images
    order = np.random.default_rng(SEED).permutation(N_TRAIN)[: STEPS * BATCH].reshape(STEPS, BATCH)
    px, y = tc.pixels(arrays), torch.from_numpy(arrays["labels"])
    tr.train_loader_x = [{"img": px[i], "label": y[i]} for i in order]
    tr.epoch, tr.max_epoch = 0, cfg.OPTIM.MAX_EPOCH
    losses: list[torch.Tensor] = []
    tr.loss_fn = lambda out, lab: (losses.append(r := off.F.cross_entropy(out, lab)), r)[1]  # records, changes none
    seen, deltas = [], []
    meters = {}
    real_meter = off.MetricMeter
    off.MetricMeter = lambda: meters.setdefault("m", real_meter())
    learner_forward = "PromptLearner.forward" if direct else "IntrinsicLearner.forward"
    with cuda_recorder(deltas), returns(str(co.file(TRAINER)), {"ZIP.forward_backward", "ZIP.spsa_grad_estimate_bi",
                                                               learner_forward}, seen):
        tr.run_epoch()

    steps = [loc for q, loc in seen if q == "ZIP.forward_backward"]
    ests = [loc for q, loc in seen if q == "ZIP.spsa_grad_estimate_bi"]
    decodes = [loc for q, loc in seen if q == learner_forward]  # one per query, in order
    n = cfg.TRAINER.BASIC.SP_AVG
    assert len(steps) == STEPS and len(deltas) == n * STEPS and len(losses) == 2 * n * STEPS == len(decodes)
    traj = []
    for s, (st, est) in enumerate(zip(steps, ests)):
        dirs = torch.stack(deltas[s * n : (s + 1) * n])  # (N, δ)
        ck = st["ck"]
        rec = {
            "k": s + 1, "ak": float(st["ak"]), "ck": float(ck), "batch": order[s],
            "perturbations": dirs,
            # what the learner's parameters held at each forward: w_r, w_l of pair 1, then pair 2, ...
            "points": torch.stack([d["_params"] for d in decodes[s * 2 * n : (s + 1) * 2 * n]]),
            "losses": torch.stack(losses[s * 2 * n : (s + 1) * 2 * n]).float(),
            "estimates": torch.cat(est["ghats"]),  # (N, δ): ĝ_j = (L+ - L-) / (2 c_k Δ_j)
            "ghat": st["ghat"], "update": st["accum_ghat"], "w": st["w_new"],
            "reported_loss": float(st["loss"]), "api_calls": None,
        }
        if "NORM" in st:
            rec.update({"norm": float(st["NORM"]), "delta": float(st["DELTA"]), "clipped": bool(st["NORM"] >= st["DELTA"])})
        if not direct and s == 0:  # decode of step 1's ten points: W = U diag(s) Vᵀ + 1 shared_Vᵀ, then θ0 + F_i(w_i)
            rec["W"] = torch.stack([d["reconstruction_matrix"] for d in decodes[: 2 * n]])
            rec["ctx"] = torch.stack([d["set_params"] for d in decodes[: 2 * n]])
        traj.append(rec)
    traj[-1]["api_calls"] = tr.API_calls
    for t in traj:  # the recorded Δ are the ones the points were formed with
        w = traj[t["k"] - 2]["w"] if t["k"] > 1 else w0
        pm = torch.stack([x for d in t["perturbations"] for x in (w + t["ck"] * d, w - t["ck"] * d)])
        assert torch.equal(pm, t["points"]), "Δ and the points do not match"
    assert [round(v, 6) for v in meters["m"].meters["loss"].vals] == [round(t["reported_loss"], 6) for t in traj]
    return {"cfg": plain(cfg), "start": start, "trajectory": traj}


def statements(co: Checkout, direct: bool) -> list[dict]:
    out = [{"file": "train.py", "lines": lines_of(co, "train.py", "extend_cfg")[0]["lines"],
            "what": "extend_cfg: the defaults of TRAINER.BASIC and TRAINER.ZIP"},
           {"file": CFG_FILE, "lines": [1, len(co.source(CFG_FILE).splitlines())],
            "what": "the ZIP config (OPT_TYPE, SP_AVG, SPSA_PARAMS)" + (", OPT_TYPE set to 'spsa'" if direct else "")},
           {"file": SCRIPT, "lines": [1, len(co.source(SCRIPT).splitlines())],
            "what": "NCTX, INTRINSIC_DIM, RANK, MAX_API_CALLS"}]
    out += lines_of(co, TRAINER, "TextEncoder", "PromptLearner", *([] if direct else ["IntrinsicLearner"]), "CustomCLIP",
                    "ZIP.build_model", "ZIP.forward_backward", "ZIP.spsa_grad_estimate_bi", "ZIP.run_epoch")
    if not direct:
        out += lines_of(co, "projections/intrinsic.py", "fast_walsh_hadamard_torched", "fastfood_vars", "fastfood_torched")
    return out


def fixture(co: Checkout, name: str, dim: int, direct: bool, notes: list[str]) -> None:
    arrays = toy.generate(0, CLASSES, N_TRAIN, dim=dim, hidden=16, context=12)
    out = run_official(co, arrays, direct=direct)
    write(name, {
        "method": name,
        "official": official_section(co, statements(co, direct)),
        "regenerate": command("zip.py", co),
        "environment": environment(),
        "notes": notes,
        "inputs": {"classnames": CLASSES, "model": arrays, "n_train": N_TRAIN, "batch_size": BATCH, "cfg": out["cfg"],
                   **out["start"]},
        "trajectory": out["trajectory"],
    })


COMMON = [
    "model: the toy CLIP (tools/parity/toy.py) as clip_model, so the official statements run unchanged end to end "
    "(prompt assembly, text and image encoders, cross-entropy); a fixed loss table could not serve: each loss "
    "depends on the point the official code itself perturbs",
    "on a CPU the official `with autocast():` is off (torch disables CUDA autocast without a GPU), so the official "
    "losses here are float32; on a GPU the release computes CLIP's forward in float16 under autocast, which bbpt "
    "does not reproduce (it queries CLIP in its own precision)",
    "batches: 3 distinct batches of 32 toy images (the release: 128 with Dassl's sampler); the test feeds bbpt the "
    "same images (inputs/batch per step), views off on both sides (the release's random crops and flips are "
    "data augmentation, not the optimiser)",
    "Δ, θ0 (and for ZIP V and the Fastfood B, Π, G) are drawn by the official statements from torch / numpy's "
    "global generators; bbpt draws them from its own seeded generators, so the test injects the official draws "
    "and checks bbpt's own draws for their distribution only",
    "reported_loss: the official `loss` is (L+ + L-)/2 of the LAST pair only (spsa_grad_estimate_bi); bbpt's "
    "train_loss is the mean of all 2N losses: a logged figure only, the trajectory does not depend on it",
]


def main(path: str) -> None:
    co = Checkout(path, "LOG-postech/ZIP")
    fixture(co, "zip", 80, False, COMMON + [
        "ZIP: OPT_TYPE 'spsa-clip' with configs/trainers/ZIP/vit_b16.yaml and scripts/few_shot/ZIP.sh's "
        "N_CTX 8, INTRINSIC_DIM 500, RANK 5: q = 62, δ = 417, clipping threshold √417",
        "toy width D = 80 (CLIP's 512): Fastfood pads to LL = 128 and keeps the first 80 outputs, with the "
        "√(D/LL) factor, so the crop and the scale are covered; per-token (B, Π, G, divisor) in inputs",
        "every step here clips (‖ĝ‖ 261-445 > √417 ≈ 20.4: the toy's losses are steep); the unclipped update "
        "(‖ĝ‖ < √δ, accum_ghat = ghat) is what zosgd.json's 'spsa' steps check",
    ])
    fixture(co, "zosgd", 32, True, COMMON + [
        "no official trainer runs SPSA on the raw text context: ZIP's OPT_TYPE 'spsa' still acts on the "
        "intrinsic vector (U, s, V, shared_V) and BlackVIP's on its coordinator network. The fixture composes "
        "the official pieces instead: ZIP's trainer with OPT_TYPE 'spsa' (no clipping, no momentum) and the "
        "official PromptLearner as the model's `intrinsic_learner`, so parameters_to_vector gives the raw "
        "context ctx (m·D) and forward_backward / spsa_grad_estimate_bi run unchanged on it; that substitution "
        "(the DirectCLIP subclass in tools/parity/zip.py) is the only glue",
        "toy width D = 32: d = 8 · 32 = 256",
    ])


if __name__ == "__main__":
    main(*sys.argv[1:])
