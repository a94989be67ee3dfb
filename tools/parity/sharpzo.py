"""Parity fixture for SharpZO: the official ``main_sharpzo.py`` run as its released script runs
it (``run_all_final_exps.sh``: ``--prompt_trainer zo --smoothness_estimator zo``, zo_lr 1e-3,
zo_eps_cge 1e-3, ...), on the toy CLIP, for three sharpness-aware CMA-ES generations and three
ZO-SGD steps.

    python tools/parity/sharpzo.py /path/to/sharpzo      # in an environment with cma==4.0.0

writes tests/parity/sharpzo.json.

What runs is the official code: ``main()`` (its argparse with the released script's command
line, the yaml config, the seeds, the loaders), then ``run()``'s own statements: everything
before its ``for step in ...:`` once, then that loop's body once per step, so ``PromptLearner``
(``__init__``, ``forward``, ``update_context_prompt``), ``BBCLIP``, ``utils.compute_eps`` and
``ZOTrainer`` (``zo_step_cge``, ``zo_step``, ``zo_perturb_parameters``, ``zo_update``) run as
released. Stubs stand in for what needs data, a GPU or a download: ``clip`` and ``clip_model``
(the toy CLIP, :mod:`clipstub`), the ``datasets`` loaders (one batch of toy images, in order:
training views are the images themselves on both sides), ``wandb`` and ``functorch`` (unused).
The fixture's own settings: ``intrinsic_dim`` 128 (the yaml's 512 would store 40 x 512 rows per
ask; the statements read it from cfg), ``--change_point 3 --total_steps 6`` (the script's 100 and
200000: three generations, then three ZO steps).
"""
from __future__ import annotations

import ast
import os
import shlex
import sys

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch
import yaml

import toy
from clipstub import ToyClipModel, clip_modules
from fixture import write
from official import Checkout, command, cpu_for_cuda, environment, function, official_section, stub

from bbpt._compat import chdir

CLASSES = ["cat", "dog", "ship", "tree", "car"]
N_TRAIN, N_TEST = 40, 10
CHANGE_POINT, STEPS = 3, 6  # generations 0-2 (stage 1), steps 3-5 (stage 2)
OVERRIDES = {"intrinsic_dim": 128}  # on the yaml config (see the notes: not 64)
SCRIPT = "run_all_final_exps.sh"


def released_command(co: Checkout) -> tuple[list[str], list[int]]:
    """The arguments of the script's (first, uncommented) ``python main_sharpzo.py ...`` line."""
    for i, line in enumerate(co.source(SCRIPT).splitlines(), 1):
        if "main_sharpzo.py" in line and not line.lstrip().startswith("#"):
            words = shlex.split(line, comments=True)
            args = words[words.index("main_sharpzo.py") + 1 :]
            return [a for a in args if a not in ("&",)], [i, i]
    sys.exit(f"{SCRIPT}: no `python main_sharpzo.py` line")


def with_fixture_schedule(argv: list[str]) -> list[str]:
    out = list(argv)
    for flag, value in (("--change_point", CHANGE_POINT), ("--total_steps", STEPS)):
        out[out.index(flag) + 1] = str(value)
    return [a.replace("$ROOT", "/nonexistent") for a in out]


def split_run(tree):
    """run()'s statements before its `for step in ...:`, and that loop's body."""
    body = function(tree, "run").body
    k = next(i for i, s in enumerate(body) if isinstance(s, ast.For) and ast.unparse(s.target) == "step")
    return body[:k], body[k]


def main_statements(tree):
    """main() up to run(): argparse, the yaml config, the seeds, the loaders, the run() call."""
    return function(tree, "main").body


class Loader(list):
    """One batch of (pixels, labels), as ``build_data_loader`` would yield them (in order)."""


def run_official(co: Checkout, argv: list[str], arrays: dict, statements: list) -> dict:
    import cma

    tc = toy.ToyCLIP(arrays, CLASSES)
    clip_model = ToyClipModel(tc)
    mods = clip_modules(tc)
    mods["clip"].load = lambda name, *a, **k: (clip_model, None)
    utils = co.load_module("utils.py", "utils", stubs=mods)
    # utils.cls_acc calls float() on a 1-element array, which numpy 2 refuses; accuracy is not compared
    utils.cls_acc = lambda out, t: float((out.argmax(1) == t).float().mean() * 100)
    px, y = tc.pixels(arrays), torch.from_numpy(arrays["labels"])
    dataset = stub("dataset", classnames=CLASSES, train_x="train", val="test", test=list(range(N_TEST)))
    loaders = {"train": Loader([(px[:N_TRAIN], y[:N_TRAIN])]), "test": Loader([(px[N_TRAIN:], y[N_TRAIN:])])}
    real_yaml = yaml
    stubs = {**mods, "utils": utils, "cma": cma,
             "datasets": stub("datasets", build_dataset=lambda cfg, name, root, shots: dataset),
             "datasets.utils": stub("datasets.utils", build_data_loader=lambda data_source, **kw: loaders[
                 "train" if data_source == "train" else "test"]),
             "datasets.imagenet": stub("datasets.imagenet", ImageNet=None),
             "wandb": stub("wandb", init=lambda **k: None, log=lambda *a, **k: None),
             "functorch": stub("functorch", vmap=None, jvp=None, jacrev=None, make_functional_with_buffers=None),
             # the config as released, with the fixture's intrinsic dimension
             "yaml": stub("yaml", Loader=real_yaml.Loader,
                          load=lambda f, Loader: {**real_yaml.load(f, Loader=Loader), **OVERRIDES})}
    stubs["datasets"].__path__ = []
    mod = co.load_module("main_sharpzo.py", "main_sharpzo_official", stubs=stubs)
    tree = ast.parse(co.source("main_sharpzo.py"))
    before, loop = split_run(tree)
    code_before = compile(ast.Module(body=before, type_ignores=[]), str(co.file("main_sharpzo.py")), "exec")
    code_loop = compile(ast.Module(body=loop.body, type_ignores=[]), str(co.file("main_sharpzo.py")), "exec")
    mn = function(tree, "main")
    statements += [
        {"file": "main_sharpzo.py", "lines": [mn.lineno, mn.end_lineno],
         "what": "main(): argparse on the released command line, the yaml config, seeds 1, loaders; its run() call "
                 "is caught and run() executed as below"},
        {"file": "main_sharpzo.py", "lines": [before[0].lineno, before[-1].end_lineno],
         "what": "run() up to its loop: features, PromptLearner (A = nn.Linear normal_(0, std), input_param = "
                 "torch.rand(40, d)), BBCLIP, the CMA-ES, ZOTrainer, requires_grad"},
        {"file": "main_sharpzo.py", "lines": [loop.body[0].lineno, loop.body[-1].end_lineno],
         "what": "the loop body, once per step: stage 1 (ask, compute_eps -> zo_step_cge, eps.mean(0), fitness at "
                 "x + eps, tell, update_context_prompt's re-ask); stage 2 (the switch to input_param.mean(0), "
                 "zo_step, zo_update)"},
        {"file": "utils.py", "lines": [80, 114], "what": "compute_eps (called by the loop)"},
    ]

    # main() as released, up to its run() call
    caught = {}
    mod.run = lambda *a, **k: caught.update(zip(("args", "cfg", "dataset", "clip_model", "val_loader",
                                                 "test_loader", "train_loader_F"), a), run_name=k["run_name"])
    saved_argv, saved_dev = sys.argv, torch.cuda.current_device
    sys.argv = ["main_sharpzo.py", *argv]
    torch.cuda.current_device = lambda: "cpu"
    silent = lambda *a, **k: None  # noqa: E731
    mod.print = silent
    normals: list[torch.Tensor] = []
    real_normal = torch.normal

    def normal(*a, **k):  # records every torch.normal draw (ZOTrainer's z), changes none
        z = real_normal(*a, **k)
        normals.append(z.detach().clone())
        return z

    try:
        with chdir(co.path), cpu_for_cuda():
            mod.main()
        ns = {**vars(mod), **caught, "print": silent}
        with cpu_for_cuda():
            exec(code_before, ns)
            es, pl, zt, bb = ns["es"], ns["prompt_learner"], ns["zo_trainer"], ns["bb_clip"]
            asks: list[np.ndarray] = []
            ask = es.ask
            es.ask = lambda *a, **k: asks.append(np.array(r := ask(*a, **k))) or r  # records every ask
            losses: list[float] = []
            zo_forward = zt.zo_forward
            zt.zo_forward = lambda *a, **k: losses.append(float(r := zo_forward(*a, **k))) or r
            evals = [0]
            forward = bb.forward

            def counted(*a, **k):  # training evaluations (the test evaluation passes other features)
                evals[0] += k.get("train_features") is pl.train_features
                return forward(*a, **k)

            bb.forward = counted
            start = {"A": pl.linear.weight.detach().clone(), "ctx0": pl.ctx.detach().clone(),
                     "rows": pl.input_param.detach().clone()}
            traj = []
            torch.normal = normal
            for step in range(ns["start_step"], ns["args"].total_steps):
                ns["step"] = step
                n_asked, n_losses, n_normals = len(asks), len(losses), len(normals)
                point = pl.input_param.detach().clone()
                exec(code_loop, ns)
                if step < ns["args"].change_point:
                    grad = zt.grad_tmp["input_param"]  # (40, d), one row repeated
                    assert torch.equal(grad, grad[:1].expand_as(grad)), "the CGE rows differ"
                    traj.append({
                        "stage": 1, "cge_at": point.mean(0), "cge_losses": np.array(losses[n_losses:]),
                        "grad": grad[0].clone(), "eps": ns["eps"].detach().clone(),
                        "population": asks[n_asked].astype(np.float32), "fitness": np.array(ns["fitnesses"]),
                        "mean": np.array(es.mean), "sigma": float(es.sigma),
                        "reask": pl.input_param.detach().clone(), "evals": evals[0]})
                    assert np.array_equal(asks[n_asked + 1].astype(np.float32), traj[-1]["reask"].numpy())
                else:
                    z = normals[n_normals]  # the step's z: (d,) at the first step, then (40, d)
                    assert all(torch.equal(z, n) for n in normals[n_normals:]), "z is redrawn from its seed"
                    w = pl.input_param.detach()
                    traj.append({
                        "stage": 2, "start": ns["compressed"].clone() if step == ns["args"].change_point else None,
                        "z": z, "direction": z if z.dim() == 1 else z.mean(0), "losses": np.array(losses[n_losses:]),
                        "projected_grad": float(zt.projected_grad[0]), "param_shape": list(w.shape),
                        "w": w.mean(0) if w.dim() == 2 else w.clone(), "evals": evals[0]})
    finally:
        sys.argv, torch.cuda.current_device, torch.normal = saved_argv, saved_dev, real_normal
    cfg, args = ns["cfg"], vars(ns["args"])
    return {"start": start, "trajectory": traj,
            "cfg": {k: cfg[k] for k in ("dataset", "seed", "intrinsic_dim", "popsize", "std", "bound")},
            "args": {k: v for k, v in args.items() if isinstance(v, (int, float, str))}}


def main(path: str) -> None:
    co = Checkout(path, "yifanycc/sharpzo")
    argv, lines = released_command(co)
    cfg_file = argv[argv.index("--config") + 1]
    statements = [{"file": SCRIPT, "lines": lines, "what": "the released command line (its --change_point and "
                                                           "--total_steps replaced by the fixture's)"},
                  {"file": cfg_file, "lines": [1, len(co.source(cfg_file).splitlines())],
                   "what": f"the config, with {OVERRIDES} for the toy run"}]
    arrays = toy.generate(0, CLASSES, N_TRAIN + N_TEST)
    out = run_official(co, with_fixture_schedule(argv), arrays, statements)
    write("sharpzo", {
        "method": "sharpzo",
        "official": official_section(co, statements),
        "regenerate": command("sharpzo.py", co),
        "environment": environment(),
        "notes": [
            "toy CLIP (tools/parity/toy.py) as clip_model; training views: the images themselves on both sides",
            f"intrinsic_dim {OVERRIDES['intrinsic_dim']} (the config's 512 would make the fixture ~1 MB); population "
            "40 as the release hard-codes it. Not 64: there, with population 40, the CSA damping of the pinned "
            "cma==4.0.0 (1 + c_s) and of pycma 4.5, which bbpt runs (compute_damps adds "
            "2 max(0, 3 sqrt((mueff - 1) / (N + 1)) - 1) = 0.37), differ, and sigma with them by 1 % from "
            "generation 0; from d = 92 on (population 40) the two agree",
            f"--change_point {CHANGE_POINT} --total_steps {STEPS} (the script: 100 and 200000)",
            "the CGE gradient is (40, d) with one row repeated (checked): its first row is stored; so is each "
            "stage-2 z, (d,) at the first step and (40, d) after it (the never-reset grad_tmp broadcasts the "
            "parameter to 40 rows), with its row mean, the direction the forward pass sees",
            "stage-2 z come from torch.manual_seed(np.random.randint(1e9)): the test injects them",
        ],
        "inputs": {"classnames": CLASSES, "model": arrays, "n_train": N_TRAIN, "released_argv": argv,
                   "cfg": out["cfg"], "args": out["args"], **out["start"]},
        "trajectory": out["trajectory"],
    })


if __name__ == "__main__":
    main(*sys.argv[1:])
