"""Parity fixture for BBT on CLIP: the official ``bbt.py`` of Black-Box-Tuning executed statement
for statement, its NLP model replaced by the toy CLIP, for four CMA-ES generations.

    python tools/parity/bbt.py /path/to/Black-Box-Tuning      # in an environment with cma==4.0.0

writes tests/parity/bbt.json.

What runs is the official code, from ``bbt.py`` itself:

- its module statements up to and including ``class LMForwardAPI`` (the argparse options, read
  with the argv below and every other option at its default: popsize 20, sigma 1, alpha 1,
  bound 0, seed 42, random_proj normal, cat_or_add add, serial evaluation; the seeding);
- ``model_forward_api = LMForwardAPI(...)``: its ``__init__`` builds A = ``nn.Linear(d, n·D)``
  and draws it from N(0, std²), std = alpha · std_hat / (sqrt(d) · sigma), std_hat = np.std of
  the model's whole input-embedding table (here the toy CLIP's token embedding);
- ``cma_opts`` .. ``es = cma.CMAEvolutionStrategy(...)`` (maxiter = budget // popsize), then the
  ``while not es.stop():`` loop, ask -> ``model_forward_api.eval(x)`` for each candidate -> tell,
  until maxiter (budget 80: four generations of 20);
- per generation, after the tell, ``deepbbt.py``'s best-prompt statement (BBTv2, same
  repository): A · es.result.xbest, reshaped to the prompt tokens.

Stubs stand in for what needs a download, a dataset or fastNLP: ``transformers`` (configs and
tokenizer), ``models.modeling_roberta.RobertaForMaskedLM`` (:class:`ToyMaskedLM`: the toy CLIP's
class scores, the prompt embedding added to the 4 prompt positions as the official 'add' mode
adds it, p0 the words "a photo of a"), ``metrics.metrics.SST2Metric`` (an identity label map:
the logits are already class scores), ``dataloaders``, ``fastNLP``, ``sklearn``. ``eval``'s
``train_data`` is the toy images' indices and labels; ``dev_data`` has the same size (bbt.py
reads its size as the batch) and is never evaluated: the dev-set selection fires every
eval_every = 100 calls, after this run's 80.
"""
from __future__ import annotations

import ast
import re
import sys
import types
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn

import toy
from fixture import write
from official import Checkout, command, environment, official_section, stub

CLASSES = ["cat", "dog", "ship", "tree", "car"]
N_TRAIN, WIDTH, CTX_INIT = 40, 8, "a photo of a"
# bbt.py's options for the toy run; all others at bbt.py's argparse defaults
ARGV = ["--model_name", "roberta-large", "--task_name", "sst2", "--n_prompt_tokens", "4", "--intrinsic_dim", "512",
        "--budget", "80", "--loss_type", "ce", "--device", "cpu"]


class ToyMaskedLM(nn.Module):
    """Stands in for ``RobertaForMaskedLM(n_prompt_tokens=4)`` in 'add' mode: the prompt embedding
    ``eval`` sets is added to the embeddings of the 4 prompt positions (``models/modeling_roberta.py``
    712-724), here CLIP's context words "a photo of a" (p0, as CraFT's ``main_craft.py`` 58-71), so
    the context is p0 + A z; the logits are the toy CLIP's class scores (N, C) of the images whose
    indices are the input ids, 100 · f_img · f_txt / |f_txt| (``main_craft.py`` 147-151)."""

    def __init__(self, tc: toy.ToyCLIP, pixels: torch.Tensor):
        super().__init__()
        self.tc, self.pixels = tc, pixels  # (N, 3, S, S)
        self.roberta = types.SimpleNamespace(get_input_embeddings=lambda: nn.Embedding.from_pretrained(tc.E))
        self.lm_head = nn.Module()
        n = len(CTX_INIT.split())
        self.p0 = tc.token_embedding(tc.tokenize([CTX_INIT])[0, 1 : 1 + n])  # (n, D)
        self.ids = tc.tokenize([" ".join(["X"] * n) + " " + c + "." for c in tc.classnames])  # (C, L)
        self.prompt_embedding = None

    def set_prompt_embedding(self, prompt_embedding):
        self.prompt_embedding = prompt_embedding  # (bsz, n, D), one prompt repeated

    def forward(self, input_ids, attention_mask=None, mask_pos=None):
        n = len(self.p0)
        pe = self.prompt_embedding.reshape(-1, n, self.p0.shape[1])
        assert torch.equal(pe, pe[:1].expand_as(pe)), "serial evaluation: one prompt per call"
        x = self.tc.token_embedding(self.ids).clone()  # (C, L, D)
        x[:, 1 : 1 + n] = self.p0 + pe[0]
        t = self.tc.encode_text(x, self.ids)
        t = t / t.norm(dim=-1, keepdim=True)
        f = self.tc.encode_image(self.pixels[input_ids[:, 0]])
        return {"logits": toy.LOGIT_SCALE * f @ t.T}


def stubs(co: Checkout, tc: toy.ToyCLIP, pixels: torch.Tensor) -> dict[str, types.ModuleType]:
    """The modules ``bbt.py`` imports, as far as the toy run reads them."""
    named = lambda **kw: type("Stub", (), {k: staticmethod(v) for k, v in kw.items()})  # noqa: E731
    nlp = ["Roberta", "Bert", "Electra", "Bart", "T5", "GPT2"]
    transformers = stub("transformers", **{f"{m}{k}": None for m in nlp for k in ("Config", "Tokenizer")})
    transformers.RobertaConfig = named(
        from_pretrained=lambda name: types.SimpleNamespace(hidden_size=tc.width, vocab_size=len(tc.vocab)))
    transformers.RobertaTokenizer = named(from_pretrained=lambda name: types.SimpleNamespace(pad_token_id=0))
    lms = {"roberta": "RobertaForMaskedLM", "bart": "BartForConditionalGeneration", "cpt": "CPTForMaskedLM",
           "t5": "T5ForConditionalGeneration", "gpt2": "GPT2LMHeadModel", "bert": "BertForMaskedLM",
           "electra": "ElectraForMaskedLM"}
    mods = {f"models.modeling_{m}": stub(f"models.modeling_{m}", **{c: None}) for m, c in lms.items()}
    toy_lm = named(from_pretrained=lambda name, **kw: ToyMaskedLM(tc, pixels))
    mods["models.modeling_roberta"].RobertaForMaskedLM = toy_lm
    tasks = ["SST2", "AGNews", "YelpP", "DBPedia", "RTE", "MRPC", "SNLI"]
    mods["metrics.metrics"] = stub("metrics.metrics", **{f"{t}Metric": None for t in tasks})
    identity = {c: c for c in range(len(tc.classnames))}  # the logits are class scores already
    mods["metrics.metrics"].SST2Metric = lambda **kw: types.SimpleNamespace(label_map=identity, margin=2)
    mods.update({
        "transformers": transformers, "models": stub("models"), "metrics": stub("metrics"),
        "fastNLP": stub("fastNLP", cache_results=None, Tester=None, DataSet=type("DataSet", (), {})),
        "sklearn": stub("sklearn"), "sklearn.metrics": stub("sklearn.metrics", f1_score=None),
        "dataloaders": stub("dataloaders"),
        "dataloaders.dataloader": stub("dataloaders.dataloader", **{f"{t}Loader": None for t in tasks}),
        "utils": co.load_module("utils.py", "utils"),
    })
    for pkg in ("models", "dataloaders", "metrics", "sklearn"):
        mods[pkg].__path__ = []
    return mods


@contextmanager
def installed(mods: dict, argv: list[str]):
    saved = {k: sys.modules.get(k) for k in mods}
    saved_argv = sys.argv
    sys.modules.update(mods)
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved_argv
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def index(body, pred) -> int:
    return next(i for i, s in enumerate(body) if pred(s))


def assigns(name: str):
    return lambda s: isinstance(s, ast.Assign) and ast.unparse(s.targets[0]) == name


def blocks(co: Checkout):
    """bbt.py's module statements: [head, the API, the strategy, the loop], each (code, lines)."""
    tree = ast.parse(co.source("bbt.py"))
    body = tree.body
    k_cls = index(body, lambda s: isinstance(s, ast.ClassDef) and s.name == "LMForwardAPI")
    k_api, k_opts = index(body, assigns("model_forward_api")), index(body, assigns("cma_opts"))
    k_es = index(body, assigns("es"))
    k_while = index(body, lambda s: isinstance(s, ast.While))
    parts = [body[: k_cls + 1], body[k_api : k_api + 1], body[k_opts : k_es + 1], body[k_es + 1 : k_while + 1]]
    return [co.block("bbt.py", lambda t, p=p: p) for p in parts]


def best_prefix_statement(co: Checkout):
    """deepbbt.py: ``model_forward_api.best_prefix[i] = model_forward_api.linear[i](... es.result.xbest ...)``."""
    def find(tree):
        return [s for s in ast.walk(tree) if isinstance(s, ast.Assign)
                and ast.unparse(s.targets[0]) == "model_forward_api.best_prefix[i]"][:1]
    return co.block("deepbbt.py", find)


def main(path: str) -> None:

    co = Checkout(path, "txsun1997/Black-Box-Tuning")
    arrays = toy.generate(0, CLASSES, N_TRAIN, dim=WIDTH)
    tc = toy.ToyCLIP(arrays, CLASSES)
    pixels = tc.pixels(arrays)
    (head, l_head), (api, l_api), (strategy, l_es), (loop, l_loop) = blocks(co)
    best_code, l_best = best_prefix_statement(co)

    printed: list[str] = []
    ns = {"__name__": "bbt_official", "print": lambda *a, **k: printed.append(" ".join(map(str, a)))}
    data = {"input_ids": torch.arange(N_TRAIN)[:, None], "attention_mask": torch.ones(N_TRAIN, 1, dtype=torch.long),
            "mask_pos": torch.zeros(N_TRAIN, dtype=torch.long), "labels": torch.from_numpy(arrays["labels"])}
    drawn = []
    normal = torch.nn.init.normal_
    with installed(stubs(co, tc, pixels), ["bbt.py", *ARGV]):
        exec(head, ns)  # options, seeding, class LMForwardAPI
        # bbt.py 547-699 (tokenizer, fastNLP data) replaced: the toy images' indices and labels
        ns.update(tokenizer=None, train_data=data, dev_data=dict(data), test_data=None)
        torch.nn.init.normal_ = lambda p, mean=0.0, std=1.0: (drawn.append((mean, std)), normal(p, mean, std))[1]
        try:
            exec(api, ns)  # LMForwardAPI.__init__: A and its std
        finally:
            torch.nn.init.normal_ = normal
        exec(strategy, ns)
        es, api_obj = ns["es"], ns["model_forward_api"]
        traj = []
        tell = es.tell

        def recorded_tell(solutions, fitnesses):
            tell(solutions, fitnesses)
            ref = {"model_forward_api": types.SimpleNamespace(best_prefix=[None], linear=[api_obj.linear],
                                                              config=types.SimpleNamespace(hidden_size=tc.width)),
                   "es": es, "i": 0, "torch": torch}
            exec(best_code, ref)
            traj.append({"population": np.array(solutions, dtype=np.float32), "fitness": np.array(fitnesses),
                         "mean": np.array(es.mean), "sigma": float(es.sigma),
                         "xbest": np.array(es.result.xbest, dtype=np.float32), "fbest": float(es.result.fbest),
                         "best_prefix": ref["model_forward_api"].best_prefix[0].detach().clone(),
                         "num_call": int(api_obj.num_call)})

        es.tell = recorded_tell
        exec(loop, ns)
    line = next(s for s in printed if s.startswith("[Embedding]"))
    mu_hat, std_hat, _, std = (float(v) for v in re.findall(r"(?:mu|std): (\S+)", line))
    assert drawn == [(0.0, std)] or (len(drawn) == 1 and np.isclose(drawn[0][1], std, rtol=1e-12))
    args = vars(ns["args"])
    stop = {k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in es.stop().items()}
    statements = [
        {"file": "bbt.py", "lines": l_head,
         "what": "imports (stubbed), argparse options (argv below, the rest at their defaults), seeding, "
                 "class LMForwardAPI"},
        {"file": "bbt.py", "lines": l_api,
         "what": "LMForwardAPI.__init__ (266-291): A = nn.Linear(d, n·D, bias=False) ~ N(0, std²), "
                 "std = alpha · np.std(embedding table) / (sqrt(d) · sigma)"},
        {"file": "bbt.py", "lines": l_es, "what": "cma_opts (seed, popsize, maxiter = budget // popsize, bounds iff "
                                                  "bound > 0) and es = cma.CMAEvolutionStrategy(d * [0], sigma, ...)"},
        {"file": "bbt.py", "lines": l_loop, "what": "while not es.stop(): ask; fitness = model_forward_api.eval(x) per "
                                                    "candidate (A z -> prompt -> logits -> CE, 404-544); tell"},
        {"file": "deepbbt.py", "lines": l_best, "what": "BBTv2's best prompt: A · es.result.xbest, reshaped to the "
                                                        "prompt tokens (after each generation)"},
    ]
    write("bbt", {
        "method": "bbt",
        "official": official_section(co, statements),
        "regenerate": command("bbt.py", co),
        "environment": environment(),
        "notes": [
            "BBT-for-CLIP in bbpt: bbt.py's CMA-ES (its options' defaults, maxiter = budget // popsize, serial "
            "ask -> eval -> tell) and A (nn.Linear ~ N(0, std²), BBT's std formula), with CraFT's CLIP prompt "
            "module (main_craft.py 58-71, 131-153: context = p0 ('a photo of a') + reshape(A z), CE on the whole "
            "few-shot set; without its head). The NLP model (RobertaForMaskedLM, 'add' mode) is replaced by the toy "
            "CLIP: 'add' adds A z to the prompt positions' embeddings (modeling_roberta.py 712-724), here p0's; "
            "d = 512 (CLIP: CraFT, SharpZO; bbt.py's default 500); n_prompt_tokens = 4 (p0's words).",
            "best prompt: bbt.py keeps the candidate evaluated at every eval_every-th call (100) whose dev-set "
            "accuracy improves (501-532); bbpt gives a method no dev set and reports es.result.xbest, the statement "
            "of deepbbt.py (BBTv2, same repository) recorded here per generation; the dev selection does not fire "
            "in this run's 80 calls",
            "std_hat: bbt.py reads the model's whole input-embedding table (np.std, ddof 0); bbpt's default "
            "estimates it from the word embeddings the black box returns (embed_words), and its embedding_std "
            "option takes the table's value: the test passes the official std_hat",
            "A: drawn by torch's global RNG in the official process (after nn.Linear's own init); bbpt draws its "
            "own from its seed, so the test injects this A",
            "pycma's other stop criteria (tolfun, tolflatfitness, ...) may end an official run before maxiter; "
            "bbpt stops on the budget alone (the same maxiter here)",
        ],
        "inputs": {"classnames": CLASSES, "model": arrays, "argv": ARGV,
                   "args": {k: v for k, v in args.items() if isinstance(v, (int, float, str, bool)) or v is None},
                   "popsize": int(ns["popsize"]), "cma_opts": ns["cma_opts"], "p0": api_obj.model.p0,
                   "A": api_obj.linear.weight.detach().clone(), "mu_hat": mu_hat, "std_hat": std_hat, "proj_std": std},
        "trajectory": traj,
        "stop": stop,
    })


if __name__ == "__main__":
    main(*sys.argv[1:])
