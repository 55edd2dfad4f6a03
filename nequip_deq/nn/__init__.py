"""Graph modules of nequip-deq (``GraphModuleMixin`` modules and their building blocks), in
two sub-packages for the package's two ideas: :mod:`~nequip_deq.nn.attention` (the Equiformer
v1 and EquiformerV2 blocks) and :mod:`~nequip_deq.nn.fixed_point` (the deep-equilibrium
layers and what solves them); the encoder's radial bases and edge-degree embedding, and the
ML-IAP per-atom energies, are shared by both models. Everything either sub-package exports is
exported here too."""

from . import attention, fixed_point
from .attention import *  # noqa: F401,F403
from .fixed_point import *  # noqa: F401,F403
from .embedding import EdgeDegreeEmbedding
from .radial import ExpNormalEdgeLengthEncoding, GaussianEdgeLengthEncoding

__all__ = [
    "GaussianEdgeLengthEncoding",
    "ExpNormalEdgeLengthEncoding",
    "EdgeDegreeEmbedding",
    *attention.__all__,
    *fixed_point.__all__,
]
