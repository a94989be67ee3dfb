"""Parity fixtures for BPT-VLM: the official ``BBT_VL_Shallow.py`` (option ``shallow_cma``) run
statement for statement on the toy CLIP with a toy ViT (:func:`toy.generate_vit`), four
generations of CMA-ES over the text and visual prompt tokens.

    python tools/parity/bptvlm.py /path/to/BPT-VLM      # in an environment with cma==4.0.0

writes tests/parity/bptvlm.json (d_L + d_V = 48 + 32, with the projections, decodes and
fitness), tests/parity/bptvlm_cma.json (the official d_L + d_V = 500 + 500: the CMA-ES) and
tests/parity/bptvlm_d40.json (24 + 16: the CMA-ES where pycma's later CSA damping differs).

What runs is the official code: ``BBT_VL_Shallow.py``'s own statements (the config, the
CMA-ES of ``algorithm/CMA_ES.py`` built from it, ``PromptCLIP_Shallow``, then the body of its
``while not opt.stop():`` once per generation and the final ``prompt_clip.test()``), with
``model/Shallow_Prompt_CLIP.py`` and ``model/shallow_encoder.py`` imported as they are.
Stubs stand in for what needs data, a GPU or a download: ``clip`` (the toy tokenizer; ``load``
returns the toy CLIP in OpenAI's shape, :mod:`clipstub`, with an OpenAI-shaped ViT over the
toy ViT's weights), ``dataset.general`` (torch DataLoaders over the toy images, which the toy
takes as they are: mean 0, std 1), the pypop7 optimisers (not this code path) and
``Analysis_Util`` (result files; never reached in four generations).
"""
from __future__ import annotations

import ast
import builtins
import os
import re
import sys

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch
import torch.nn as nn

import toy
from clipstub import ToyClipModel, clip_modules
from fixture import write
from official import Checkout, command, cpu_for_cuda, environment, official_section, stub

SCRIPT, CLIPFILE, ENCODER, CMAFILE, CONFIG = ("BBT_VL_Shallow.py", "model/Shallow_Prompt_CLIP.py",
                                              "model/shallow_encoder.py", "algorithm/CMA_ES.py",
                                              "configs/shallow_prompt.yaml")
TASK = "OxfordPets"  # budget 3600, test_every 12: maxiter 120, the first test at call 360
CLASSES = ["cat", "dog", "red fox", "owl"]  # names as bbpt's tasks hold them (cleaned); one of two words
N_IMAGES, TORCH_SEED = 72, 0  # 72 images at the official batch 64: batches of 64 and 8


class _Pool(nn.Module):
    """The toy ViT's pooling as a 'transformer' in OpenAI's LND layout: position 0 holds it."""

    def __init__(self, vit: toy.ToyViT):
        super().__init__()
        self.vit = vit

    def forward(self, x):  # (T, N, W)
        return torch.cat([self.vit.pool(x.permute(1, 0, 2))[None], x[1:]])


class ToyVisual(nn.Module):
    """What ``model/shallow_encoder.py``'s VisionEncoder reads of ``clip_model.visual``, over
    the toy ViT's weights: conv1 (no bias), class and positional embeddings, identity ln_pre
    and ln_post, the pooling 'transformer' and proj."""

    def __init__(self, vit: toy.ToyViT, image_size: int, embed: int):
        super().__init__()
        self.input_resolution, self.patch_size, self.output_dim, self.width = image_size, vit.patch, embed, vit.width
        self.conv1 = nn.Conv2d(3, vit.width, kernel_size=vit.patch, stride=vit.patch, bias=False)
        self.conv1.weight.data.copy_(vit.conv1)
        self.class_embedding = nn.Parameter(vit.cls.clone())
        self.positional_embedding = nn.Parameter(vit.positions.clone())
        self.ln_pre, self.ln_post = nn.Identity(), nn.Identity()
        self.transformer = _Pool(vit)
        self.proj = nn.Parameter(vit.proj.clone())


class ToySet(torch.utils.data.Dataset):
    """The official FewshotDataset's items: {"image", "label"}, and its ``classes``."""

    def __init__(self, px, y, classes):
        self.px, self.y, self.classes = px, y, classes

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"image": self.px[i], "label": self.y[i]}


def split_script(tree: ast.Module):
    """The script's statements up to ``cfg["parallel"] = ...`` (the config), from there up to the
    pypop7 / CMA-ES branch (model and optimiser), the CMA-ES branch's set-up statements, its
    ``while`` loop's body, and the final test."""
    body = tree.body
    branch = next(i for i, s in enumerate(body) if isinstance(s, ast.If) and "__pypop__" in ast.unparse(s.test))
    device = next(i for i, s in enumerate(body) if isinstance(s, ast.Assign) and ast.unparse(s.targets[0]) == "device")
    classification = body[branch].orelse[0]  # else: if args.task_name in __classification__:
    loop = next(s for s in classification.body if isinstance(s, ast.While))
    setup = [s for s in classification.body if s is not loop]
    return body[:device], body[device:branch], setup, loop.body, body[branch + 1 :]


def run_official(co: Checkout, overrides: dict, arrays: dict, generations: int, focal: bool) -> dict:

    tc, vit = toy.ToyCLIP(arrays, CLASSES), toy.ToyViT(arrays)
    clip_model = ToyClipModel(tc)
    clip_model.visual = ToyVisual(vit, tc.image_size, tc.W2.shape[1])
    mods = clip_modules(tc)
    mods["clip"].load = lambda name, device=None, **kw: (clip_model, None)
    data = ToySet(tc.pixels(arrays), torch.from_numpy(arrays["labels"]), CLASSES)

    def loader(batch_size=1, **kw):  # load_train / load_test: (dataset, DataLoader(shuffle=True))
        return data, torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True)

    general = stub("dataset.general", load_train=loader, load_test=loader)
    pkg = stub("dataset", general=general)
    pkg.__path__ = []
    none = lambda *a, **k: None  # noqa: E731
    stubs = {**mods, "dataset": pkg, "dataset.general": general,
             "dataset.cifar100": stub("dataset.cifar100", load_train_cifar100=None, load_test_cifar100=None),
             "model.analysis_utils": stub("model.analysis_utils",
                                          Analysis_Util=stub("Analysis_Util", save_results=none)),
             **{f"algorithm.{n}": stub(f"algorithm.{n}", **{c: None}) for n, c in
                (("LM_CMA_ES", "Shallow_LMCMAES"), ("MMES", "Shallow_MMES"), ("LMMAES", "Shallow_LMMAES"))}}
    printed: list[str] = []
    with co.modules(stubs):
        clipmod = co.load_module(CLIPFILE, "model.Shallow_Prompt_CLIP", stubs={"model.shallow_encoder": co.load_module(
            ENCODER, "model.shallow_encoder")})
    clipmod.print = lambda *a, **k: printed.append(" ".join(map(str, a)))  # the init statistics it prints
    stubs["model.Shallow_Prompt_CLIP"] = clipmod
    config, model, setup, loop, final = split_script(ast.parse(co.source(SCRIPT)))
    code = lambda body: compile(ast.Module(body=body, type_ignores=[]), str(co.file(SCRIPT)), "exec")  # noqa: E731
    ns = {"__name__": "__main__", "print": none, "open": lambda p, *a, **k: builtins.open(co.file(p), *a, **k)}
    argv, sys.argv = sys.argv, [SCRIPT, "--task_name", TASK, "--opt", "shallow_cma"]
    traj = []
    try:
        torch.manual_seed(TORCH_SEED)  # the official code never seeds torch: A_L and A_V are stored below
        with co.modules(stubs), cpu_for_cuda():
            exec(code(config), ns)
            ns["cfg"].update(overrides)
            exec(code(model), ns)
            exec(code(setup), ns)
            pc, es = ns["prompt_clip"], ns["opt"].es
            for _ in range(generations):
                exec(code(loop), ns)
                traj.append({"population": np.array(ns["solutions"]),  # float64, as pycma asked
                             "fitness": np.array(ns["fitnesses"]), "mean": np.array(es.mean, dtype=np.float32),
                             "sigma": float(es.sigma), "text": torch.stack(ns["prompt_text_list"]),  # (P, n_L, D)
                             "visual": torch.stack(ns["prompt_image_list"])})  # (P, n_V, W)
            exec(code(final), ns)
            focal_fitness = None
            if focal:  # the code's other loss on generation 0's candidates (after the run: its state is recorded)
                pc.loss_type = "focal"
                pairs = zip(traj[0]["text"], traj[0]["visual"])
                focal_fitness = np.array([pc.eval(tv).item() for tv in pairs])
    finally:
        sys.argv = argv
    stats = {}
    for line in printed:  # '[Embedding] mu: .. | std: .. [RandProj]  mu: .. | std: ..' and '[Conv] ...'
        nums = [float(v) for v in re.findall(r"[-+]?\d+\.?\d*(?:[eE][-+]?\d+)?", line.split("]", 1)[1])]
        stats[line[1:line.index("]")]] = dict(zip(["mu_hat", "std_hat", "mu", "std"], nums))
    span = lambda body: [body[0].lineno, max(s.end_lineno for s in body)]  # noqa: E731
    what = [
        (CONFIG, [1, len(co.source(CONFIG).splitlines())], f"the config ({TASK}), {sorted(overrides) or 'none'} set"),
        (SCRIPT, span(config), "arguments and the config"),
        (SCRIPT, span(model), "dimensions, shallow_cma(cfg) (the CMA-ES), PromptCLIP_Shallow"),
        (CMAFILE, [1, 24], "shallow_cma: pycma's options (seed, popsize, maxiter), x0 = 0, σ"),
        (CLIPFILE, [11, 231], "PromptCLIP_Shallow: A_L, A_V and their init, the text pattern 'X'*n + classname + '.', "
                              "decodes, the fitness (eval, metric), test"),
        (ENCODER, [4, 158], "TextEncoder (context after SOS), VisionEncoder (visual tokens after CLS + patches + "
                            "positions, before ln_pre)"),
        (SCRIPT, span(setup), "the encoders' contexts"),
        (SCRIPT, span(loop), "the loop body, once per generation: ask, decode, fitness, tell"),
        (SCRIPT, span(final), "the final test of the best prompt"),
    ]
    statements = [{"file": f, "lines": ls, "what": w} for f, ls, w in what]
    return {"statements": statements, "cfg": ns["cfg"], "trajectory": traj, "init": stats,
            "A_L": pc.linear_L.weight.detach().clone(), "A_V": pc.linear_V.weight.detach().clone(),
            "best": {"min_loss": float(pc.min_loss), "text": pc.best_prompt_text, "visual": pc.best_prompt_image,
                     "test_acc": float(ns["acc"])},
            "focal_fitness": focal_fitness}


def main(path: str) -> None:
    co = Checkout(path, "ECNU-ICALK/BPT-VLM")
    arrays = toy.generate(0, CLASSES, N_IMAGES)
    arrays.update(toy.generate_vit(1, arrays))
    env = environment()
    common = ["toy CLIP (tools/parity/toy.py) with a toy ViT (generate_vit): [CLS, patches] + positions, visual "
              "tokens appended without positions, an attention pooling with a position prior; identity ln_pre",
              f"the official code never seeds torch: A_L and A_V (nn.Linear weights, normal_) are drawn after "
              f"torch.manual_seed({TORCH_SEED}) and stored; bbpt's test injects them",
              "the numpy stream of pycma (seed 42) is the one a run with the few-shot pickle already cached sees; "
              "a first run (dataset/general.py 64-65: np.random.seed(42), shuffle of the whole train split, "
              "between the CMA-ES's construction and its first ask) draws other populations"]
    small = run_official(co, {"intrinsic_dim_L": 48, "intrinsic_dim_V": 32}, arrays, 4, focal=True)
    write("bptvlm", {
        "method": "bptvlm",
        "official": official_section(co, small["statements"]),
        "regenerate": command("bptvlm.py", co),
        "environment": env,
        "notes": common + ["intrinsic_dim_L 48 and intrinsic_dim_V 32 set in the config (the official statements take "
                           "d_L, d_V from it) to keep the fixture small; bptvlm_cma.json has the official 500 + 500",
                           "focal_fitness: generation 0's candidates under loss_type 'focal', the code's other loss"],
        "inputs": {"classnames": CLASSES, "model": arrays, "cfg": small["cfg"], "A_L": small["A_L"],
                   "A_V": small["A_V"], "init": small["init"], "focal_fitness": small["focal_fitness"],
                   "best": small["best"]},
        "trajectory": [{**g, "population": g["population"].astype(np.float32)} for g in small["trajectory"]],
    })
    full = run_official(co, {}, arrays, 3, focal=False)
    keep = 10  # candidates stored in full; every candidate's coordinate sum and sum of squares besides
    write("bptvlm_cma", {
        "method": "bptvlm",
        "official": official_section(co, full["statements"]),
        "regenerate": command("bptvlm.py", co),
        "environment": env,
        "notes": common + [f"the official dimensions (500 + 500, population 30): each generation's first {keep} "
                           "candidates in full (float32) and every candidate's sum and sum of squares (float64), "
                           "which keeps the fixture small; the mean after tell depends on all 30",
                           "the fitness values are the official statements' on the toy; A_L, A_V are not stored"],
        "inputs": {"classnames": CLASSES, "model": arrays, "cfg": full["cfg"], "keep": keep},
        "trajectory": [{"population": g["population"][:keep].astype(np.float32), "sums": g["population"].sum(1),
                        "squares": (g["population"] ** 2).sum(1), "fitness": g["fitness"],
                        "mean": g["mean"], "sigma": g["sigma"]} for g in full["trajectory"]],
    })
    d40 = run_official(co, {"intrinsic_dim_L": 24, "intrinsic_dim_V": 16}, arrays, 4, focal=False)
    write("bptvlm_d40", {
        "method": "bptvlm",
        "official": official_section(co, d40["statements"]),
        "regenerate": command("bptvlm.py", co),
        "environment": env,
        "notes": common + ["intrinsic_dim_L 24 and intrinsic_dim_V 16 set in the config: 40 dimensions at population "
                           "30, where pycma 4.5's CSA damping (cma.sigma_adaptation CMAAdaptSigmaCSA.compute_damps, "
                           "_CSA_dampfac_mueff_inner = 3) is larger than pycma 4.0's (d_sigma = 1 + c_sigma here): "
                           "sigma departs at generation 1; at 80 dimensions and more they agree",
                           "the fitness values are the official statements' on the toy; A_L, A_V are not stored"],
        "inputs": {"classnames": CLASSES, "model": arrays, "cfg": d40["cfg"]},
        "trajectory": [{k: g[k] if k != "population" else g[k].astype(np.float32) for k in
                        ("population", "fitness", "mean", "sigma")} for g in d40["trajectory"]],
    })


if __name__ == "__main__":
    main(*sys.argv[1:])
