"""Graph modules of nequip-deq (``GraphModuleMixin`` modules and their building blocks):
the attention blocks (Equiformer v1 and EquiformerV2 parts) and the deep-equilibrium layers."""

from .radial import GaussianEdgeLengthEncoding, ExpNormalEdgeLengthEncoding
from .layer_norm import EquivariantLayerNorm, SeparableLayerNorm
from .tensor_product import DepthwiseTensorProduct, GatedLinear
from .attention import EquivariantGraphAttention, ATTENTION_TYPES
from .feed_forward import EquivariantFeedForward, S2FeedForward
from .embedding import EdgeDegreeEmbedding
from .edge_frame import EdgeWignerD
from .so2_convolution import SO2Convolution
from .so2_attention import SO2GraphAttention
from .block import BLOCK_TYPES, EquiformerBlock
from .fixed_point import DEQEquiformerLayer
from .variational import VariationalDEQLayer
from .solvers import FixedPointError

__all__ = [
    # v1 and shared
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
