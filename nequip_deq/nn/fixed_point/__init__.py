"""The fixed-point machinery of the DEQ models: the layers (Lagrangian,
:mod:`~nequip_deq.nn.fixed_point.layer`; variational,
:mod:`~nequip_deq.nn.fixed_point.variational`), the input injection, the solvers, the
training-only gradients, the starting points of MD solves (extrapolation, the in-model state
cache) and the deploy-time settings (metadata, model modifiers)."""

from .layer import DEQEquiformerLayer, PartialForcesNotExact
from .variational import VariationalDEQLayer
from .solvers import FixedPointError

__all__ = ["DEQEquiformerLayer", "VariationalDEQLayer", "FixedPointError", "PartialForcesNotExact"]
