"""The attention blocks: Equiformer (v1: depthwise tensor products, MLP or dot-product graph
attention, gated feed-forward) and EquiformerV2 (edge frames and SO(2) convolutions, S2
activations, separable layer norm), and the block that composes either
(:class:`~nequip_deq.nn.attention.block.EquiformerBlock`, ``block_type: v1 | v2``)."""

from .layer_norm import EquivariantLayerNorm, SeparableLayerNorm
from .tensor_product import DepthwiseTensorProduct, GatedLinear
from .graph_attention import ATTENTION_TYPES, EquivariantGraphAttention
from .feed_forward import EquivariantFeedForward, S2FeedForward
from .edge_frame import EdgeWignerD
from .so2_convolution import SO2Convolution
from .so2_attention import SO2GraphAttention
from .block import BLOCK_TYPES, EquiformerBlock

__all__ = [
    # v1 and shared
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
]
