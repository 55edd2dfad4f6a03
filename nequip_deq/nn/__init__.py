"""Graph modules of nequip-deq (``GraphModuleMixin`` modules and their building blocks), in
two sub-packages for the package's two ideas: :mod:`~nequip_deq.nn.attention` (the Equiformer
v1 and EquiformerV2 blocks) and :mod:`~nequip_deq.nn.fixed_point` (the deep-equilibrium
layers and what solves them); the encoder's radial bases and edge-degree embedding, and the
ML-IAP per-atom energies, are shared by both models."""

from .radial import GaussianEdgeLengthEncoding, ExpNormalEdgeLengthEncoding
from .embedding import EdgeDegreeEmbedding
from .attention import (
    ATTENTION_TYPES,
    BLOCK_TYPES,
    DepthwiseTensorProduct,
    EdgeWignerD,
    EquiformerBlock,
    EquivariantFeedForward,
    EquivariantGraphAttention,
    EquivariantLayerNorm,
    GatedLinear,
    S2FeedForward,
    SeparableLayerNorm,
    SO2Convolution,
    SO2GraphAttention,
)
from .fixed_point import DEQEquiformerLayer, FixedPointError, VariationalDEQLayer

__all__ = [
    # the encoder
    "GaussianEdgeLengthEncoding",
    "ExpNormalEdgeLengthEncoding",
    "EdgeDegreeEmbedding",
    # attention blocks, v1 and shared
    "EquivariantLayerNorm",
    "DepthwiseTensorProduct",
    "GatedLinear",
    "EquivariantGraphAttention",
    "ATTENTION_TYPES",
    "EquivariantFeedForward",
    "EquiformerBlock",
    "BLOCK_TYPES",
    # EquiformerV2
    "SeparableLayerNorm",
    "S2FeedForward",
    "EdgeWignerD",
    "SO2Convolution",
    "SO2GraphAttention",
    # deep equilibrium
    "DEQEquiformerLayer",
    "VariationalDEQLayer",
    "FixedPointError",
]
