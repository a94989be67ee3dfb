"""Parity fixture for Tip-Adapter (training-free): the release's cache model, CLIP
classifier, hyperparameter search and logits on fixed embeddings.

    python tools/parity/tipadapter.py /path/to/Tip-Adapter   # gaopengcuhk/Tip-Adapter at d0e2d6f

writes tests/parity/tipadapter.json.

What runs is the official code: ``utils.py`` imported (clip_classifier, build_cache_model,
search_hp, cls_acc) and ``main.py``'s run_tip_adapter compiled from its syntax tree (the
file imports the dataset code and torchvision at the top). Stubs stand in for CLIP: ``clip``
(``tokenize`` numbers the texts) and a ``clip_model`` whose ``encode_text`` /
``encode_image`` return fixed unit vectors (an API's embeddings; one set per augmented pass
of the cache loader). ``.cuda()`` and ``.half()`` are no-ops: the release runs CLIP in
float16 on a GPU, the fixture in float32. Three cases (trajectory entries) of different
sizes, augmented passes, template counts and search scales.
"""
from __future__ import annotations

import builtins
import os
import sys
import tempfile

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch

from fixture import write
from official import Checkout, command, cpu_for_cuda, environment, function, official_section, stub

CASES = [  # classes, shots, val shots, test per class, augment passes, templates, search_scale, init_alpha
    dict(C=5, k=4, kv=4, kt=3, A=1, T=1, scale=[7, 3], alpha=1.17),
    dict(C=6, k=2, kv=2, kt=2, A=3, T=2, scale=[12, 5], alpha=3.0),
    dict(C=4, k=8, kv=4, kt=4, A=10, T=1, scale=[13, 13], alpha=2.0),
]
E = 16


def case_inputs(c: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    text = unit(c["C"] * c["T"], E)  # class-major, c T + t
    protos = torch.nn.functional.normalize(text.view(c["C"], c["T"], E).mean(1), dim=-1)
    visual = unit(c["C"], E)  # where each class's images lie; the texts point there only faintly, as CLIP's do
    near = lambda y: torch.nn.functional.normalize(visual[y] + 0.04 * protos[y] + 0.8 * unit(len(y), E), dim=-1)  # noqa: E731
    y = torch.arange(c["C"]).repeat_interleave(c["k"])
    passes = torch.stack([near(y) for _ in range(c["A"])])  # (A, N, E): one set of embeddings per augmented pass
    yv = torch.arange(c["C"]).repeat(c["kv"])
    yt = torch.arange(c["C"]).repeat(c["kt"])
    return {"text": text, "passes": passes, "y": y, "val": near(yv), "y_val": yv, "test": near(yt), "y_test": yt}


class ClipModel:
    """encode_text: the fixed text embeddings by tokenize's numbers; encode_image: the current
    pass's embeddings of the images in the batch (the batch holds image indices)."""

    def __init__(self, inp):
        self.inp, self.epoch = inp, -1

    def encode_text(self, ids):
        return self.inp["text"][ids].clone()

    def encode_image(self, idx):
        return self.inp["passes"][self.epoch][idx].clone()


class CacheLoader:
    """train_loader_cache (shuffle=False): batches of (image indices, labels); each iteration is
    one augmented pass."""

    def __init__(self, model: ClipModel, y, batch: int = 3):
        self.model, self.y, self.batch = model, y, batch

    def __iter__(self):
        self.model.epoch += 1
        for i in range(0, len(self.y), self.batch):
            idx = torch.arange(i, min(i + self.batch, len(self.y)))
            yield idx, self.y[idx]

    def __len__(self):
        return -(-len(self.y) // self.batch)


def span(co: Checkout, rel: str, name: str) -> list[int]:
    return co.block(rel, lambda tree: [function(tree, name)])[1]


def main(path: str) -> None:
    co = Checkout(path, "gaopengcuhk/Tip-Adapter")
    traj = []
    saved_half = torch.Tensor.half
    torch.Tensor.half = lambda self, *a, **k: self.float()  # float32 where the release has float16
    try:
        for n, c in enumerate(CASES):
            inp = case_inputs(c, 100 + n)
            names = [f"class{i}" for i in range(c["C"])]
            templates = [f"a photo of a {{}}, kind {t}." for t in range(c["T"])]
            texts = [t.format(name) for name in names for t in templates]
            clip = stub("clip", tokenize=lambda ts: torch.tensor([texts.index(t) for t in ts]))
            with cpu_for_cuda():
                utils = co.load_module("utils.py", f"tip_utils{n}", stubs={"clip": clip})
                # cls_acc's float() of a 1-element array: an error since numpy 2 (the release ran numpy 1)
                utils.float = lambda v: builtins.float(np.asarray(v).reshape(()))
                model = ClipModel(inp)
                clip_weights = utils.clip_classifier(names, templates, model)  # (E, C)
                with tempfile.TemporaryDirectory() as tmp:
                    cfg = {"load_cache": False, "augment_epoch": c["A"], "cache_dir": tmp, "shots": c["k"],
                           "search_hp": True, "search_scale": c["scale"], "search_step": [200, 20], "init_beta": 1,
                           "init_alpha": c["alpha"]}
                    keys, values = utils.build_cache_model(cfg, model, CacheLoader(model, inp["y"]))
                best_beta, best_alpha = utils.search_hp(cfg, keys, values, inp["val"], inp["y_val"], clip_weights)
                logged = []

                def cls_acc(output, target, topk=1):
                    logged.append(output.clone())
                    return utils.cls_acc(output, target, topk)

                code, lines = co.block("main.py", lambda tree: [function(tree, "run_tip_adapter")])
                ns = {"torch": torch, "cls_acc": cls_acc, "search_hp": utils.search_hp, "print": lambda *a, **k: None}
                exec(code, ns)
                ns["run_tip_adapter"](cfg, keys, values, inp["val"], inp["y_val"], inp["test"], inp["y_test"],
                                      clip_weights)
            traj.append({"case": c, "inputs": inp, "clip_weights": clip_weights, "cache_keys": keys,
                         "cache_values": values, "best_beta": best_beta, "best_alpha": best_alpha,
                         "val_clip_logits": logged[0], "val_tip_logits_init": logged[1],
                         "test_clip_logits": logged[2], "test_tip_logits": logged[3]})
    finally:
        torch.Tensor.half = saved_half
    fixture = {
        "method": "tipadapter",
        "official": official_section(co, [
            {"file": "utils.py", "lines": span(co, "utils.py", "clip_classifier"),
             "what": "clip_classifier: the prompt-ensemble classifier"},
            {"file": "utils.py", "lines": span(co, "utils.py", "build_cache_model"),
             "what": "build_cache_model: keys averaged over augment_epoch passes, normalised; one-hot values"},
            {"file": "utils.py", "lines": span(co, "utils.py", "search_hp"),
             "what": "search_hp: the β x α grid on the val features"},
            {"file": "main.py", "lines": lines, "what": "run_tip_adapter: zero-shot, init α/β, search, test logits"},
        ]),
        "regenerate": command("tipadapter.py", co),
        "environment": environment(),
        "notes": [
            "The release runs CLIP in float16 on a GPU (its cache values are .half()); the fixture runs in float32.",
            "The release averages raw CLIP features over the augmented passes before normalising; an API returns "
            "unit vectors, so the fixture's features are unit vectors (bbpt averages those).",
            "cls_acc's float() of a 1-element array is an error since numpy 2; the fixture's utils module gets a "
            "float() that takes it (the release ran numpy 1).",
            "Tip-Adapter-F (fine-tuned keys, run_tip_adapter_F) is not implemented in bbpt and not covered.",
        ],
        "trajectory": traj,
    }
    print(write("tipadapter", fixture))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
