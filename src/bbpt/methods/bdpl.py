"""BDPL (Diao et al., "Black-box Prompt Learning for Pre-trained Language Models", TMLR 2023;
official code shizhediao/Black-Box-Prompt-Learning @3fd736a): discrete prompt words learnt by a
variance-reduced policy gradient from the losses the API returns, for CLIP through text.

Each of the n prompt positions has a categorical distribution p_i over N candidate words
(``prompts_probs`` (n, N), uniform 1/N at the start). A step draws I prompts
j^(k) ~ Cat(p_1) x ... x Cat(p_n), sends them as templates ``"w_j1 ... w_jn {}."`` on one image
batch (one query: I api_calls of at most 128 images), and reads a cross-entropy L_k per prompt
from the returned scores (logits, or log-probabilities from a probability API: the same
cross-entropy). The estimate is the official one (``run_glue_discrete_LM.py`` 608-623):

    g = 1/(I-1) · Σ_k (L_k − L̄) · D_k,   D_k[i, j] = +1/p_ij if j = j^(k)_i, else −1/p_ij,

with L̄ the mean loss over the I samples (the variance-reducing baseline). Since Σ_k (L_k − L̄) = 0,
the −1/p terms cancel and g is 2× the paper's ∇ log P(j^(k)) estimate (Algorithm 1), up to
rounding; Adam makes the factor moot. Then, as the official code: g clipped to norm 3, one
AdamW step (lr 1e-4, weight decay 0.1), and each row projected back onto the simplex by the
official bisection on v (Σ clamp(p − v, 0, 1) = 1, |error| < 1e-3 or 21 halvings).

Departures, each an option: the official projection may leave p_ij = 0, and the next step's
−1/p_ij is then −inf and the gradient NaN (the NaN its users report, issues 3 and 4): bbpt
floors every probability at ``p_min`` after the projection (the official code is ``p_min=0``).
The official candidates are PMI n-grams of the task's training text (``pmi_ngram.py``); an image
task has no training text, so the default vocabulary is the words CLIP's own training text uses
most (``bdpl_words.txt``, from CLIP's BPE merge ranks: ``tools/bdpl_vocab.py``); ``vocab="task"``
takes the words of the task's class names and templates, or a file, one candidate a line. The
official run stops at 30 epochs or 8000 calls; bbpt's default is ZIP's comparison: 5000 api_calls.
The prompt is the argmax word at each position (the official evaluate/test); the official
"best" probabilities alias the live tensor, so its test prompt is the last one, as here.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from pydantic import Field

from ..boxes.capabilities import Needs
from ..data.staging import BatchStream, epoch_stop
from ..errors import BadInput
from ..models.blackbox import TextPrompt
from .base import Method, MethodConfig, register_method
from .common import ce_per_candidate

WORDS = Path(__file__).with_name("bdpl_words.txt")
OFFICIAL = "official (run.sh, RoBERTa)"


class BDPLConfig(MethodConfig):
    budget: int | None = Field(5000, ge=1, description="api_calls (ZIP's comparison)")
    prompt_length: int = Field(10, ge=1, le=60, description="n, prompt words before the class name")
    search_space: int = Field(200, ge=2, le=100_000, description="N, candidate words per position (the vocabulary's "
                              "first N)")
    sample_size: int = Field(20, ge=2, le=10_000, description="I, prompts sampled per step (I api_calls a batch)")
    lr: float = Field(1e-4, gt=0, le=10, description="AdamW learning rate on the probabilities")
    weight_decay: float = Field(0.1, ge=0, le=10, description="AdamW weight decay")
    max_norm: float = Field(3.0, gt=0, description="the gradient is clipped to this norm")
    p_min: float = Field(1e-6, ge=0, lt=1e-2, description="floor on every probability after the projection "
                         "(0: the official code, which can reach p = 0 and NaN)")
    epochs: int | None = Field(None, ge=1, le=100_000, description="stop after this many epochs of batches; "
                               "none: the budget alone")
    vocab: str = Field("clip-frequent", min_length=1, description="'clip-frequent' (CLIP's most used words, "
                       "bundled), 'task' (the words of the class names and templates) or a file, one word a line")
    keep_template: bool = Field(False, description="put the words before the task's template ('w1 .. wn a photo "
                                "of a {}.') instead of right before the class name ('w1 .. wn {}.')")

    sources = {
        "budget": "bbpt: ZIP's comparison, 5000 api_calls for every method (official run.sh: --api_limit 8000)",
        "batch_size": "official run.sh: --per_device_train_batch_size 128 (its DataLoader keeps an epoch's last partial "
                      "batch; bbpt's BatchStream drops it when there are >= 128 images, as Dassl's loaders)",
        "prompt_length": f"{OFFICIAL}: --prompt_length 10 (argparse default 6)",
        "search_space": f"{OFFICIAL}: --prompt_search_space 200 (argparse default 20)",
        "sample_size": f"{OFFICIAL}: --sample_size 20",
        "lr": f"{OFFICIAL}: --prompt_learning_rate 1e-4 (argparse default 5e-5)",
        "weight_decay": f"{OFFICIAL}: --weight_decay 0.1",
        "max_norm": "official: run_glue_discrete_LM.py 621, clip_grad_norm_(prompts_probs, 3)",
        "p_min": "bbpt: keeps -1/p finite; the official projection can leave p = 0 and the gradient NaN "
                 "(its issues 3 and 4)",
        "epochs": "bbpt: the budget alone, as ZIP's comparison (official: --num_train_epochs 30, or --api_limit)",
        "vocab": "bbpt: an image task has no training text for the official PMI n-grams (pmi_ngram.py); CLIP's "
                 "words by BPE merge rank instead (tools/bdpl_vocab.py)",
        "keep_template": "bbpt: 'w1 .. wn {}.'; the official code keeps its manual template after the prompt "
                         "(TEMPLATE_CONFIG), which keep_template=true mirrors",
    }


def vocabulary(how: str, task: dict) -> list[str]:
    """The candidate words, most preferred first."""
    if how == "clip-frequent":
        path = WORDS
    elif how == "task":
        text = " ".join([*task["classnames"], *(t.replace("{}", " ") for t in task["templates"])])
        return list(dict.fromkeys(re.findall(r"[a-z]+", text.lower())))
    else:
        path = Path(how)
        if not path.is_file():
            raise BadInput(f"bdpl: vocab={how!r} is neither 'clip-frequent', 'task' nor a file of words")
    lines = [w.strip() for w in path.read_text(encoding="utf-8").splitlines()]
    words = [w for w in lines if w and not w.startswith("#") and "{" not in w and "}" not in w]
    if len(words) < 2:
        raise BadInput(f"bdpl: the vocabulary {path} has {len(words)} words; it needs at least 2")
    return words


def project_rows(p: torch.Tensor) -> None:
    """Each row of ``p`` (n, N) onto the simplex in place, by the official bisection on the
    shift v (``solve_v_total_exact``, run_glue_discrete_LM.py 97-123): from [0, max p], halve
    until |Σ clamp(p − v, 0, 1) − 1| < 1e-3 or 21 halvings, then p ← clamp(p − v, 0, 1). As v >= 0
    it only removes mass: a row that AdamW left summing below 1 stays below (sampling renormalises)."""
    for row in p:
        lo, hi, tries = 0, row.max(), 0
        while True:
            tries += 1
            v = (lo + hi) / 2
            excess = (row - v).clamp(0, 1).sum() - 1
            if abs(excess) < 1e-3 or tries > 20:
                break
            if excess < 0:
                hi = v
            else:
                lo = v
        row.sub_(v).clamp_(0, 1)


class CategoricalPolicy:
    """n categorical distributions over N words (n, N), their AdamW and their sampling RNG."""

    def __init__(self, n: int, N: int, *, lr: float, weight_decay: float, max_norm: float, p_min: float, seed: int):
        self.probs = torch.full((n, N), 1 / N).requires_grad_(True)  # (n, N), the official FloatTensor of 1/N
        self.opt = torch.optim.AdamW([self.probs], lr=lr, weight_decay=weight_decay)
        self.gen = torch.Generator().manual_seed(seed)
        self.max_norm, self.p_min = max_norm, p_min

    def sample(self, count: int) -> torch.Tensor:
        """(count, n) word indices: one Categorical(p).sample() per prompt, as the official loop
        draws them (normalised rows, one multinomial draw per row), from this policy's RNG."""
        p = self.probs.detach()
        p = p / p.sum(-1, keepdim=True)
        return torch.stack([torch.multinomial(p, 1, True, generator=self.gen).T.reshape(-1) for _ in range(count)])

    def update(self, idx: torch.Tensor, losses: list[float]) -> None:
        """One step from the sampled indices (I, n) and their losses (I floats)."""
        I, n = idx.shape
        mean = sum(losses) / I
        with torch.no_grad():
            signs = (-1 / self.probs).repeat(I, 1, 1)  # (I, n, N): -1/p everywhere ...
            signs[torch.arange(I)[:, None], torch.arange(n)[None], idx] *= -1  # ... +1/p at the drawn words
            self.opt.zero_grad()
            self.probs.grad = torch.zeros_like(self.probs)
            for k in range(I):
                self.probs.grad += 1 / (I - 1) * (losses[k] - mean) * signs[k]
        torch.nn.utils.clip_grad_norm_(self.probs, self.max_norm)
        self.opt.step()
        with torch.no_grad():
            project_rows(self.probs)
            if self.p_min > 0:
                self.probs.clamp_(min=self.p_min)

    def best(self) -> torch.Tensor:
        return self.probs.detach().argmax(1)  # (n,)

    def state_dict(self) -> dict:
        return {"probs": self.probs.detach().clone(), "opt": self.opt.state_dict(), "gen": self.gen.get_state()}

    def load_state_dict(self, s: dict) -> None:
        with torch.no_grad():
            self.probs.copy_(s["probs"])
        self.opt.load_state_dict(s["opt"])
        self.gen.set_state(s["gen"])


@register_method
class BDPL(Method):
    name = "bdpl"
    Config = BDPLConfig
    needs = Needs(frozenset({"templates", "pixels"}))  # text prompts and images in; logits or probabilities out
    state = ("policy", "batches", "steps")

    def __init__(self, cfg: BDPLConfig, env):
        super().__init__(cfg, env)
        self.words = vocabulary(cfg.vocab, self.task_info)[: cfg.search_space]
        if len(self.words) < 2:
            raise BadInput(f"bdpl: vocab={cfg.vocab!r} gives {len(self.words)} word(s) for this task; it needs 2")
        self.after = self.task_info["templates"][0] if cfg.keep_template else "{}."
        self.policy = CategoricalPolicy(cfg.prompt_length, len(self.words), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                        max_norm=cfg.max_norm, p_min=cfg.p_min, seed=self.seed)
        self.batches = BatchStream(self.data, cfg.batch_size, self.seed)
        self.steps = 0

    def template(self, idx: torch.Tensor) -> str:
        """Word indices (n,) -> "w1 .. wn {}." (or the words before the task's template)."""
        return " ".join([self.words[int(j)] for j in idx] + [self.after])

    def total_steps(self) -> int | None:
        if self.cfg.epochs is None:
            return None
        n, bs = len(self.data), self.cfg.batch_size
        return self.cfg.epochs * -(-epoch_stop(n, bs) // bs)

    def step(self, budget) -> dict | None:
        if self.cfg.epochs is not None and self.steps >= self.total_steps():
            return None
        images, y = self.batches.next()  # (B, 3, S, S), (B,)
        idx = self.policy.sample(self.cfg.sample_size)  # (I, n)
        logits = self.box.query(TextPrompt([self.template(j) for j in idx]), images)  # (I, B, C)
        losses = ce_per_candidate(logits, y).tolist()  # (I,)
        self.policy.update(idx, losses)
        self.steps += 1
        return {"train_loss": sum(losses) / len(losses)}

    def prompt(self) -> TextPrompt:
        return TextPrompt(self.template(self.policy.best()))
