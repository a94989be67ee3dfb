"""Backbones: a CLIP-like model behind a factory, its text tower able to take soft prompts.

Everything here is *inside* the black box: tuning methods never see a :class:`Backbone`,
only :class:`bbpt.models.blackbox.BlackBox`. A backbone is an adapter: it resolves its
library's internals once (:mod:`bbpt.models.openclip`, :mod:`bbpt.models.hf`) and offers
the black box one protocol, so the black box touches no library's attributes at all.

| name                                   | backend                                            |
|----------------------------------------|----------------------------------------------------|
| ``mini``                               | embedded (``configs/mini.json``, shipped weights)   |
| ``ViT-B-16``, ``RN50``, ...            | open_clip, with ``--pretrained TAG|FILE|random``    |
| ``hf:openai/clip-vit-base-patch16``    | Hugging Face (hub id, from the local cache offline) |
| ``hf:/path/to/dir``                    | Hugging Face (a ``save_pretrained`` folder)          |

The soft-prompt path is the same for every backend: a text is tokenised with placeholder
words where the context goes; :meth:`TextEncoder.embed` gives its word embeddings; the
context vectors replace the placeholders' (after ``prefix`` leading special tokens); and
:meth:`TextEncoder.encode` runs the rest of the tower (positions, transformer, the model's
own pooling rule, projection) from those embeddings.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import BadInput, UnknownName

HERE = Path(__file__).parent
CONFIG_DIR = HERE / "configs"
WEIGHTS_DIR = HERE / "weights"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RANDOM_TAGS = ("random", "none")
PLACEHOLDER = "X"  # the word whose embeddings soft-prompt context vectors replace


TEXT_BLOCK = 4096 * 128  # values of a layer's stream per CPU text forward (TextEncoder.per_forward; measured)


def equal_blocks(count: int, most: int) -> int:
    """Items per block when ``count`` items go in blocks of at most ``most``, all of one size
    (the last may be smaller by less than the number of blocks): never a crumb such as 128 + 1,
    whose small forward a BLAS may round differently by an ulp (MKL on AMD EPYC)."""
    blocks = -(-count // max(1, most))  # ceil
    return max(1, -(-count // max(1, blocks)))


class TextEncoder(nn.Module):
    """A text tower that runs from word embeddings. Attributes:

    - ``width`` D, ``context_length`` L (the longest sequence), ``pad_id``;
    - ``prefix``: special tokens before the text (1 for CLIP's SOS, 0 for SigLIP);
    - ``causal``: a causal mask, so positions after every sequence's EOS can be cut exactly.
    """

    width: int
    context_length: int
    prefix: int
    causal: bool
    pad_id: int

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (N, L) -> word embeddings (N, L, D)."""
        raise NotImplementedError

    def eos_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """(N, L) ids -> (N,) index of each sequence's end-of-text token."""
        raise NotImplementedError

    def real_length(self, ids: torch.Tensor) -> int:
        """Positions a forward needs: up to the last EOS under a causal mask, all otherwise."""
        if not self.causal:
            return ids.shape[1]
        return int(self.eos_positions(ids).max()) + 1

    def per_forward(self, count: int, length: int, chunk: int, device: torch.device) -> int:
        """Sequences per tower forward when ``count`` sequences of ``length`` positions are
        encoded, at most ``chunk``. On the CPU, blocks of at most TEXT_BLOCK values of the layer
        stream (4096 positions at width 128, 1024 at 512), so a layer's activations stay in
        cache: 1.2-1.6x faster at 1600-4000 sequences on mini, 1.1-1.3x at 400-1600 on
        ViT-B-32 (bench/image_tower.py), with the values of one forward (:func:`equal_blocks`).
        On a GPU, up to ``chunk``: large forwards fill it."""
        most = chunk if device.type != "cpu" else min(chunk, TEXT_BLOCK // (length * self.width))
        return equal_blocks(count, most)

    def encode(self, x: torch.Tensor, ids: torch.Tensor, cut: bool = True) -> torch.Tensor:
        """Embeddings (N, L, D) + ids (N, L) -> text features (N, E), unnormalised. With
        ``cut``, sequences are cut to :meth:`real_length` first (exact: see ``causal``)."""
        raise NotImplementedError


class Backbone:
    """A frozen CLIP-like model: the inside of the black box. Subclasses set ``name``,
    ``pretrained``, ``image_size``, ``mean``, ``std``, ``device`` and ``text`` (a
    :class:`TextEncoder`) and implement the methods below."""

    name: str
    pretrained: str
    image_size: int
    mean: tuple
    std: tuple
    device: torch.device
    text: TextEncoder
    model: nn.Module  # the library's model (inside the box; tests and the pretraining script use it)

    def _init_norm(self) -> None:
        self._mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)

    # ---- text ------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Texts -> (N, context_length) token ids on the device, padded as the model expects."""
        raise NotImplementedError

    def count_tokens(self, text: str) -> int | None:
        """Tokens of ``text`` without special tokens (None: the tokenizer cannot say)."""
        return None

    def library_text_features(self, texts: list[str]) -> torch.Tensor:
        """(N, E) unnormalised text features by the library's own path (the reference the
        soft-prompt path must equal)."""
        raise NotImplementedError

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    @property
    def logit_bias(self) -> float:
        b = getattr(self.model, "logit_bias", None)
        return 0.0 if b is None else float(b)

    # ---- images ----------------------------------------------------------------------------
    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB (B, 3, S, S) -> model input."""
        pixels = self.check_pixels(pixels)
        return torch.sub(pixels.to(self.device, torch.float32), self._mean).div_(self._std)  # one copy

    def check_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB (B, 3, S, S) as float32 on the device; any other shape is refused."""
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[-1] != self.image_size or pixels.shape[-2] != self.image_size:
            raise BadInput(
                f"images must be (B, 3, {self.image_size}, {self.image_size}) RGB in [0, 1] for "
                f"{self.name}; got {tuple(pixels.shape)} (ImageSet.pixels(size=...) makes them)"
            )
        return pixels.to(self.device, torch.float32)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels (B, 3, S, S) -> L2-normalised image features (B, E)."""
        raise NotImplementedError

    # ---- visual prompt tokens (BPT-VLM): ViT image towers only ---------------------------------
    @property
    def visual_width(self) -> int | None:
        """W of the image tower's tokens when visual prompt tokens are supported, else None."""
        return None

    def _no_visual_tokens(self):
        return BadInput(f"{self.name}: visual prompt tokens need a ViT image tower that bbpt can extend "
                        "(mini and open_clip ViTs); this model has none")

    def patch_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels (B, 3, S, S) -> [CLS, patches] + positional embedding, (B, 1 + G, W)."""
        raise self._no_visual_tokens()

    def encode_tokens(self, x: torch.Tensor, prompt: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens (N, 1 + G, W) with visual prompt tokens (N, n, W) appended -> (N, E) normalised."""
        raise self._no_visual_tokens()

    def _finish(self) -> "Backbone":
        self.model.eval().requires_grad_(False).to(self.device)
        self._init_norm()
        self.text.prefix = int(self.text.eos_positions(self.tokenize([""]))[0])  # specials before the text
        self.placeholder_id = self._placeholder()
        return self

    def _placeholder(self) -> int | None:
        """The placeholder word's id, if the tokenizer gives it one token (else soft prompts
        are refused, while text prompts still work)."""
        k = self.text.prefix
        ids = self.tokenize([f"{PLACEHOLDER} {PLACEHOLDER}"])[0].tolist()
        return ids[k] if ids[k] == ids[k + 1] != self.text.pad_id else None

    def no_placeholder(self) -> BadInput:
        return BadInput(f"{self.name}: its tokenizer does not give the placeholder word {PLACEHOLDER!r} one token, "
                        "so soft prompts cannot be placed (text prompts work)")


def normalized(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


# ---- names and devices (the registry of families: bbpt.models.catalog) -------------------------
def embedded_models() -> list[str]:
    """Names of the architectures that ship with bbpt (``configs/*.json``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def embedded_config(name: str) -> dict:
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


def open_clip_models() -> list[str]:
    import open_clip

    return open_clip.list_models()


def check_device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"device {device!r} requested but CUDA is not available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise BadInput(f"device {device!r} does not exist: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise BadInput(f"device {device!r} requested but MPS is not available; use --device cpu")
    return dev


def create_backbone(name: str = "mini", pretrained: str | None = None, device: str = "cpu") -> Backbone:
    """Build a backbone by name: the family registered for it (:mod:`bbpt.models.catalog`;
    the module's table lists bbpt's own).

    pretrained: for open_clip, a tag (``openai``, ``laion2b_s34b_b88k``, ...), a local
    checkpoint, or ``random`` (untrained: tests and speed benchmarks). For ``mini``, None
    means the shipped weights, a path other weights, ``random`` untrained ones. For ``hf:``,
    None means the folder's / hub id's weights, ``random`` its config with untrained ones.
    """
    from .catalog import find_family, model_names

    dev = check_device(device)
    family = find_family(name)
    if family is None:
        raise UnknownName("model", name, model_names(),
                          hint="`bbpt models` lists them; Hugging Face models are hf:ID or hf:/path/to/dir.")
    return family.build(name, pretrained, dev)


@contextlib.contextmanager
def quiet_root_log():
    import logging

    before = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(before)


def first_line(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else type(e).__name__


def load_weights(model: nn.Module, path: Path, name: str) -> None:
    """Strict safetensors load: every key present, every shape equal; errors name the file."""
    from safetensors.torch import load_file

    from ..errors import CorruptCheckpoint

    if not path.exists():
        raise CorruptCheckpoint(
            f"weights file {path} for {name} is missing; reinstall bbpt or rebuild it with "
            f"`python -m bbpt.models.pretrain --out {path}`"
        )
    try:
        sd = load_file(str(path))
    except Exception as e:
        raise CorruptCheckpoint(
            f"weights file {path} is corrupt ({first_line(e)}); reinstall bbpt or rebuild it with "
            "`python -m bbpt.models.pretrain`"
        ) from None
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    extra = sorted(set(sd) - set(own))
    bad = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or extra or bad:
        raise CorruptCheckpoint(
            f"weights file {path} does not match the {name} architecture "
            f"(missing {missing[:3]}, unexpected {extra[:3]}, wrong shape {bad[:3]}); "
            "rebuild it with `python -m bbpt.models.pretrain`"
        )
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)


def save_weights(model: nn.Module, path: Path, dtype: torch.dtype = torch.float16) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path))


def timed_load(name: str = "mini") -> float:
    """Seconds to build ``name`` with its weights (model construction + load, imports excluded)."""
    import open_clip  # noqa: F401  (import cost excluded)

    t = time.perf_counter()
    create_backbone(name)
    return time.perf_counter() - t
