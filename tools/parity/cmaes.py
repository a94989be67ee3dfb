"""Parity fixture for bbpt.optim.CMAES: the official CraFT code's CMA-ES (``main_craft.py``
``run()``: its ``cma_opts``, ``es = cma.CMAEvolutionStrategy(...)``), asked and told for four
generations on a fixed quadratic, under the pycma its releases ran (cma<=4.0; SharpZO pins
cma==4.0.0): the CSA step-size rule.

    python tools/parity/cmaes.py /path/to/CraFT      # in an environment with cma==4.0.0

writes tests/parity/optim_cmaes.json.
"""
from __future__ import annotations

import ast
import sys

import numpy as np

from fixture import write
from official import Checkout, command, environment, function, official_section

GENERATIONS = 4


def es_statements(tree):
    """``cma_opts = {...}`` through ``es = cma.CMAEvolutionStrategy(...)`` in run()."""
    body = function(tree, "run").body
    start = next(i for i, s in enumerate(body) if isinstance(s, ast.Assign) and ast.unparse(s.targets[0]) == "cma_opts")
    end = next(i for i, s in enumerate(body) if isinstance(s, ast.Assign) and ast.unparse(s.targets[0]) == "es")
    return body[start : end + 1]


def quadratic(d: int, seed: int):
    rng = np.random.default_rng(seed)
    target = rng.standard_normal(d)
    scale = np.exp(rng.uniform(-1, 1, d))  # an ill-conditioned bowl, so the covariance matters
    return target, scale


def main(path: str) -> None:
    import cma

    co = Checkout(path, "mrflogs/CraFT")
    code, lines = co.block("main_craft.py", es_statements)
    cfg = {"seed": 1, "popsize": 40, "budget": 8000, "parallel": False, "bound": 5, "intrinsic_dim": 512, "sigma": 1}
    ns = {"cma": cma, "cfg": cfg, "print": lambda *a, **k: None}
    exec(code, ns)
    es = ns["es"]
    target, scale = quadratic(cfg["intrinsic_dim"], 0)
    traj = []
    for _ in range(GENERATIONS):
        X = es.ask()
        f = [float((scale * (x - target) ** 2).sum()) for x in X]
        es.tell(X, f)
        traj.append({"population": np.array(X, dtype=np.float32), "fitness": np.array(f), "mean": np.array(es.mean),
                     "sigma": float(es.sigma)})
    write("optim_cmaes", {
        "method": "optim:cmaes",
        "official": official_section(co, [{"file": "main_craft.py", "lines": lines,
                                           "what": "cma_opts and the CMA-ES built from them (seed, popsize, maxiter, "
                                                   "bounds); then es.ask() / es.tell() as in the loop"}]),
        "regenerate": command("cmaes.py", co),
        "environment": environment(),
        "notes": ["the official releases predate pycma 4.5 (SharpZO pins cma==4.0.0): sigma follows CSA; "
                  "pycma 4.5's default at d >= 300 is TPA, which leaves this trajectory at generation 2"],
        "inputs": {"cfg": cfg, "target": target, "scale": scale,
                   "fitness": "sum(scale * (x - target)**2) per candidate"},
        "trajectory": traj,
    })


if __name__ == "__main__":
    main(*sys.argv[1:])
