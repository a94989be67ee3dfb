"""Models: backbones (inside the black box), the black box itself and its query meter."""
from .backbone import Backbone, create_backbone, embedded_models, open_clip_models
from .blackbox import BlackBox, BlackBoxAPI, Images, SoftPrompt, TextPrompt, VisualPrompt
from .meter import QueryMeter

__all__ = [
    "Backbone", "BlackBox", "BlackBoxAPI", "Images", "QueryMeter", "SoftPrompt", "TextPrompt", "VisualPrompt",
    "create_backbone", "embedded_models", "open_clip_models",
]
