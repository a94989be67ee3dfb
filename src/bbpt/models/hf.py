"""The Hugging Face backend: ``--model hf:openai/clip-vit-base-patch16`` or ``hf:/path/to/dir``
(CLIP and SigLIP, ``transformers``' ``CLIPModel`` / ``SiglipModel``).

The soft-prompt path runs the library's own ``get_text_features``: a forward hook on the
token embedding hands it the prompt's embeddings in place of the placeholder words', so
positions, the mask (causal for CLIP; none for SigLIP), the final norm, the model's own
pooling rule (CLIP: the EOS token, by its config's rule; SigLIP: the last position of the
fixed-length padding) and the projection are the library's, exactly. Nothing here reads a
private attribute.

Offline, a hub id loads only from the local Hugging Face cache when ``HF_HUB_OFFLINE=1``;
a missing file is one line naming it. bbpt never sets that variable itself.
"""
from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import BadInput, MissingWeights
from .backbone import CLIP_MEAN, CLIP_STD, RANDOM_TAGS, Backbone, TextEncoder, first_line, normalized, quiet_root_log

KINDS = {"clip": (True, "padding to the longest, attention mask"),  # causal text mask
         "siglip": (False, "fixed-length padding, no mask")}
DEFAULT_NORM = {"clip": (CLIP_MEAN, CLIP_STD), "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


def _tensor(out) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output with ``pooler_output`` (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class HFText(TextEncoder):
    def __init__(self, model: nn.Module, kind: str, tokenizer):
        super().__init__()
        emb = model.text_model.embeddings
        self.token_embedding: nn.Embedding = emb.token_embedding
        self.context_length = int(emb.position_embedding.num_embeddings)
        self.width = int(self.token_embedding.embedding_dim)
        self.causal = KINDS[kind][0]
        pad = tokenizer.pad_token_id
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = self.eos_id if pad is None else int(pad)  # CLIP pads with EOS where no pad token is set
        self.prefix = 0  # set by the backbone from the tokenizer
        self._features = model.get_text_features
        self._pending = threading.local()  # the embeddings of the forward this thread is running
        self.token_embedding.register_forward_hook(self._substitute)

    def _substitute(self, module, args, out):
        x = getattr(self._pending, "x", None)
        if x is None:
            return None  # an ordinary forward (library_text_features): untouched
        if x.shape != out.shape:
            raise RuntimeError(f"soft-prompt embeddings {tuple(x.shape)} do not match the ids' {tuple(out.shape)}")
        return x.to(out.dtype)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.token_embedding.weight)  # the table itself: no hook

    def eos_positions(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids == self.eos_id).int().argmax(dim=-1)

    def encode(self, x: torch.Tensor, ids: torch.Tensor, cut: bool = True) -> torch.Tensor:
        if cut:
            L = self.real_length(ids)
            x, ids = x[:, :L], ids[:, :L]
        self._pending.x = x
        try:
            return _tensor(self._features(input_ids=ids))
        finally:
            self._pending.x = None


class HFBackbone(Backbone):
    def __init__(self, ref: str, pretrained: str, model: nn.Module, tokenizer, kind: str, mean: tuple, std: tuple,
                 device: torch.device):
        self.name, self.pretrained, self.model, self.tokenizer, self.kind = f"hf:{ref}", pretrained, model, tokenizer, kind
        self.image_size = int(model.config.vision_config.image_size)
        self.mean, self.std, self.device = tuple(mean), tuple(std), device
        self.text = HFText(model, kind, tokenizer)
        self._finish()

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(list(texts), padding="max_length", max_length=self.text.context_length, truncation=True,
                             return_tensors="pt")
        return enc["input_ids"].to(self.device)

    def count_tokens(self, text: str) -> int | None:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def library_text_features(self, texts: list[str]) -> torch.Tensor:
        """The model card's usage: CLIP pads to the longest with an attention mask; SigLIP
        pads to its fixed length and passes no mask."""
        if self.kind == "clip":
            enc = self.tokenizer(list(texts), padding=True, return_tensors="pt").to(self.device)
            return _tensor(self.model.get_text_features(input_ids=enc["input_ids"],
                                                        attention_mask=enc["attention_mask"])).float()
        return _tensor(self.model.get_text_features(input_ids=self.tokenize(texts))).float()

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return normalized(_tensor(self.model.get_image_features(pixel_values=self.normalize(pixels))))


def _missing(ref: str, what: str, e: Exception) -> Exception:
    import os

    if Path(ref).expanduser().is_dir():
        return MissingWeights(f"hf:{ref} has no readable {what} ({first_line(e)}); save the model there with "
                              "save_pretrained (model, tokenizer and processor)")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    how = ("HF_HUB_OFFLINE=1 forbids downloading it" if offline else "it could not be downloaded")
    return MissingWeights(f"hf:{ref}: {what} is not in the local Hugging Face cache and {how}; download it where "
                          f"there is internet (`huggingface-cli download {ref}`) or pass hf:/path/to/a/saved/folder")


@contextlib.contextmanager
def _no_progress_bars(transformers):
    """transformers' loading bars off while bbpt loads (its own output is one line)."""
    logging = transformers.utils.logging
    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


def create_hf(ref: str, pretrained: str | None, dev: torch.device) -> HFBackbone:
    try:
        import transformers
    except ImportError:
        raise BadInput("hf: models need transformers: pip install transformers sentencepiece") from None
    path = Path(ref).expanduser()
    if ref.startswith(("/", ".", "~")) and not path.is_dir():
        raise BadInput(f"hf:{ref}: no such folder; give a folder made by save_pretrained or a hub id (org/name)")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise MissingWeights(f"hf:{ref}: config.json is missing in that folder; save the model with save_pretrained")
        ref = str(path.resolve())
    random = pretrained is not None and pretrained.lower() in RANDOM_TAGS
    if pretrained is not None and not random:
        raise BadInput(f"--pretrained {pretrained!r} does not apply to hf: models (the id or folder names the weights); "
                       "leave it out, or pass 'random' for the architecture with untrained weights")
    with quiet_root_log(), _no_progress_bars(transformers):
        try:
            config = transformers.AutoConfig.from_pretrained(ref)
        except (OSError, ValueError) as e:
            raise _missing(ref, "config.json", e) from None
        kind = config.model_type
        if kind not in KINDS:
            raise BadInput(f"hf:{ref} is a {kind!r} model; bbpt's hf: backend takes {', '.join(KINDS)}")
        try:
            model = (transformers.AutoModel.from_config(config) if random
                     else transformers.AutoModel.from_pretrained(ref))
        except (OSError, ValueError) as e:
            raise _missing(ref, "the weights (model.safetensors)", e) from None
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(ref)
        except (OSError, ValueError) as e:
            raise _missing(ref, "the tokenizer files", e) from None
        if tokenizer.pad_token_id is None:  # CLIP-style: pad with EOS (pooling takes the first EOS)
            tokenizer.pad_token = tokenizer.eos_token
        mean, std = DEFAULT_NORM[kind]
        try:
            proc = transformers.AutoImageProcessor.from_pretrained(ref)
            mean, std = tuple(proc.image_mean), tuple(proc.image_std)
        except (OSError, ValueError, AttributeError):
            pass  # no preprocessor_config.json: the family's published normalisation
    model = model.float()
    return HFBackbone(ref if not path.is_dir() else ref, "random" if random else "hf", model, tokenizer, kind, mean,
                      std, dev)
