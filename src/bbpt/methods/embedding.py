"""What the methods on returned embeddings share (the linear probe, Tip-Adapter, LFA).

An embedding API (``openai:URL``, or the in-process box) returns an L2-normalised vector per
image or text and no class scores. These methods fetch the few-shot set's embeddings once
(and, where the method needs them, the class texts' and the validation images'), fit in
closed form or by local optimisation on those vectors, and never query during the fit:

- step 1 checks that every request the fit makes fits the budget (else
  :class:`BudgetExhausted` before anything is spent), embeds, fits, and returns its stats;
  step 2 returns None;
- ``predict`` embeds the query images through the evaluation box and applies the fitted
  tensors (``extra_state``: what ``bbpt eval --prompt`` re-applies); before the fit it
  returns zeros (chance), so the curve's first point costs nothing.

Costs (:meth:`QueryMeter.embed_cost`): images are sent ``max_images_per_call`` (128) to a
request, each ``ceil(B / 128)`` api_calls and B images_forwarded; the C x T class texts go in
one request, ``ceil(C T / 128)`` api_calls and C T prompt_evals. That is what the in-process
box charges. A transport that splits a request further charges as its API counts (the
``openai`` one: each wire request of ``batch`` inputs, 32 by default), so the step's check
before it sends anything is a lower bound there: a budget between the two stops the run
inside the step (``stopped_by: budget``, nothing fitted).
"""
from __future__ import annotations

import hashlib
import math
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F

from ..boxes.capabilities import Needs
from ..data.staging import FewShotData
from ..errors import BudgetExhausted
from ..models.blackbox import BlackBoxAPI, Images, TextPrompt
from .base import Budget, Method, MethodConfig

EMBEDDINGS_OUT = frozenset({"embeddings"})
TEXT_AND_PIXELS = Needs(frozenset({"templates", "pixels"}), EMBEDDINGS_OUT)


class EmbeddingConfig(MethodConfig):
    """Options of the methods on embeddings; ``batch_size`` (a query's images) is unused."""

    sources = {"batch_size": "bbpt: unused by the methods on embeddings (images are sent max_images_per_call to "
                             "a request, and the fit sees them all)"}


def chunks(images: Images, n: int) -> list[Images]:
    """``images`` in requests of at most ``n`` (keys kept, so a box may reuse cached features)."""
    out = []
    for i in range(0, len(images), n):
        keys = None if images.keys is None else list(images.keys[i:i + n])
        out.append(Images(images.pixels[i:i + n], keys))
    return out


def embed_images(box: BlackBoxAPI, images: Images) -> torch.Tensor:
    """(B, E) L2-normalised embeddings, ``box.max_images_per_call`` images per request."""
    return torch.cat([box.embed_images(c) for c in chunks(images, box.max_images_per_call)]).float()


def class_texts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """The C x T texts, class-major: ``templates[t].format(classnames[c])`` at c T + t."""
    return [t.format(c) for c in classnames for t in templates]


def class_embeddings(box: BlackBoxAPI, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(C, E) class prototypes: each class's template embeddings averaged and re-normalised
    (CLIP's prompt ensemble; Tip-Adapter ``utils.py`` clip_classifier). One request."""
    emb = box.embed_texts(class_texts(classnames, templates)).float()  # (C T, E), unit rows
    emb = emb.view(len(classnames), len(templates), -1).mean(1)
    return F.normalize(emb, dim=-1)


def classes_tag(classnames: Sequence[str]) -> torch.Tensor:
    """(32,) uint8: the SHA-256 of the class names, saved beside a fit so ``apply`` knows
    whether a box is over the classes it was fitted on."""
    return torch.tensor(list(hashlib.sha256("\n".join(classnames).encode()).digest()), dtype=torch.uint8)


def same_classes(extra: dict, box: BlackBoxAPI) -> bool:
    return "classes" in extra and torch.equal(extra["classes"], classes_tag(box.classnames))


class EmbeddingMethod(Method):
    """Step 1: embed (train passes, class texts, validation images), fit; step 2: done.

    A subclass sets ``needs``, ``uses_text`` / ``uses_val``, and implements :meth:`fit`
    (embeddings -> a dict of tensors, and stats) and :meth:`logits` (a fit and embeddings ->
    class scores). ``fitted`` is the whole state."""

    budget_unit = "api_calls"
    needs = TEXT_AND_PIXELS
    state = ("fitted",)
    uses_text: ClassVar[bool] = True
    uses_val: ClassVar[bool] = False

    def __init__(self, cfg, env):
        super().__init__(cfg, env)
        self.fitted: dict[str, torch.Tensor] | None = None
        self.templates = tuple(self.task_info["templates"])
        self.val: FewShotData | None = env.val if self.uses_val else None

    def train_passes(self) -> list[Images]:
        """What the training images are embedded as: one pass (augmented with training views)."""
        return [self.data.one_pass()]

    def total_steps(self) -> int:
        return 1

    def fit_cost(self, passes: list[Images]) -> dict:
        """What step 1 will be charged, in every unit, at the in-process box's rates (a lower
        bound where a transport splits requests further), before it sends anything."""
        per = n = self.box.max_images_per_call
        sizes = [len(c) for p in passes for c in chunks(p, n)]
        if self.val is not None:
            sizes += [len(c) for c in chunks(self.val.images(), n)]
        texts = len(self.task_info["classnames"]) * len(self.templates) if self.uses_text else 0
        return {"api_calls": sum(math.ceil(s / per) for s in sizes) + math.ceil(texts / per),
                "prompt_evals": texts, "images_forwarded": sum(sizes)}

    def step(self, budget: Budget) -> dict | None:
        if self.fitted is not None:
            return None
        passes = self.train_passes()
        cost = self.fit_cost(passes)
        if budget.total is not None and budget.spent + cost[budget.unit] > budget.total:
            u = budget.unit
            raise BudgetExhausted({u: budget.spent}, {u: budget.total}, {u: cost[u]})
        x = torch.stack([embed_images(self.box, p) for p in passes])  # (A, N, E)
        text = class_embeddings(self.box, self.box.classnames, self.templates) if self.uses_text else None  # (C, E)
        val = None
        if self.val is not None:  # sent without keys: never cached, so evaluation encodes val the same way every run
            xv = embed_images(self.box, Images(self.val.images().pixels))
            val = (xv, self.val.labels)
        fitted, stats = self.fit(x, self.data.labels, text, val)
        self.fitted = {**fitted, "classes": classes_tag(self.box.classnames)}
        return stats

    def fit(self, x: torch.Tensor, y: torch.Tensor, text: torch.Tensor | None, val) -> tuple[dict, dict]:
        """(A, N, E) train embeddings (A passes), (N,) labels, (C, E) class prototypes or
        None, (val embeddings, labels) or None -> (tensors of the fit, stats)."""
        raise NotImplementedError

    @classmethod
    def logits(cls, fit: dict, f: torch.Tensor, text: torch.Tensor | None, same: bool) -> torch.Tensor:
        """(B, E) query embeddings -> (B, C) scores; ``text``: the box's class prototypes;
        ``same``: whether the box is over the classes of the fit."""
        raise NotImplementedError

    def prompt(self) -> TextPrompt:
        return TextPrompt(self.templates)

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in (self.fitted or {}).items()}

    def predict(self, box: BlackBoxAPI, images: Images) -> torch.Tensor:
        if self.fitted is None:  # nothing fetched yet: chance, and no query
            return torch.zeros(len(images), box.num_classes)
        return super().predict(box, images)

    @classmethod
    def apply(cls, prompt, extra: dict[str, torch.Tensor], box: BlackBoxAPI, images: Images) -> torch.Tensor:
        """Scores of the saved fit on ``images``. On the classes of the fit the saved class
        prototypes are used (no text request); on others (base-to-new, cross-dataset) the
        box's class names are embedded with the saved templates."""
        same = same_classes(extra, box)
        if not same and "classes" not in extra:
            raise KeyError("classes (an embedding method's prompt keeps its fit beside the templates)")
        text = None
        if cls.uses_text or not same:
            text = extra["text"] if same and "text" in extra else class_embeddings(box, box.classnames, prompt.templates)
        f = embed_images(box, images)
        return cls.logits(extra, f, text, same)
