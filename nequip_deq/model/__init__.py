"""Model builders (``@model_builder`` functions) named in YAML as ``nequip_deq.model.X``."""

from .architecture import InvalidModelConfig
from .equiformer import EquiformerModel
from .deq_equiformer import DEQEquiformerModel

__all__ = ["EquiformerModel", "DEQEquiformerModel", "InvalidModelConfig"]
