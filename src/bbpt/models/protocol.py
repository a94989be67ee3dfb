"""The black-box protocol: all that a tuning method may use of a black box."""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence, runtime_checkable

import torch

from .meter import QueryMeter
from .prompts import Images, SoftPrompt, TextPrompt, VisualPrompt

if TYPE_CHECKING:
    from ..boxes.capabilities import Capabilities


@runtime_checkable
class BlackBoxAPI(Protocol):
    """What a method may use of a black box: all that a model-as-a-service API offers.

    Implemented in process by :class:`BlackBox` and over HTTP by
    :class:`bbpt.serve.client.RemoteBlackBox`; methods are written against this alone, so
    every method runs unchanged against either. Nothing here reaches weights, features or
    gradients (CoOp's white-box path is :class:`bbpt.models.whitebox.WhiteBox`)."""

    meter: QueryMeter  # the run's own count; a refused query is never charged
    classnames: list[str]

    @property
    def num_classes(self) -> int: ...
    @property
    def image_size(self) -> int: ...  # S: images are (B, 3, S, S) in [0, 1]
    @property
    def pixel_mean(self) -> tuple: ...
    @property
    def pixel_std(self) -> tuple: ...
    @property
    def ctx_dim(self) -> int: ...  # D of a soft prompt's tokens
    @property
    def context_length(self) -> int: ...
    @property
    def visual_width(self) -> int | None: ...  # a ViT's token width (visual prompt tokens), None otherwise
    @property
    def max_images_per_call(self) -> int: ...  # the pricing: B images cost ceil(B / this) api_calls per candidate
    @property
    def model_name(self) -> str: ...
    @property
    def encode_chunk(self) -> int: ...  # a sizing hint, per implementation: images per forward / upload

    def query(self, prompt: TextPrompt | SoftPrompt, images: Images,
              visual: VisualPrompt | None = None) -> torch.Tensor: ...  # logits (P, B, C), charged
    def embed_words(self, text: str) -> torch.Tensor: ...  # (m, D): an initial soft prompt; free
    def embed_patches(self, images: Images) -> torch.Tensor: ...  # (B, N, W): visual prompt scale; free
    def upload(self, images: Images) -> int: ...  # keyed images' features, encoded once; free
    def for_classes(self, classnames: Sequence[str], meter: QueryMeter | None = None,
                    purpose: str | None = None) -> BlackBoxAPI: ...  # the same model over other classes
    @property
    def capabilities(self) -> "Capabilities": ...  # what it accepts, returns, bills (bbpt.boxes.capabilities)
    # boxes that return embeddings (capabilities.returns has "embeddings"); charged (QueryMeter.embed_cost)
    def embed_images(self, images: Images) -> torch.Tensor: ...  # (B, E), L2-normalised
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor: ...  # (N, E), L2-normalised
