"""Model builders (``@model_builder`` functions) named in YAML as ``nequip_deq.model.X``."""

from .equiformer import EquiformerModel, InvalidModelConfig

__all__ = ["EquiformerModel", "InvalidModelConfig"]
