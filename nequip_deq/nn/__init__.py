"""Graph modules of nequip-deq (``GraphModuleMixin`` modules and their building blocks)."""

from .radial import GaussianEdgeLengthEncoding, ExpNormalEdgeLengthEncoding
from .layer_norm import EquivariantLayerNorm
from .tensor_product import DepthwiseTensorProduct, GatedLinear
from .attention import EquivariantGraphAttention, ATTENTION_TYPES
from .feed_forward import EquivariantFeedForward
from .embedding import EdgeDegreeEmbedding
from .block import BLOCK_TYPES, EquiformerBlock

__all__ = [
    "GaussianEdgeLengthEncoding",
    "ExpNormalEdgeLengthEncoding",
    "EquivariantLayerNorm",
    "DepthwiseTensorProduct",
    "GatedLinear",
    "EquivariantGraphAttention",
    "ATTENTION_TYPES",
    "EquivariantFeedForward",
    "EdgeDegreeEmbedding",
    "EquiformerBlock",
    "BLOCK_TYPES",
]
