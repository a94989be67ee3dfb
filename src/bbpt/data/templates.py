"""Zero-shot prompt templates of the CoOp-family papers, and a forgiving name lookup.

``CUSTOM_TEMPLATES`` is CoOp's table (the SVHN / Resisc45 / CLEVR rows come from BlackVIP
and ZIP); keys are CoOp's lowercase dataset folder names. ``template_for`` accepts the
usual spellings of a dataset ("OxfordPets", "oxford-pets", "pets", "split_zhou_OxfordPets").
"""
from __future__ import annotations

import re

CUSTOM_TEMPLATES: dict[str, str] = {
    "oxford_pets": "a photo of a {}, a type of pet.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "stanford_cars": "a photo of a {}.",
    "food101": "a photo of {}, a type of food.",
    "sun397": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
    "imagenetv2": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
    # BlackVIP's code omits the final period of these three ("This is a photo of a {}");
    # ZIP and this table keep it.
    "svhn": "This is a photo of a {}.",
    "resisc45": "This is a photo of a {}.",
    "clevr": "This is a photo of {} objects.",
}

# other spellings -> CUSTOM_TEMPLATES key; compared after _norm (lowercase, alphanumerics only)
_ALIASES: dict[str, str] = {
    "pets": "oxford_pets",
    "oxfordiiitpet": "oxford_pets",
    "flowers": "oxford_flowers",
    "flowers102": "oxford_flowers",
    "oxfordflowers102": "oxford_flowers",
    "fgvc": "fgvc_aircraft",
    "aircraft": "fgvc_aircraft",
    "describabletextures": "dtd",
    "textures": "dtd",
    "cars": "stanford_cars",
    "food": "food101",
    "sun": "sun397",
    "caltech": "caltech101",
    "ucf": "ucf101",
    "imagenetadversarial": "imagenet_a",
    "imagenetrendition": "imagenet_r",
    "resisc": "resisc45",
    "nwpuresisc45": "resisc45",
}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_LOOKUP: dict[str, str] = {_norm(k): k for k in CUSTOM_TEMPLATES} | _ALIASES


def template_for(name: str) -> str | None:
    """CoOp's zero-shot template for dataset ``name`` ("{}" marks the class), None if unknown."""
    stem = re.sub(r"^split_(zhou_|mlai_)?", "", name.strip().lower())  # split file stems
    key = _LOOKUP.get(_norm(stem))
    return None if key is None else CUSTOM_TEMPLATES[key]


# Datasets whose label a horizontal flip changes (a mirrored digit or word is not that
# digit or word): their training views are not flipped by default. The official configs
# flip every dataset (Dassl's random_flip); this is bbpt's per-task default.
FLIP_CHANGES_LABEL = {"svhn", "mnist", "emnist", "kmnist", "usps"}


def flip_keeps_label(name: str) -> bool:
    """False for digit / text datasets (by the usual spellings), True otherwise."""
    stem = _norm(re.sub(r"^split_(zhou_|mlai_)?", "", name.strip().lower()))
    return stem not in {_norm(k) for k in FLIP_CHANGES_LABEL}
