"""Parity fixtures for bbpt's ``blackvip``: the official BlackVIP code (changdaeoh/BlackVIP)
run on the toy CLIP (:mod:`toy`, its image features read through 56×56 block means so that
224 px images, the size the official decoder writes, stay small) with a stub for the frozen
MAE encoder (:func:`toy.stub_encoder`; MAE's weights are not available offline).

    python tools/parity/blackvip.py /path/to/BlackVIP

writes two fixtures:

- ``tests/parity/blackvip_decoder.json``: the official coordinator (``Coordinator`` with its
  ``DecoderManual``, ``trainers/visual_prompters.py``) built after ``torch.manual_seed(1)``:
  its state dict (names, shapes, order), parameter count, initial weights, the stub encoder's
  z and the decoder's output on 4 images, in train mode (batch statistics, running statistics
  updated) and then in eval mode;
- ``tests/parity/blackvip.json``: three SPSA-GC steps by the official statements
  (``trainers/blackvip.py``: ``CustomCLIP.forward``, the hyperparameters of ``build_model``,
  ``forward_backward``, ``spsa_grad_estimate_bi``; ``trainers/utils.py`` ``clip_clipping``)
  on one batch of 2 images: per step the perturbations Δ as the official code draws them
  (their SHA-256, being exact data too large to store: the test redraws them), the 10 losses,
  a_k, c_k, ĝ, the update, the momentum and the BatchNorm running statistics.
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import sys
import types

import numpy as np
import torch
import torch.nn as nn

from clipstub import ToyClipModel, clip_modules
from fixture import write
from official import Checkout, command, cpu_for_cuda, environment, function, official_section, stub
from toy import ToyCLIP, encode_image_pooled, generate, stub_encoder

REPO = "changdaeoh/BlackVIP"
CLASSNAMES = ["cat", "dog", "bird", "fish"]
TEMPLATE = "a photo of a {}."
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's
SIZE, UP = 224, 56  # the official decoder's output size; toy images (4 px) repeated 56×
SEED = 1  # torch.manual_seed before the coordinator is built, and again before training (train())
STEPS, N_IMAGES, BATCH = 3, 4, 2  # the decoder fixture's images; the SPSA batch: the first 2 (kept small: CPU)
SPSA_PARAMS = [1.0, 0.01, 0.01, 0.4, 0.1]  # [o, c, a, alpha, gamma]: the configs' default
MOMS, SP_AVG, P_EPS = 0.9, 5, 1.0


def up(pixels: np.ndarray) -> np.ndarray:
    """(N, s, s, 3) uint8 -> (N, 56 s, 56 s, 3): every pixel a 56×56 block."""
    return np.repeat(np.repeat(pixels, UP, axis=1), UP, axis=2)


def normalised(pixels_u8: np.ndarray) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> CLIP-normalised (N, 3, S, S), by bbpt's ops (the official loader's input)."""
    x = torch.from_numpy(np.ascontiguousarray(pixels_u8)).float().div_(255.0).permute(0, 3, 1, 2).contiguous()
    return torch.sub(x, torch.tensor(MEAN).view(1, 3, 1, 1)).div_(torch.tensor(STD).view(1, 3, 1, 1))


# ---- stubs for what needs a download, a GPU or a dataset -------------------------------------
class StubMAE(nn.Module):
    """``ViTForImageClassification.from_pretrained('facebook/vit-mae-base')``: hidden states whose
    last one has z = :func:`toy.stub_encoder` at the CLS position."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = w  # (12, 768), a plain tensor: not a parameter of the coordinator

    def forward(self, x, output_hidden_states=False):
        return types.SimpleNamespace(hidden_states=[stub_encoder(x, self.w)[:, None, :]])  # (N, 1, 768)


class BlackVIPToyClip(ToyClipModel):
    """What CustomCLIP reads of ``clip_model``: ``encode_text`` on token ids, ``visual`` on
    normalised pixels (the toy's features of 56×56 block means), ``logit_scale``, ``dtype``."""

    def __init__(self, toy: ToyCLIP):
        super().__init__(toy)
        self.visual = _Visual(toy)

    def encode_text(self, ids):
        return self.toy.encode_text(self.toy.token_embedding(ids), ids)


class _Visual(nn.Module):
    def __init__(self, toy):
        super().__init__()
        self.toy = toy

    def forward(self, x):
        return encode_image_pooled(self.toy, x)


def cfg_node(**kw):
    return types.SimpleNamespace(**kw)


def official_cfg():
    blackvip = cfg_node(METHOD="coordinator", PT_BACKBONE="vit-mae-base", SRC_DIM=1568, E_OUT_DIM=0,
                        SPSA_PARAMS=list(SPSA_PARAMS), OPT_TYPE="spsa-gc", MOMS=MOMS, SP_AVG=SP_AVG, P_EPS=P_EPS)
    return cfg_node(TRAINER=cfg_node(NAME="BLACKVIP", BLACKVIP=blackvip), DATASET=cfg_node(NAME="Toy"),
                    use_wandb=True, USE_CUDA=False)


def load_official(co: Checkout, toy: ToyCLIP, w_z: torch.Tensor, wandb_log: list):
    """The official ``trainers/utils.py``, ``trainers/visual_prompters.py`` and
    ``trainers/blackvip.py`` modules, imported with stubs."""
    clip = clip_modules(toy)
    clip["clip"].clip = clip["clip"]  # `from clip import clip`
    wandb = stub("wandb", log=lambda d, *a, **k: wandb_log.append(dict(d)))
    utils = co.load_module("trainers/utils.py", "trainers.utils", {**clip})

    class ViTForImageClassification:
        @staticmethod
        def from_pretrained(name):
            assert name == "facebook/vit-mae-base", name
            return StubMAE(w_z)

    transformers = stub("transformers", ViTFeatureExtractor=None, ResNetModel=None, ViTModel=None, ViTMAEModel=None,
                        ViTForImageClassification=ViTForImageClassification)
    trainers = stub("trainers", utils=utils)
    trainers.__path__ = []
    vp = co.load_module("trainers/visual_prompters.py", "trainers.visual_prompters",
                        {"transformers": transformers, "wandb": wandb, "trainers": trainers, "trainers.utils": utils})
    trainers.visual_prompters = vp
    trainers.zsclip = stub("trainers.zsclip", CUSTOM_TEMPLATES={"Toy": TEMPLATE})

    class Registry:
        def register(self):
            return lambda cls: cls

    acc = co.load_module("my_dassl/metrics/accuracy.py", "my_dassl_accuracy")
    my_dassl = stub("my_dassl")
    my_dassl.__path__ = []
    stubs = {**clip, "wandb": wandb, "this": stub("this", d={}), "pandas": stub("pandas"), "my_dassl": my_dassl,
             "my_dassl.engine": stub("my_dassl.engine", TRAINER_REGISTRY=Registry(), TrainerX=object),
             "my_dassl.metrics": stub("my_dassl.metrics", compute_accuracy=acc.compute_accuracy),
             "my_dassl.utils": stub("my_dassl.utils", load_pretrained_weights=None, load_checkpoint=None,
                                    set_random_seed=None, AverageMeter=None, MetricMeter=None),
             "my_dassl.optim": stub("my_dassl.optim", build_optimizer=None, build_lr_scheduler=None),
             "trainers": trainers, "trainers.visual_prompters": vp, "trainers.utils": utils,
             "trainers.zsclip": trainers.zsclip}
    bv = co.load_module("trainers/blackvip.py", "trainers.blackvip", stubs)
    return utils, vp, bv


def hyperparameter_statements(tree):
    """build_model's ``self.N_params = ...`` through ``self.loss_fn = F.cross_entropy``."""
    body = function(tree, "build_model").body
    names = [ast.unparse(s.targets[0]) if isinstance(s, ast.Assign) else "" for s in body]
    return body[names.index("self.N_params") : names.index("self.loss_fn") + 1]


def class_lines(co: Checkout, rel: str, *names: str) -> list[list[int]]:
    """[first, last] line of each top-level class or function ``names`` of file ``rel``."""
    spans = {n.name: [n.lineno, n.end_lineno] for n in ast.parse(co.source(rel)).body if hasattr(n, "name")}
    return [spans[n] for n in names]


def bn_stats(dec: nn.Module) -> dict:
    return {k: v.clone() if v.ndim else int(v) for k, v in dec.state_dict().items()
            if "running" in k or "num_batches" in k}


def sha256(x: torch.Tensor) -> str:
    return hashlib.sha256(x.detach().float().contiguous().numpy().tobytes()).hexdigest()


def crops(out: torch.Tensor) -> dict:
    """What is stored of a (B, 3, 224, 224) output: two 32×32 crops (every kernel position of
    the five stages) and the per-channel means of the whole image."""
    return {"corner": out[:, :, :32, :32].float(), "centre": out[:, :, 96:128, 96:128].float(),
            "mean": out.double().mean((2, 3))}


def main(path: str) -> None:
    co = Checkout(path, REPO)
    arrays = generate(0, CLASSNAMES, N_IMAGES, dim=8, embed=16, hidden=16, context=10, size=4)
    rng = np.random.default_rng(1)
    w_z = rng.standard_normal((12, 768)).astype(np.float16)  # the stub encoder (float16 values: stored small)
    arrays = {**arrays, "w_z": w_z}
    toy = ToyCLIP(arrays, CLASSNAMES)
    wandb_log: list = []
    _, vp, bv = load_official(co, toy, torch.from_numpy(w_z).float(), wandb_log)
    cfg = official_cfg()
    image = normalised(up(arrays["pixels"]))  # (4, 3, 224, 224), the official loader's input

    # ---- 1. the coordinator and its decoder
    torch.manual_seed(SEED)
    coord = vp.coordinator(cfg)  # Coordinator: the stub MAE, then DecoderManual(768, 1568, GELU, 'vit-mae-base')
    dec = coord.dec
    state0 = {k: v.clone() for k, v in dec.state_dict().items()}
    w0 = torch.nn.utils.parameters_to_vector(dec.parameters()).detach().clone()
    with torch.no_grad():
        dec.train()
        wrap, z = coord(image)  # train mode: batch statistics, running statistics updated
        stats = bn_stats(dec)
        dec.eval()
        wrap_eval, _ = coord(image)
    dec_lines, coord_lines = class_lines(co, "trainers/visual_prompters.py", "DecoderManual", "Coordinator")
    write("blackvip_decoder", {
        "method": "blackvip",
        "official": official_section(co, [
            {"file": "trainers/visual_prompters.py", "lines": coord_lines,
             "what": "Coordinator: the frozen encoder ('vit-mae-base', stubbed: z its last hidden state's CLS "
                     "position) and DecoderManual(768, SRC_DIM 1568, GELU, 'vit-mae-base'); forward"},
            {"file": "trainers/visual_prompters.py", "lines": dec_lines,
             "what": "DecoderManual: p_trigger (1, 800) uniform_(0, 0.1), the 'vit-mae-base' body (175-190), forward"}]),
        "regenerate": command("blackvip.py", co),
        "environment": environment(),
        "notes": ["the decoder is built after torch.manual_seed(1) (its init: the trigger first, then PyTorch's "
                  "default init layer by layer); the forward runs in train mode (as the official SPSA step), then in "
                  "eval mode (as its test) after that one train-mode forward updated the running statistics",
                  "z comes from a stub of the MAE encoder (toy.stub_encoder on the normalised image); MAE's "
                  "weights are not available offline",
                  "of each (4, 3, 224, 224) output two 32x32 crops and the channel means are stored"],
        "inputs": {"seed": SEED, "images": arrays["pixels"], "upsample": UP, "mean": list(MEAN), "std": list(STD),
                   "w_z": w_z},
        "state_dict": [[k, list(v.shape)] for k, v in state0.items()],
        "n_params": len(w0),
        "w0": w0,
        "z": z.float(),
        "train": {**crops(wrap), "bn": stats},
        "eval": crops(wrap_eval),
    })

    # ---- 2. three SPSA-GC steps on one batch
    torch.manual_seed(SEED)
    with contextlib.redirect_stdout(io.StringIO()):  # CustomCLIP prints its text prompts
        model = bv.CustomCLIP(cfg, CLASSNAMES, BlackVIPToyClip(toy), "cpu")
    for p in model.parameters():  # build_model: no gradient tracking
        p.requires_grad_(False)
    tr = bv.BLACKVIP.__new__(bv.BLACKVIP)
    tr.cfg, tr.model, tr.device = cfg, model, torch.device("cpu")
    code, hp_lines = co.block("trainers/blackvip.py", hyperparameter_statements)
    exec(code, {**vars(bv), "self": tr, "cfg": cfg})
    assert tr.N_params == 9920, tr.N_params
    losses, deltas, ghats, cks = [], [], [], []
    loss_fn, estimate, gather = tr.loss_fn, bv.BLACKVIP.spsa_grad_estimate_bi, torch.gather

    def recording_loss(out, y):  # each forward's loss, in the official order
        losses.append(loss_fn(out, y))
        return losses[-1]

    def recording_estimate(w, image, label, ck):  # the official estimate, with its c_k and ĝ recorded
        out = estimate(tr, w, image, label, ck)
        cks.append(ck)
        ghats.append(out[0].clone())
        return out

    tr.loss_fn, tr.spsa_grad_estimate_bi = recording_loss, recording_estimate

    def recording_gather(*a, **k):  # the perturbation Δ of `perturb = torch.gather(...)`
        out = gather(*a, **k)
        deltas.append(out.reshape(-1).clone())
        return out

    dec = model.coordinator.dec
    dec.train()  # run_epoch: set_model_mode("train") on the registered decoder
    w_init = torch.nn.utils.parameters_to_vector(dec.parameters()).detach().clone()
    assert torch.equal(w_init, w0)
    torch.manual_seed(SEED)  # train(): set_random_seed(cfg.SEED), "required to reproduce SPSA result"
    traj = []
    batch = {"img": image[:BATCH], "label": torch.from_numpy(arrays["labels"][:BATCH])}
    for k in range(1, STEPS + 1):
        del losses[:], deltas[:], ghats[:], cks[:]
        w_before = torch.nn.utils.parameters_to_vector(dec.parameters()).detach().clone()
        tr.step += 1  # run_epoch: the global step, before forward_backward
        torch.gather = recording_gather
        try:
            with cpu_for_cuda():
                summary = tr.forward_backward(batch)
        finally:
            torch.gather = gather
        w_after = torch.nn.utils.parameters_to_vector(dec.parameters()).detach().clone()
        log = wandb_log[-1]
        traj.append({
            "step": tr.step, "a_k": float(log["gain_seq"]), "c_k": float(cks[0]),
            "delta_sha256": [sha256(d) for d in deltas], "delta_head": torch.stack([d[:16] for d in deltas]),
            "losses": torch.stack([v.detach() for v in losses]).double(),  # (10,): w + cΔ_1, w - cΔ_1, ...
            "loss": float(summary["loss"]), "acc": float(summary["acc"]),
            "ghat": ghats[0].float(), "update": (w_before - w_after).float(), "bn": bn_stats(dec),
        })
        assert len(deltas) == SP_AVG and len(losses) == 2 * SP_AVG
    m1 = tr.m1.float()
    tree = ast.parse(co.source("trainers/blackvip.py"))
    span = lambda name: [function(tree, name).lineno, function(tree, name).end_lineno]  # noqa: E731
    cls_lines, = class_lines(co, "trainers/blackvip.py", "CustomCLIP")
    clip_lines, = class_lines(co, "trainers/utils.py", "clip_clipping")
    write("blackvip", {
        "method": "blackvip",
        "official": official_section(co, [
            {"file": "trainers/blackvip.py", "lines": cls_lines,
             "what": "CustomCLIP: fixed template text features; forward: coordinator prompt, "
                     "clip_clipping(image + P_EPS * prompt), image features, logit_scale.exp() * cosine logits"},
            {"file": "trainers/blackvip.py", "lines": hp_lines,
             "what": "build_model: N_params, SPSA_PARAMS [o, c, a, alpha, gamma], OPT_TYPE, MOMS, SP_AVG, step 0, "
                     "m1 0, loss_fn cross_entropy"},
            {"file": "trainers/blackvip.py", "lines": span("forward_backward"),
             "what": "forward_backward: a_k, c_k, w, spsa_grad_estimate_bi, spsa-gc momentum, w - a_k * update"},
            {"file": "trainers/blackvip.py", "lines": span("spsa_grad_estimate_bi"),
             "what": "SP_AVG segmented-uniform perturbations, w + c_k Δ then w - c_k Δ through the model, ĝ averaged"},
            {"file": "trainers/utils.py", "lines": clip_lines, "what": "clip_clipping: clamp to CLIP's valid range"},
            {"file": "trainers/visual_prompters.py", "lines": [coord_lines[0], dec_lines[1]],
             "what": "Coordinator (stub MAE encoder) and DecoderManual, in train mode"}]),
        "regenerate": command("blackvip.py", co),
        "environment": environment(),
        "notes": ["the toy CLIP's image features read the prompted 224 px image through 56x56 block means "
                  "(toy.encode_image_pooled); z comes from toy.stub_encoder (MAE's weights are not available offline)",
                  "torch.cuda.amp.autocast is disabled without CUDA: the fixture runs in float32, as bbpt does "
                  "(the official step on a GPU runs the decoder and CLIP in float16)",
                  "Δ (5 x 9,920 per step) is stored as its SHA-256 and first 16 values per perturbation: as the "
                  "official code draws it from torch's global generator after torch.manual_seed(seed) "
                  "(p = (rand(N) + 1) / 2, the sign from bernoulli(1/2) per coordinate, one perturbation after "
                  "the other), which the test redraws and checks against the hashes",
                  "losses: cross-entropy per forward in the official order w + c_k Δ_1, w - c_k Δ_1, w + c_k Δ_2, ...; "
                  "loss / acc: what the official step reports, the last pair's mean",
                  "update = w_before - w_after per step (the parameters after step k: w0 minus the updates so "
                  "far); m1 the momentum after the last step",
                  "one fixed batch: the 2 images in stored order (no augmentation)",
                  "the script itself does what the loop around the step does: torch.manual_seed(seed) as train()'s "
                  "set_random_seed (trainers/blackvip.py 178), the decoder in train mode as run_epoch's "
                  "set_model_mode('train') (202), self.step += 1 before each step (213)"],
        "inputs": {"model": {**arrays, "pixels": arrays["pixels"][:BATCH], "labels": arrays["labels"][:BATCH]},
                   "classnames": CLASSNAMES, "templates": [TEMPLATE], "upsample": UP,
                   "mean": list(MEAN), "std": list(STD), "seed": SEED,
                   "cfg": {"spsa_params": SPSA_PARAMS, "moms": MOMS, "sp_avg": SP_AVG, "p_eps": P_EPS,
                           "opt_type": "spsa-gc", "batch_size": BATCH}},
        "w0": w0,
        "trajectory": traj,
        "m1": m1,
    })


if __name__ == "__main__":
    main(*sys.argv[1:])
