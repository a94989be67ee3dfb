"""Derivative-free optimisers behind one ask/tell interface.

Every optimiser asks for a whole step's candidates as one (n, d) tensor, so they go to the
black box in one batched query, and is told their n losses (lower is better); ``tell``
returns the step's statistics (:class:`Optimiser` lists the protocol and the keys):

    z = opt.ask()            # (n, d)
    stats = opt.tell(losses) # (n,) -> {"lr": ..., ...}

- :class:`CMAES`: pycma's CMA-ES (CSA step-size rule, as the official codes ran it), its numpy
  RNG kept private so runs are reproducible.
- :class:`ZOSGD`: zeroth-order SGD; the gradient estimate comes from a ``GradientEstimator``:
  :class:`SPSA` (Spall: (L+ - L-) / (2 c_k Δ), Δ Rademacher or segmented-uniform),
  :class:`RGE` (Gaussian directions, MeZO-style: directions regenerated from seeds),
  :class:`CGE` (coordinate-wise central differences), :class:`OneSidedRGF` (BAR: q unit
  directions against one pivot evaluation); then optional clipping
  (ZIP's intrinsic-dimensional clipping α_t = min(√δ / ‖ĝ‖, 1), or a fixed threshold),
  an optional Nesterov-style momentum (BlackVIP's SPSA-GC) and an optional coordinate mask
  (SharpZO's sparse fine-tuning).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .errors import BadInput


@runtime_checkable
class Optimiser(Protocol):
    """What a zeroth-order method drives (:class:`bbpt.methods.base.ZerothOrderMethod`): one
    generation per step, asked as a whole, told its losses.

    - ``ask() -> (n, d)``: the step's candidates; ``n`` is fixed per optimiser.
    - ``tell(losses (n,)) -> dict``: update from the losses of the last ``ask`` (lower is
      better); returns the step's statistics, plain floats, which the method reports beside
      its train loss. :class:`ZOSGD`: ``grad_norm`` (‖ĝ‖ before clipping), ``clip`` (the
      clipping factor α, 1: none) and ``lr`` (the step size a_k used). :class:`CMAES`:
      ``sigma`` (the step size σ after the update).
    - ``current_loss(losses (n,)) -> float``: the training loss the step reports.
    - ``state_dict()`` / ``load_state_dict(state)``: everything a resumed run needs to
      continue bit-exactly, random streams included.

    A method moves an optimiser only through its methods (:meth:`ZOSGD.move_to`,
    :meth:`ZOSGD.set_mask`), never by writing its fields.
    """

    def ask(self) -> torch.Tensor: ...

    def tell(self, losses: torch.Tensor) -> dict[str, float]: ...

    def current_loss(self, losses: torch.Tensor) -> float: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, s: dict) -> None: ...


# ---------------------------------------------------------------------------------------
# schedules
@dataclass(frozen=True)
class SPSASchedule:
    """a_k = a / (k + o)^alpha (step size), c_k = c / k^gamma (perturbation), k = 1, 2, ...

    ZIP / BlackVIP defaults: [o, c, a, alpha, gamma] = [1.0, 0.01, 0.01, 0.4, 0.1].
    """

    a: float = 0.01
    c: float = 0.01
    o: float = 1.0
    alpha: float = 0.4
    gamma: float = 0.1

    def a_k(self, k: int) -> float:
        return self.a / (k + self.o) ** self.alpha

    def c_k(self, k: int) -> float:
        return self.c / k**self.gamma


@dataclass(frozen=True)
class Constant:
    """Constant step size and perturbation (MeZO / SharpZO stage 2)."""

    a: float = 1e-3
    c: float = 1e-3

    def a_k(self, k: int) -> float:
        return self.a

    def c_k(self, k: int) -> float:
        return self.c


@dataclass(frozen=True)
class PolyDecay:
    """BAR's schedule: a_k = (lr0 - lr_min) · (1 - min(t, frac·T) / (frac·T))^power + lr_min with
    t = k: the official trainers increment their decay step before the step
    (BlackVIP ``trainers/reprogramming.py`` 174-175, ZIP ``trainers/bar.py`` 156-157), so the
    first step already uses t = 1. Constant smoothing c_k = beta."""

    lr0: float = 10.0
    lr_min: float = 0.1
    total: int = 1000  # T, steps of the decay horizon
    power: float = 0.9
    frac: float = 0.9
    beta: float = 0.01

    def a_k(self, k: int) -> float:
        horizon = self.frac * self.total
        return (self.lr0 - self.lr_min) * (1 - min(k, horizon) / horizon) ** self.power + self.lr_min

    def c_k(self, k: int) -> float:
        return self.beta


# ---------------------------------------------------------------------------------------
# gradient estimators: directions for a step, then the estimate from the losses
class SPSA:
    """Spall's simultaneous perturbation: N pairs w ± c_k Δ_j, ĝ = mean_j (L+ - L-)/(2 c_k) · Δ_j^{-1}.

    ``dist``: "rademacher" (Δ_i = ±1) or "segmented" (|Δ_i| ~ U[0.5, 1], random sign; the
    official ZIP/BlackVIP code). Costs 2N evaluations.
    """

    def __init__(self, n_perturb: int = 5, dist: str = "rademacher"):
        if dist not in ("rademacher", "segmented"):
            raise BadInput(f"SPSA perturbation {dist!r} must be 'rademacher' or 'segmented'")
        if n_perturb < 1:
            raise BadInput(f"SPSA needs at least one perturbation, got {n_perturb}")
        self.n, self.dist = n_perturb, dist

    def evals(self, d: int) -> int:
        return 2 * self.n

    def current_loss(self, losses: torch.Tensor) -> float:
        """The training loss a step reports: the mean over the perturbed points."""
        return float(losses.mean())

    def directions(self, d: int, gen: torch.Generator) -> torch.Tensor:
        """(N, d) perturbation directions Δ_j."""
        sign = torch.randint(0, 2, (self.n, d), generator=gen).float() * 2 - 1
        if self.dist == "rademacher":
            return sign
        return sign * (0.5 + 0.5 * torch.rand(self.n, d, generator=gen))

    def points(self, w: torch.Tensor, dirs: torch.Tensor, c: float) -> torch.Tensor:
        """(2N, d): w + cΔ_1, w - cΔ_1, w + cΔ_2, ..."""
        return torch.stack([w + c * dirs, w - c * dirs], dim=1).reshape(-1, w.numel())

    def estimate(self, losses: torch.Tensor, dirs: torch.Tensor, c: float) -> torch.Tensor:
        lp, lm = losses.view(-1, 2).unbind(1)  # (N,), (N,)
        return ((lp - lm) / (2 * c))[:, None].mul(1.0 / dirs).mean(0)


class RGE(SPSA):
    """Randomised gradient estimate with Gaussian directions: ĝ = mean_j (L+ - L-)/(2μ) · u_j.

    MeZO-style: the directions are regenerated from the step's seed, never stored.
    """

    def __init__(self, n_perturb: int = 1):
        if n_perturb < 1:
            raise BadInput(f"RGE needs at least one direction, got {n_perturb}")
        self.n = n_perturb

    def directions(self, d: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randn(self.n, d, generator=gen)

    def estimate(self, losses: torch.Tensor, dirs: torch.Tensor, c: float) -> torch.Tensor:
        lp, lm = losses.view(-1, 2).unbind(1)
        return ((lp - lm) / (2 * c))[:, None].mul(dirs).mean(0)


class CGE(RGE):
    """Coordinate-wise gradient estimate: ĝ_i = (L(w + μe_i) - L(w - μe_i)) / (2μ); 2d evaluations."""

    def __init__(self):
        self.n = 0

    def evals(self, d: int) -> int:
        return 2 * d

    def directions(self, d: int, gen: torch.Generator) -> torch.Tensor:
        return torch.eye(d)

    def estimate(self, losses: torch.Tensor, dirs: torch.Tensor, c: float) -> torch.Tensor:
        lp, lm = losses.view(-1, 2).unbind(1)  # (d,)
        return (lp - lm) / (2 * c)


class OneSidedRGF:
    """One-sided random gradient-free estimate (BAR, Tsai et al. 2020):
    ĝ = (d / q) Σ_j u_j (L(w + βu_j) - L(w)) / β with u_j ~ N(0, I) scaled to unit length.
    Points: the pivot w first, then the q perturbed ones; q + 1 evaluations.
    """

    def __init__(self, q: int = 5):
        if q < 1:
            raise BadInput(f"RGF needs at least one direction, got q={q}")
        self.q = q

    def evals(self, d: int) -> int:
        return self.q + 1

    def current_loss(self, losses: torch.Tensor) -> float:
        return float(losses[0])  # the pivot: the loss at w itself

    def directions(self, d: int, gen: torch.Generator) -> torch.Tensor:
        u = torch.randn(self.q, d, generator=gen)
        return u / u.norm(dim=1, keepdim=True)

    def points(self, w: torch.Tensor, dirs: torch.Tensor, c: float) -> torch.Tensor:
        return torch.cat([w[None], w + c * dirs])  # (q + 1, d)

    def estimate(self, losses: torch.Tensor, dirs: torch.Tensor, c: float) -> torch.Tensor:
        d = dirs.shape[1]
        return (d / self.q) * ((losses[1:] - losses[0]) / c) @ dirs


def clip_factor(g: torch.Tensor, threshold: float | None) -> float:
    """α = min(threshold / ‖g‖, 1); ZIP's intrinsic-dimensional clipping uses threshold = √δ."""
    if threshold is None:
        return 1.0
    n = float(g.norm())
    return 1.0 if n == 0 else min(threshold / n, 1.0)


# ---------------------------------------------------------------------------------------
class ZOSGD:
    """w_{k+1} = w_k - a_k · α_k · update(ĝ_k) with ĝ_k from ``estimator`` at perturbation c_k.

    clip: None (no clipping), "intrinsic" (threshold √d, ZIP) or a float threshold.
    momentum: 0 for plain ZO-SGD; β > 0 for BlackVIP's SPSA-GC (m ← βm + ĝ; update ĝ + βm).
    mask: optional (d,) bool tensor; only those coordinates are perturbed and updated.
    """

    def __init__(self, w0: torch.Tensor, estimator, schedule, clip=None, momentum: float = 0.0, seed: int = 0):
        self.w = w0.detach().clone().float().flatten()
        self.d = self.w.numel()
        self.est, self.sched, self.momentum = estimator, schedule, momentum
        if clip == "intrinsic":
            self.threshold = math.sqrt(self.d)
        elif clip is None or isinstance(clip, (int, float)):
            self.threshold = None if clip is None else float(clip)
            if self.threshold is not None and self.threshold <= 0:
                raise BadInput(f"clipping threshold must be positive, got {clip}")
        else:
            raise BadInput(f"clip must be None, 'intrinsic' or a positive number, got {clip!r}")
        self.k = 1
        self.m = None
        self.mask: torch.Tensor | None = None
        self.gen = torch.Generator().manual_seed(seed)
        self._seed: torch.Tensor | None = None
        self.last: dict = {}  # the last tell's statistics (kept in checkpoints)
        self.last_grad: torch.Tensor | None = None  # the last tell's ĝ, clipped and masked (not kept)

    def move_to(self, w: torch.Tensor) -> None:
        """Continue from ``w`` ((d,) or any shape of d elements); the step count, momentum,
        mask and random stream are kept (SharpZO's switch and its accumulated update)."""
        if w.numel() != self.d:
            raise BadInput(f"ZOSGD.move_to: the point has {w.numel()} elements, the optimiser {self.d}")
        self.w = w.detach().clone().float().flatten()

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Perturb and update only the coordinates where ``mask`` ((d,), 0/1 or bool) is set;
        None: all of them."""
        if mask is not None and mask.numel() != self.d:
            raise BadInput(f"ZOSGD.set_mask: the mask has {mask.numel()} elements, the optimiser {self.d}")
        self.mask = None if mask is None else mask.detach().clone().float().flatten()

    @property
    def evals_per_step(self) -> int:
        return self.est.evals(self.d)

    def current_loss(self, losses: torch.Tensor) -> float:
        return self.est.current_loss(losses)

    def _directions(self) -> torch.Tensor:
        dirs = self.est.directions(self.d, self.gen)
        return dirs if self.mask is None else dirs * self.mask

    def ask(self) -> torch.Tensor:
        """(2N, d) points to evaluate for this step."""
        self._seed = self.gen.get_state()  # MeZO: keep the seed, not the directions
        return self.est.points(self.w, self._directions(), self.sched.c_k(self.k))

    def tell(self, losses: torch.Tensor) -> dict[str, float]:
        """Update w; returns ``{"grad_norm", "clip", "lr"}`` (see :class:`Optimiser`), also kept as
        ``last``; the clipped, masked estimate ĝ is ``last_grad``."""
        if self._seed is None:
            raise RuntimeError("tell() without ask()")
        self.gen.set_state(self._seed)
        dirs = self._directions()  # regenerated from the step's seed
        g = self.est.estimate(losses.float(), dirs, self.sched.c_k(self.k))
        if self.mask is not None:
            g = torch.nan_to_num(g) * self.mask  # CGE/SPSA over masked coordinates: 0/0 -> 0
        alpha = clip_factor(g, self.threshold)
        g = alpha * g
        if self.momentum:
            self.m = g.clone() if self.m is None else self.momentum * self.m + g
            upd = g + self.momentum * self.m
        else:
            upd = g
        self.w = self.w - self.sched.a_k(self.k) * upd
        self.last = {"grad_norm": float(g.norm() / max(alpha, 1e-12)), "clip": alpha, "lr": self.sched.a_k(self.k)}
        self.last_grad = g
        self.k += 1
        self._seed = None
        return dict(self.last)

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue bit-exactly, the RNG included."""
        clone = lambda t: None if t is None else t.clone()  # noqa: E731
        return {"w": self.w.clone(), "k": self.k, "m": clone(self.m), "gen": self.gen.get_state(),
                "mask": clone(self.mask), "pending": clone(self._seed), "last": dict(self.last)}

    def load_state_dict(self, s: dict) -> None:
        clone = lambda t: None if t is None else t.clone()  # noqa: E731
        self.w, self.k, self.m, self.mask = s["w"].clone(), int(s["k"]), clone(s["m"]), clone(s["mask"])
        self.gen.set_state(s["gen"])
        self._seed, self.last = clone(s.get("pending")), dict(s.get("last", {}))


# ---------------------------------------------------------------------------------------
_NUMPY_GLOBAL = {"numpy.random global RandomState": lambda: np.random.mtrand._rand}


def _csa_class():
    """pycma's CSA with the damping d_σ of pycma <= 4.4, which every release ran:
    d_σ = 0.5 + min(1, (λ_mirr / (0.159 λ) - 1)²) / 2 + 2 max(0, √((μ_eff - 1)/(d + 1)) - 1) + c_σ.
    pycma 4.5 damps more where μ_eff is large against d (population 40: d < ~90), through
    ``compute_damps``, the hook it provides for this. Left as in 4.5: χ_N, now exact up to
    d = 100 (4.0: a series; about 1e-8 of σ per generation at d = 40, 1e-10 at d = 1000)."""
    import cma

    class CSA(cma.sigma_adaptation.CMAAdaptSigmaCSA):
        def compute_damps(self, N, mueff, popsize=None, lam_mirr=None, damp_fac=None):
            if popsize is not None:
                self._popsize = popsize
            if lam_mirr is not None:
                self._lam_mirr = lam_mirr
            fac = self._es_opts["CSA_dampfac"] if damp_fac is None else damp_fac
            return fac * (0.5 + min(1, (self._lam_mirr / (0.159 * self._popsize) - 1) ** 2) / 2
                          + 2 * max(0, ((mueff - 1) / (N + 1)) ** self.damp_mueff_exponent() - 1) + self.cs)

    CSA.__qualname__ = CSA.__name__ = "CSA"
    return CSA


CSA = _csa_class()  # a module-level name: pickled strategies (checkpoints) refer to it


class CMAES:
    """pycma's CMA-ES with an (n, d) tensor ask and an (n,) tensor tell.

    ``step_size``: "csa" (default), cumulative step-size adaptation, the rule every official
    release ran: CraFT, BBT and BPT-VLM predate pycma 4.5 and SharpZO pins cma==4.0.0. pycma
    4.5 switches to TPA at d >= 300 (``cma.evolution_strategy.TPA_dimension``), which also
    puts two mean-shift samples into every population from the second generation on;
    "pycma" takes that choice.

    pycma seeds numpy's global RNG with ``seed`` (as the official scripts pass theirs: 1, 2,
    3; seed 0, which pycma reads as "from the clock", becomes 2^32 - 1) and draws from it;
    here that stream is private to the optimiser (its state swapped in around each call), so
    other code cannot perturb it and the state is explicit. The strategy itself is pickled for
    checkpoints with the global RNG kept *out* of the pickle (a persistent reference,
    :func:`bbpt.state.pickle_own`): a pickled copy of it would be a second, frozen stream, and a
    resumed strategy would draw other samples than the uninterrupted one.
    """

    STEP_SIZE_RULES = ("csa", "pycma")

    def __init__(self, x0: torch.Tensor, sigma0: float, popsize: int, seed: int = 0, bound: float = 0.0,
                 step_size: str = "csa"):
        import cma

        if sigma0 <= 0:
            raise BadInput(f"CMA-ES sigma must be positive, got {sigma0}")
        if popsize < 2:
            raise BadInput(f"CMA-ES population must be at least 2, got {popsize}")
        if step_size not in self.STEP_SIZE_RULES:
            raise BadInput(f"CMA-ES step_size {step_size!r} must be 'csa' (the official codes') or 'pycma'")
        opts = {"popsize": popsize, "seed": seed if seed > 0 else 2**32 - 1, "verbose": -9, "maxiter": 10**9,
                "tolfun": 0, "tolx": 0, "tolfunhist": 0, "tolstagnation": 10**9, "tolflatfitness": 10**9}
        if step_size == "csa":
            opts["AdaptSigma"] = CSA
        if bound > 0:
            opts["bounds"] = [-bound, bound]
        outer = np.random.get_state()
        self.es = cma.CMAEvolutionStrategy(x0.detach().double().flatten().numpy(), sigma0, opts)
        self._rng = np.random.get_state()
        np.random.set_state(outer)
        self.d, self.popsize = x0.numel(), popsize
        self._asked: list | None = None

    def _private(self, fn):
        outer = np.random.get_state()
        np.random.set_state(self._rng)
        try:
            return fn()
        finally:
            self._rng = np.random.get_state()
            np.random.set_state(outer)

    def ask(self) -> torch.Tensor:
        self._asked = self._private(self.es.ask)
        return torch.from_numpy(np.stack(self._asked)).float()

    def reask(self) -> torch.Tensor:
        """(n, d): ``es.ask()`` once more on the live strategy, never told back, as the official
        CraFT (``main_craft.py`` update_context_prompt, 157-160) and SharpZO
        (``main_sharpzo.py`` 374-379) loops do: it draws from, and advances, the optimiser's
        own random stream, so two re-asks give two populations and the next ``ask`` continues
        after them. Under CSA an untold ask changes nothing else; TPA's mean-shift samples
        would be consumed by it, so the combination is refused."""
        if getattr(self.es, "mean_shift_samples", False):
            raise BadInput("an untold re-ask cannot run under pycma's TPA step-size rule (it takes the mean-shift "
                           "samples the next generation needs): use step_size='csa', the official codes' rule")
        return torch.from_numpy(np.stack(self._private(self.es.ask))).float()

    def current_loss(self, losses: torch.Tensor) -> float:
        return float(losses.min())  # the generation's best

    def tell(self, losses: torch.Tensor) -> dict[str, float]:
        """Update the strategy; returns ``{"sigma"}``, the step size after the update."""
        import warnings

        from cma.evolution_strategy import InjectionWarning

        if self._asked is None:
            raise RuntimeError("tell() without ask()")
        with warnings.catch_warnings():  # at population < 6, a re-ask takes pycma's selective mirror, as the
            warnings.simplefilter("ignore", InjectionWarning)  # official loops' re-ask does; pycma warns here
            self._private(lambda: self.es.tell(self._asked, [float(v) for v in losses]))
        self._asked = None
        return {"sigma": self.sigma}

    @property
    def mean(self) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.es.mean)).float()

    @property
    def sigma(self) -> float:
        return float(self.es.sigma)

    @property
    def best(self) -> torch.Tensor:
        xb = self.es.result.xbest
        return self.mean if xb is None else torch.from_numpy(np.asarray(xb)).float()

    def state_dict(self) -> dict:
        """pycma's strategy has no state format but pickle: it is stored as bytes (see
        :mod:`bbpt.state` for why and how it is loaded only from the run's own checkpoint)."""
        from .state import pickle_own

        return {"es": pickle_own(self.es, _NUMPY_GLOBAL), "rng": self._rng, "asked": self._asked}

    def load_state_dict(self, s: dict) -> None:
        from .state import unpickle_own

        self.es, self._rng, self._asked = unpickle_own(s["es"], _NUMPY_GLOBAL), s["rng"], s.get("asked")
