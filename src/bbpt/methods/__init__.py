"""Tuning methods, one self-registering module each; every module here is imported."""
import importlib
import pkgutil

from ..data.staging import FewShotData
from .base import METHODS, Method, MethodConfig, make_config, register_method

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["METHODS", "FewShotData", "Method", "MethodConfig", "make_config", "register_method"]
