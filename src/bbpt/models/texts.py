"""Prompt assembly: the token ids and embedded sequences of every candidate-class text, and
their text features.

Soft prompt layout (CoOp / ZIP / CraFT): ``[SOS] ctx_1 .. ctx_m <class-name tokens> <suffix> [EOT]``.
The sequence is tokenised with m placeholder ``X`` tokens whose embeddings are replaced by
ctx, so the class name, suffix and EOT land where tokenising the text would put them.

:class:`PromptTexts` works on a backbone directly: the in-process black box holds one
privately (its queries are metered), and so does the white-box reference (CoOp), which
back-propagates through :func:`text_features`.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import BadInput
from .backbone import Backbone
from .caches import ByteLRU, nbytes
from .prompts import TextPrompt, preview

TEXT_CACHE_BYTES = 64 << 20  # token ids of prompt texts kept per box family (616 bytes a CLIP text: 100k texts)


class PromptTexts:
    """The texts of one class set on one backbone: token ids of every prompt, tokenised once
    per template set / context length and kept in ``cache`` (a :class:`ByteLRU` that boxes on
    other class sets may share: its keys name the class set)."""

    def __init__(self, backbone: Backbone, classnames: Sequence[str], cache: ByteLRU | None = None):
        self._bb = backbone
        self.classnames = list(classnames)
        self.cache = cache if cache is not None else ByteLRU(TEXT_CACHE_BYTES)  # token ids (N, L)
        self._classes_key = tuple(self.classnames)

    @property
    def tower(self):
        """The backbone's text tower (``Backbone.text``)."""
        return self._bb.text

    @property
    def context_length(self) -> int:
        return self._bb.text.context_length

    def ids(self, prompt) -> torch.Tensor:
        """Token ids of the prompt's texts, (P·C, L) of a text prompt or (C, L) of a soft one's
        template: tokenised once per template set / context length and kept in the text cache,
        refusing any text that does not fit the text context."""
        if isinstance(prompt, TextPrompt):
            return self._hard_ids(prompt.templates)
        return self._soft_ids(prompt.num_ctx, prompt.suffix)

    def _cached_ids(self, key: tuple, make) -> torch.Tensor:
        key = (self._classes_key, *key)
        ids = self.cache.get(key)
        if ids is None:
            ids = make()
            texts = sum(map(len, self.classnames)) + sum(len(str(k)) for k in key[1:])  # the key's strings
            self.cache.put(key, ids, nbytes(ids) + texts)
        return ids

    def _hard_ids(self, templates: tuple[str, ...]) -> torch.Tensor:
        def make():
            texts = [t.format(c) for t in templates for c in self.classnames]
            return self.tokenize_checked(texts, lambda t, n, limit: (
                f"prompt {preview(t)!r} has {n} tokens, more than the model's {limit}; "
                "shorten the template or the class name"))  # (P*C, 77)

        return self._cached_ids(("hard", templates), make)

    def _soft_ids(self, m: int, suffix: str) -> torch.Tensor:
        def make():
            head = " ".join(["X"] * m) + " "
            shown = "X " * m if m <= 3 else "X X .. X "

            def too_long(t, n, limit):
                return (f"prompt {preview(shown + t[len(head):])!r} ({m} context tokens) has {n} tokens, more "
                        f"than the model's {limit}; use fewer context tokens (n_ctx) or a shorter class name")

            ids = self.tokenize_checked([head + c + suffix for c in self.classnames], too_long)  # (C, 77)
            k = self._bb.text.prefix
            if self._bb.placeholder_id is None:
                raise self._bb.no_placeholder()
            if not bool((ids[:, k : k + m] == self._bb.placeholder_id).all()):
                raise BadInput(f"{self._bb.name}: the tokenizer merges the context placeholders with the text "
                               f"after them; put a space or a word between context and class (suffix {suffix!r})")
            return ids

        return self._cached_ids(("soft", m, suffix), make)

    def sequences(self, prompt, ids: torch.Tensor | None = None, L: int | None = None):
        """Embeddings (P, C, L, D) and ids (P, C, L) of all candidate-class sequences, from the
        prompt's token ids (:meth:`ids`) cut to their first ``L`` positions (None: all) before
        they are embedded."""
        C = len(self.classnames)
        ids = self.ids(prompt) if ids is None else ids
        ids = ids if L is None else ids[:, :L]
        emb = self._bb.text.embed(ids)  # (P*C or C, L, D)
        if isinstance(prompt, TextPrompt):
            P = prompt.num_prompts
            return emb.view(P, C, *emb.shape[1:]), ids.reshape(P, C, -1)
        ctx = prompt.ctx.to(emb.device, emb.dtype)
        P, m = prompt.num_prompts, prompt.num_ctx
        ctx = ctx[:, None].expand(P, C, m, -1) if ctx.ndim == 3 else ctx  # (P, C, m, D)
        k = self._bb.text.prefix  # special tokens before the text (CLIP's SOS), then the context
        emb = torch.cat([emb[None, :, :k].expand(P, -1, -1, -1), ctx, emb[None, :, k + m :].expand(P, -1, -1, -1)], dim=2)
        return emb, ids[None].expand(P, -1, -1)

    def tokenize_checked(self, texts: list[str], too_long) -> torch.Tensor:
        """Token ids (N, L) of ``texts``; BadInput(too_long(text, n_tokens, limit)) if a text has
        more tokens than the context leaves beside the special ones (CLIP: 77 - SOS - EOT).

        Tokenised once: the tokenizer truncates silently, but only a row that fills the window
        (EOT at or past the model's last position, or no padding left) can have been cut, so
        only those are counted exactly with the tokenizer's ``encode`` (skipped if it has none).
        """
        bb, tower = self._bb, self._bb.text
        ids = bb.tokenize(texts)
        limit = self.context_length - tower.prefix - 1
        eos = tower.eos_positions(ids)
        full = (eos >= min(ids.shape[1], self.context_length) - 1) | (ids[:, -1] != tower.pad_id)
        for i in full.nonzero().flatten().tolist():
            n = bb.count_tokens(texts[i])
            if n is not None and n > limit:
                raise BadInput(too_long(texts[i], n, limit))
        return ids


def text_features(items: list[tuple[PromptTexts, object]], ids: list[torch.Tensor] | None = None, *,
                  fast: bool = True, chunk: int = 4096) -> list[torch.Tensor]:
    """Normalised text features (P, C, E) of several prompts (on class sets of one backbone),
    their P·C sequences encoded together: at most ``chunk`` sequences per text-tower forward
    (on the CPU, blocks that stay in cache: :meth:`TextEncoder.per_forward`), all
    cut to the longest real length before they are embedded (exact under the causal mask, up
    to float rounding). ``ids``: each prompt's token ids, if already at hand. ``fast=False``:
    the reference loop, one candidate per forward at full context length."""
    tower = items[0][0].tower
    ids = ids if ids is not None else [texts.ids(prompt) for texts, prompt in items]  # (P·C or C, 77) each
    if not fast:  # reference loop: one candidate per forward, full context length
        out = []
        for (texts, prompt), i in zip(items, ids):
            emb, ids_ = texts.sequences(prompt, i)
            feats = [tower.encode(emb[p], ids_[p], cut=False) for p in range(emb.shape[0])]
            out.append(torch.nn.functional.normalize(torch.stack(feats).float(), dim=-1))
        return out
    L = max(tower.real_length(i) for i in ids)
    seqs = [texts.sequences(prompt, i, L) for (texts, prompt), i in zip(items, ids)]  # (P, C, L, D), (P, C, L) each
    flat = [(emb.reshape(-1, *emb.shape[2:]), i.reshape(-1, i.shape[-1])) for emb, i in seqs]  # (P·C, L, ·)
    emb = torch.cat([e for e, _ in flat]) if len(flat) > 1 else flat[0][0]
    idx = torch.cat([i for _, i in flat]) if len(flat) > 1 else flat[0][1]
    n = tower.per_forward(len(emb), L, chunk, emb.device)
    feats = torch.cat([tower.encode(emb[i : i + n], idx[i : i + n], cut=False) for i in range(0, len(emb), n)])
    feats = torch.nn.functional.normalize(feats.float(), dim=-1)
    out, i = [], 0
    for emb_, _ in seqs:
        P, C = emb_.shape[:2]
        out.append(feats[i : i + P * C].view(P, C, -1))
        i += P * C
    return out
