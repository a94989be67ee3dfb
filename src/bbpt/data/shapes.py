"""Procedural CLEVR-like scenes: coloured shapes on a grey floor, deterministic by seed.

Used twice: captioned multi-object scenes are part of the embedded model's pretraining mix,
and the ``shapes`` task classifies single objects whose colour-shape *pairs* were never
rendered nor captioned in pretraining (only their words, in other combinations): zero-shot
accuracy there comes from compositional generalisation alone, as on a real CLIP's CLEVR.
"""
from __future__ import annotations

import numpy as np

COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 75, 215),
    "yellow": (225, 205, 35),
    "purple": (145, 55, 195),
    "orange": (240, 135, 25),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOUR_NAMES = tuple(COLOURS)
# Held-out pairs: never drawn or captioned in pretraining; the `shapes` task's 10 classes.
HELD_OUT = tuple(
    (c, s) for ci, c in enumerate(COLOUR_NAMES) for si, s in enumerate(SHAPES) if (ci + si) % 3 == 0
)
SEEN = tuple((c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in HELD_OUT)
SUPER = 4  # supersampling factor for anti-aliased edges


def _mask(shape: str, n: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean (n, n) mask of a shape centred at (cx, cy) with half-size r (pixels of n)."""
    y, x = np.mgrid[0:n, 0:n] + 0.5
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.15 * r
    if shape == "cross":
        w = 0.38 * r
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    if shape == "triangle":  # apex up
        top, bottom = -r, 0.8 * r
        inside_y = (dy >= top) & (dy <= bottom)
        half_w = (dy - top) / (bottom - top) * r * 1.05
        return inside_y & (np.abs(dx) <= half_w)
    raise ValueError(f"unknown shape {shape!r}")


def render(objects: list[tuple[str, str, float, float, float]], rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Draw objects [(colour, shape, cx, cy, r)] (coordinates in [0, 1]) -> (size, size, 3) uint8."""
    n = size * SUPER
    floor = rng.uniform(95, 150)
    img = np.full((n, n, 3), floor, dtype=np.float32)
    img += np.linspace(-12, 12, n, dtype=np.float32)[:, None, None]  # soft light gradient
    for colour, shape, cx, cy, r in objects:
        m = _mask(shape, n, cx * n, cy * n, r * n)
        shade = rng.uniform(0.8, 1.1)
        img[m] = np.clip(np.array(COLOURS[colour], dtype=np.float32) * shade, 0, 255)
    img = img.reshape(size, SUPER, size, SUPER, 3).mean(axis=(1, 3))
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def random_object(rng: np.random.Generator, pairs, placed: list) -> tuple:
    """A random (colour, shape, cx, cy, r) from ``pairs`` not overlapping ``placed``."""
    c, s = pairs[rng.integers(len(pairs))]
    for _ in range(20):
        r = rng.uniform(0.12, 0.22)
        cx, cy = rng.uniform(r + 0.03, 1 - r - 0.03, size=2)
        if all((cx - o[2]) ** 2 + (cy - o[3]) ** 2 > (r + o[4] + 0.02) ** 2 for o in placed):
            break
    return (c, s, float(cx), float(cy), float(r))


def size_word(r: float) -> str:
    return "small" if r < 0.16 else "large"


def position_word(cx: float, cy: float) -> str:
    if abs(cx - 0.5) > abs(cy - 0.5):
        return "left" if cx < 0.5 else "right"
    return "top" if cy < 0.5 else "bottom"


def caption_scene(objects, rng: np.random.Generator) -> str:
    """A varied English caption of a scene (pretraining only)."""
    if len(objects) == 1:
        c, s, cx, cy, r = objects[0]
        forms = [
            f"a {c} {s}",
            f"a photo of a {c} {s}.",
            f"a {size_word(r)} {c} {s}",
            f"a {c} {s} on the {position_word(cx, cy)}",
            f"a {s} that is {c}",
        ]
        return forms[rng.integers(len(forms))]
    parts = [f"a {c} {s}" for c, s, *_ in objects]
    joined = ", ".join(parts[:-1]) + " and " + parts[-1]
    forms = [joined, f"a photo of {joined}.", f"{len(objects)} objects: {joined}"]
    return forms[rng.integers(len(forms))]


def scene_batch(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, list[str]]:
    """n pretraining scenes (1-3 objects of the seen pairs) with captions."""
    rng = np.random.default_rng(seed)
    imgs, caps = [], []
    for _ in range(n):
        k = int(rng.choice([1, 1, 2, 3]))
        objs: list = []
        for _ in range(k):
            objs.append(random_object(rng, SEEN, objs))
        imgs.append(render(objs, rng, size))
        caps.append(caption_scene(objs, rng))
    return np.stack(imgs), caps


def task_split(n_per_class: int, seed: int, size: int = 32, distractors: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The ``shapes`` task: (N, size, size, 3) scenes, labels (N,).

    Each scene holds one object of a held-out pair (its class) among 0..``distractors``
    objects of seen pairs, as in a CLEVR scene; the label is never ambiguous, since the
    distractors are never of a held-out pair.
    """
    imgs, labels = [], []
    for label, pair in enumerate(HELD_OUT):
        for i in range(n_per_class):
            rng = np.random.default_rng([seed, label, i])
            objs = [random_object(rng, [pair], [])]
            for _ in range(int(rng.integers(0, distractors + 1))):
                objs.append(random_object(rng, SEEN, objs))
            imgs.append(render(objs, rng, size))
            labels.append(label)
    return np.stack(imgs), np.asarray(labels, dtype=np.int64)


def classnames() -> list[str]:
    return [f"{c} {s}" for c, s in HELD_OUT]
