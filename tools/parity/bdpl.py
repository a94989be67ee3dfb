"""Parity fixture for bbpt's ``bdpl``: the official BDPL training loop run unchanged on a toy
masked language model.

    python tools/parity/bdpl.py /path/to/Black-Box-Prompt-Learning

writes tests/parity/bdpl.json. ``run_glue_discrete_LM.py`` cannot be imported as a module: at
import it parses ``sys.argv`` and reads ``./pmi/<task>.txt`` (``ngram_list = pmi()``), and it
imports datasets, accelerate and wandb for work BDPL's update does not do. So this script
compiles the official statements themselves from that file, by their ``ast``, keeping their
line numbers, and executes them:

- the module's ``solve_v_total_exact`` / ``constrainScoreByWholeExact`` (the projection),
  ``counter`` (the API-call counter) and ``ApiCallLimitError``;
- ``main()``'s initialisation of the probabilities and of their AdamW;
- ``main()``'s whole epoch loop (``for epoch in range(args.num_train_epochs):``): per step one
  ``Categorical(prompts_probs)``, ``sample_size`` draws, one API request each, the losses,
  the derivative, the variance-reduced gradient, ``clip_grad_norm_``, AdamW and the projection.

Stubs stand in for what needs data or a download: the tokenizer (ids only), the model behind
``train_api_request`` (a toy masked LM whose label-word logits at the mask are a per-sentence
term plus one term per prompt position and drawn token), the data loader (fixed batches) and
``evaluate`` (returns 0; its argmax prompt is not what is compared). ``ngram_list`` maps each
candidate index to a token id, as the official PMI list does.

Three runs: ``main`` (the update, 6 steps), ``zero`` (a large learning rate drives a
probability to 0 and the official gradient to NaN: the reason for bbpt's ``p_min``) and
``limit`` (the API limit reached inside a step: that step's queries are spent, its update
skipped). Each records per step the drawn indices, the losses, the clipped gradient, the
probabilities after AdamW and after the projection.
"""
from __future__ import annotations

import ast
import sys
from types import SimpleNamespace as NS

import numpy as np
import torch

from fixture import write
from official import Checkout, command, environment, function, official_section

REPO, FILE = "shizhediao/Black-Box-Prompt-Learning", "run_glue_discrete_LM.py"
L, N, P = 4, 8, 5  # prompt length, search space, sample size
EPOCHS, N_EXAMPLES, BATCH, SEED = 3, 8, 4, 7  # 2 batches an epoch: 6 steps
CLASSES = [" cat", " dog", " bird"]
BOS, EOS, MASK, LABEL0, NGRAM0, SENT0, VOCAB = 0, 2, 50, 40, 10, 20, 64
RUNS = {  # name -> (learning rate, api_limit): the official weight decay 0.1 and clip norm 3 in all
    "main": (0.01, 10_000),
    "zero": (0.2, 10_000),
    "limit": (0.01, 2 * P + 2),  # reached at the 2nd draw of step 3
}


def module_defs(tree: ast.Module, names: list[str]):
    """The top-level defs ``names`` of the official file, in file order."""
    return [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in names]


def main_parts(tree: ast.Module):
    """main()'s initialisation (from ``prompt_search_space = ...`` to the AdamW) and its epoch loop."""
    body = function(tree, "main").body
    names = [ast.unparse(s.targets[0]) if isinstance(s, ast.Assign) else None for s in body]
    i, j = names.index("prompt_search_space"), names.index("prompt_optimizer")
    loop = next(s for s in body if isinstance(s, ast.For) and ast.unparse(s.target) == "epoch")
    return body[i : j + 1], [loop]


class ToyLM:
    """RoBERTa's place: logits (B, seq, VOCAB), zero but for the label words, whose score at
    every position is X[sentence tokens].sum(0) + Σ_i T[i, drawn index at i]."""

    def __init__(self, rng: np.random.Generator):
        self.X = torch.from_numpy(rng.normal(size=(10, len(CLASSES))).astype(np.float32))  # (10 words, C)
        self.T = torch.from_numpy(rng.normal(size=(L, N, len(CLASSES))).astype(np.float32))  # (L, N, C)
        self.drawn: list[torch.Tensor] = []

    def __call__(self, input_ids=None, attention_mask=None):
        ids = input_ids  # (B, 1 + L + sentence + mask + eos)
        j = ids[0, 1 : 1 + L] - NGRAM0  # (L,) the drawn indices (the same for every row)
        self.drawn.append(j.clone())
        sent = ids[:, 1 + L : -2] - SENT0  # (B, 3)
        score = self.X[sent].sum(1) + self.T[torch.arange(L), j].sum(0)  # (B, C)
        out = torch.zeros(ids.shape[0], ids.shape[1], VOCAB)
        out[:, :, LABEL0 : LABEL0 + len(CLASSES)] = score[:, None]
        return (out,)


class Tokenizer:
    mask_token_id = MASK

    def encode(self, text, add_special_tokens=False):
        return [LABEL0 + CLASSES.index(text)]


def batches(rng: np.random.Generator) -> list[list[dict]]:
    """Each epoch's fixed batches: [<s>, 3 sentence words, <mask>, </s>] and the label word ids."""
    sent = rng.integers(0, 10, size=(N_EXAMPLES, 3))
    y = rng.integers(0, len(CLASSES), size=N_EXAMPLES)
    ids = torch.tensor([[BOS, *(SENT0 + s), MASK, EOS] for s in sent])
    out = []
    for _ in range(EPOCHS):
        order = rng.permutation(N_EXAMPLES)
        out.append([{"input_ids": ids[o], "attention_mask": torch.ones(len(o), ids.shape[1], dtype=torch.long),
                     "labels": torch.from_numpy(LABEL0 + y[o])} for o in np.split(order, N_EXAMPLES // BATCH)])
    return out


class Epochs:
    """``train_dataloader``: the epoch's fixed batches, the next epoch on each iteration."""

    def __init__(self, epochs):
        self.epochs, self.k = epochs, 0

    def __len__(self):
        return len(self.epochs[0])

    def __iter__(self):
        self.k += 1
        return iter(self.epochs[self.k - 1])


def run_official(co: Checkout, lr: float, api_limit: int) -> dict:
    tree = ast.parse(co.source(FILE))
    defs = module_defs(tree, ["solve_v_total_exact", "constrainScoreByWholeExact", "counter", "ApiCallLimitError"])
    init, loop = main_parts(tree)
    ns = {"torch": torch, "np": np, "AdamW": torch.optim.AdamW, "__name__": "official_bdpl"}
    exec(compile(ast.Module(body=defs, type_ignores=[]), str(co.file(FILE)), "exec"), ns)

    rng = np.random.default_rng(SEED)
    lm = ToyLM(rng)
    data = batches(rng)
    steps: list[dict] = []
    project = ns["constrainScoreByWholeExact"]

    def recording_projection(prompt_embeds):
        steps.append({"grad": prompt_embeds.grad.detach().clone(), "after_adam": prompt_embeds.detach().clone()})
        project(prompt_embeds)
        steps[-1]["probs"] = prompt_embeds.detach().clone()

    class RecordingCE(torch.nn.CrossEntropyLoss):
        seen: list[float] = []

        def forward(self, logits, target):
            loss = super().forward(logits, target)
            self.seen.append(loss.item())
            return loss

    args = NS(prompt_search_space=N, weight_decay=0.1, prompt_learning_rate=lr, num_train_epochs=EPOCHS,
              trial=False, sample_size=P, use_ngram=True, device=torch.device("cpu"), ce_loss=True,
              api_limit=api_limit, gradient_accumulation_steps=1, max_train_steps=EPOCHS * len(data[0]))
    ce = RecordingCE()
    ns.update(args=args, prompt_length=L, ngram_list=[NGRAM0 + j for j in range(N)], tokenizer=Tokenizer(),
              train_api_request=ns["counter"](lm), label_to_id={c: i for i, c in enumerate(CLASSES)},
              ce_loss=ce, hingeloss=None, config=NS(num_labels=len(CLASSES)), train_dataloader=Epochs(data),
              progress_bar=NS(update=lambda n: None), completed_steps=0, best_eval_result=0,
              best_prompts_probs=None, model=None, eval_dataloader=None, metric=None, accelerator=None,
              eval_results=[], evaluate=lambda *a, **k: 0.0, constrainScoreByWholeExact=recording_projection)
    exec(compile(ast.Module(body=init, type_ignores=[]), str(co.file(FILE)), "exec"), ns)
    probs0 = ns["prompts_probs"].detach().clone()
    torch.manual_seed(SEED)  # the official set_seed(args.seed); here nothing else draws from torch's RNG
    error = None
    try:
        exec(compile(ast.Module(body=loop, type_ignores=[]), str(co.file(FILE)), "exec"), ns)
    except ValueError as e:  # Categorical(prompts_probs) refuses NaN probabilities
        error = str(e).splitlines()[0]

    calls = ns["train_api_request"].count
    traj = []
    for k, s in enumerate(steps):
        traj.append({"indices": torch.stack(lm.drawn[k * P : (k + 1) * P]),  # (P, L)
                     "losses": np.array(ce.seen[k * P : (k + 1) * P], dtype=np.float32),  # (P,) loss.item()
                     "batch": k % len(data[0]), **s})
    left = lm.drawn[len(steps) * P :]  # draws of a step cut by the API limit (no update)
    return {"lr": lr, "api_limit": api_limit, "api_calls": calls, "error": error, "probs0": probs0, "trajectory": traj,
            "unused_draws": torch.stack(left) if left else np.zeros((0, L), dtype=np.int64),
            "_lines": {"init": [init[0].lineno, init[-1].end_lineno], "loop": [loop[0].lineno, loop[0].end_lineno],
                       **{d.name: [d.lineno, d.end_lineno] for d in defs}}}


def main(path: str | None = None) -> None:
    if not path:
        sys.exit(__doc__)
    co = Checkout(path, REPO)
    runs = {name: run_official(co, lr, limit) for name, (lr, limit) in RUNS.items()}
    lines = runs["main"].pop("_lines")
    for r in runs.values():
        r.pop("_lines", None)
    assert all(np.isfinite(s["probs"].numpy()).all() for s in runs["main"]["trajectory"])
    assert runs["main"]["error"] is None and runs["limit"]["error"] is None
    assert not np.isfinite(runs["zero"]["trajectory"][-1]["probs"].numpy()).all(), "the zero run reached no NaN"
    assert runs["zero"]["error"] and "Simplex" in runs["zero"]["error"]
    assert len(runs["limit"]["trajectory"]) == 2 and runs["limit"]["api_calls"] == RUNS["limit"][1]
    traj = runs["main"].pop("trajectory")
    write("bdpl", {
        "method": "bdpl",
        "official": official_section(co, [
            {"file": FILE, "lines": lines["init"],
             "what": "main(): prompts_probs = 1/N in every (position, word); AdamW(lr, weight_decay)"},
            {"file": FILE, "lines": lines["loop"],
             "what": "main()'s epoch loop: Categorical(prompts_probs), sample_size draws, one train_api_request "
                     "each, CE loss per draw, derivative ±1/p, grad = Σ (L_k − mean)/(I−1)·D_k, "
                     "clip_grad_norm_(3), AdamW step, constrainScoreByWholeExact; the api_limit check"},
            {"file": FILE, "lines": [lines["solve_v_total_exact"][0], lines["constrainScoreByWholeExact"][1]],
             "what": "solve_v_total_exact / constrainScoreByWholeExact: the bisection projection onto the simplex"},
            {"file": FILE, "lines": lines["counter"], "what": "counter: one API call per train_api_request"},
        ]),
        "regenerate": command("bdpl.py", co),
        "environment": environment(),
        "notes": [
            f"toy sizes: prompt length {L}, search space {N}, sample size {P}, {N_EXAMPLES} examples in batches of "
            f"{BATCH}, {EPOCHS} epochs (6 steps); the learning rate is {RUNS['main'][0]} (run.sh: 1e-4) so that the "
            "probabilities move visibly in 6 steps; weight decay 0.1 and clip norm 3 are the official ones",
            "the model is a toy masked LM (logits of the label words at <mask>); the losses are the official CE on "
            "them, and bbpt's update is compared given these losses (its own losses come from CLIP)",
            "torch.manual_seed(SEED) just before the epoch loop stands in for set_seed(42) at the start of main(): "
            "in the official run the DataLoader's shuffles also draw from torch's RNG between the steps",
            "zero: at lr 0.2 the projection leaves a probability at exactly 0; the next derivative -1/p is -inf "
            "and the probabilities turn NaN (the users' issues 3 and 4), and the next Categorical(prompts_probs) "
            "raises (runs.zero.error); bbpt's p_min floor avoids it",
            "limit: the official API limit raises inside the sample loop, so the step in which it is reached spends "
            "its queries and makes no update; bbpt refuses a whole step's query that would pass the budget",
        ],
        "inputs": {"prompt_length": L, "search_space": N, "sample_size": P, "seed": SEED, "weight_decay": 0.1,
                   "max_norm": 3.0, "lr": runs["main"]["lr"], "probs0": runs["main"]["probs0"]},
        "trajectory": traj,
        "runs": {k: v for k, v in runs.items() if k != "main"},
    })


if __name__ == "__main__":
    main(*sys.argv[1:])
