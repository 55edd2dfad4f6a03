"""Model builders (``@model_builder`` functions) named in YAML as ``nequip_deq.model.X``."""

from .equiformer import EquiformerModel, InvalidModelConfig
from .deq_equiformer import DEQEquiformerModel

__all__ = ["EquiformerModel", "DEQEquiformerModel", "InvalidModelConfig"]
