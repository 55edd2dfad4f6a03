"""The Equiformer transformer block as a nequip graph module."""

from typing import Optional

import torch
from e3nn.o3._irreps import Irreps
from e3nn.o3._linear import Linear
from e3nn.util.jit import compile_mode

from nequip.data import AtomicDataDict
from nequip.nn import GraphModuleMixin
from nequip.nn._ghost_exchange_base import NoOpGhostExchangeModule

from .graph_attention import EquivariantGraphAttention
from .feed_forward import EquivariantFeedForward, S2FeedForward
from .layer_norm import EquivariantLayerNorm, SeparableLayerNorm
from .so2_attention import SO2GraphAttention

BLOCK_TYPES = ("v1", "v2")


@compile_mode("script")
class EquiformerBlock(GraphModuleMixin, torch.nn.Module):
    """Pre-norm transformer block on ``node_features`` (``X``):

    .. math::
        y &= x + \\mathrm{GA}(\\mathrm{LN}_1(x)) \\\\
        x' &= S(y) + \\mathrm{FFN}(\\mathrm{LN}_2(y))

    With ``branch_scale`` :math:`s`, the two residual branches are multiplied by learnable
    scalars :math:`\\gamma_a, \\gamma_f` initialised to :math:`s` (LayerScale): a small
    :math:`s` makes the block close to the identity at initialisation, which keeps a
    weight-tied DEQ function contractive.

    :math:`S` is the identity when ``irreps_out == X``; otherwise (the output block, e.g.
    ``512x0e``) an equivariant linear shortcut, followed by a final layer norm when
    ``output_norm``. GA is Equiformer's attention with depth-wise tensor products
    (``block_type="v1"``, :class:`~nequip_deq.nn.attention.graph_attention.EquivariantGraphAttention`) or
    EquiformerV2's with SO(2) convolutions in edge frames (``"v2"``,
    :class:`~nequip_deq.nn.attention.so2_attention.SO2GraphAttention`). Reads ``edge_attrs`` (spherical
    harmonics; v1), ``edge_vectors`` (v2: the edge frames), ``edge_embedding`` (enveloped radial
    basis) and ``edge_cutoff`` (envelope).

    Under LAMMPS ML-IAP the nodes are local + ghost atoms and only local atoms receive
    messages: the block first replaces the ghost rows of its input by their owners' features
    (``ghost_exchange``: a no-op until nequip's ``enable_LAMMPSMLIAPGhostExchange`` modifier
    swaps in LAMMPS' exchange), so that every message a local atom receives is right.

    The attention's radial weights (and v2's edge frames) depend on the geometry only
    (:meth:`edge_weights`);
    :meth:`update` takes them precomputed, so a DEQ applying the block many times on one
    geometry computes them once per call; :meth:`forward` computes them and updates.

    Args:
        irreps_out: output feature irreps (default: same as input)
        num_heads, attention_type, nonlinear_messages, alpha_channels, radial_mlp_depth,
            radial_mlp_width: see :class:`EquivariantGraphAttention`
        ffn_multiplier: hidden width factor of the feed-forward network
        output_norm: apply a layer norm to the output (used by the output block)
        branch_scale: initial LayerScale of the residual branches (default ``None``: none)
        norm_eps: variance floor :math:`\\epsilon` of the layer norms (their gain is at most
            :math:`1/\\sqrt{\\epsilon}`)
        block_type: ``"v1"`` or ``"v2"`` (see above)
        m_max, attention_renorm, hidden_channels: v2 only, see :class:`SO2GraphAttention`
        separable_layer_norm: :class:`~nequip_deq.nn.attention.layer_norm.SeparableLayerNorm` instead
            of one variance per degree (EquiformerV2's choice)
        s2_activation: v2 only: the feed-forward network's activation is the separable S2
            activation (:class:`~nequip_deq.nn.attention.feed_forward.S2FeedForward`; approximately
            equivariant) instead of a gate
    """

    def __init__(
        self,
        num_heads: int,
        attention_type: str = "mlp",
        nonlinear_messages: bool = True,
        alpha_channels: int = 0,
        radial_mlp_depth: int = 2,
        radial_mlp_width: int = 64,
        ffn_multiplier: int = 3,
        irreps_out: Optional[str] = None,
        output_norm: bool = False,
        branch_scale: Optional[float] = None,
        norm_eps: float = 1e-5,
        block_type: str = "v1",
        m_max: int = 2,
        attention_renorm: bool = True,
        hidden_channels: int = 0,
        separable_layer_norm: bool = False,
        s2_activation: bool = False,
        irreps_in=None,
    ):
        super().__init__()
        self._init_irreps(
            irreps_in=irreps_in,
            required_irreps_in=[
                AtomicDataDict.NODE_FEATURES_KEY,
                AtomicDataDict.EDGE_ATTRS_KEY,
                AtomicDataDict.EDGE_EMBEDDING_KEY,
                AtomicDataDict.EDGE_CUTOFF_KEY,
            ],
        )
        X = Irreps(self.irreps_in[AtomicDataDict.NODE_FEATURES_KEY])
        out = X if irreps_out is None else Irreps(irreps_out)
        self.irreps_out[AtomicDataDict.NODE_FEATURES_KEY] = out
        num_basis = self.irreps_in[AtomicDataDict.EDGE_EMBEDDING_KEY].num_irreps

        norm = SeparableLayerNorm if separable_layer_norm else EquivariantLayerNorm
        self.norm_attn = norm(X, eps=norm_eps)
        if block_type == "v2":
            self.attn = SO2GraphAttention(
                irreps_node=X,
                l_max=X.lmax,
                m_max=m_max,
                num_basis=num_basis,
                num_heads=num_heads,
                alpha_channels=alpha_channels,
                hidden_channels=hidden_channels,
                attention_renorm=attention_renorm,
                mirror_symmetric=any(ir.p == -1 for _, ir in X),
                radial_mlp_depth=radial_mlp_depth,
                radial_mlp_width=radial_mlp_width,
            )
        else:
            self.attn = EquivariantGraphAttention(
                irreps_node=X,
                irreps_sh=self.irreps_in[AtomicDataDict.EDGE_ATTRS_KEY],
                num_basis=num_basis,
                num_heads=num_heads,
                attention_type=attention_type,
                nonlinear_messages=nonlinear_messages,
                alpha_channels=alpha_channels,
                radial_mlp_depth=radial_mlp_depth,
                radial_mlp_width=radial_mlp_width,
            )
        self.norm_ffn = norm(X, eps=norm_eps)
        ffn = S2FeedForward if s2_activation and block_type == "v2" else EquivariantFeedForward
        self.ffn = ffn(X, out, multiplier=ffn_multiplier)
        self.shortcut = None if out == X else Linear(X, out)
        self.norm_out = norm(out) if output_norm else None
        self.ghost_exchange = NoOpGhostExchangeModule(
            field=AtomicDataDict.NODE_FEATURES_KEY, irreps_in=self.irreps_in
        )
        if branch_scale is None:
            self.register_buffer("branch_scales", torch.ones(2))
        else:
            self.branch_scales = torch.nn.Parameter(torch.full((2,), float(branch_scale)))

    def edge_weights(self, data: AtomicDataDict.Type) -> torch.Tensor:
        """The attention's geometry-only weights ``(E, W)`` from ``edge_vectors`` and
        ``edge_embedding`` (radial weights; v2: and the edge frames)."""
        return self.attn.edge_weights(
            data[AtomicDataDict.EDGE_VECTORS_KEY], data[AtomicDataDict.EDGE_EMBEDDING_KEY]
        )

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        return self.update(data, self.edge_weights(data))

    def update(self, data: AtomicDataDict.Type, edge_weights: torch.Tensor) -> AtomicDataDict.Type:
        """The block on ``node_features`` with the radial weights of :meth:`edge_weights`."""
        data = self.ghost_exchange(data, ghost_included=True)
        x = data[AtomicDataDict.NODE_FEATURES_KEY]
        edge_index = data[AtomicDataDict.EDGE_INDEX_KEY]
        y = x + self.branch_scales[0] * self.attn(
            self.norm_attn(x),
            data[AtomicDataDict.EDGE_ATTRS_KEY],
            edge_weights,
            data[AtomicDataDict.EDGE_CUTOFF_KEY],
            edge_index[0],
            edge_index[1],
        )
        out = self.branch_scales[1] * self.ffn(self.norm_ffn(y))
        if self.shortcut is not None:
            out = out + self.shortcut(y)
        else:
            out = out + y
        if self.norm_out is not None:
            out = self.norm_out(out)
        data[AtomicDataDict.NODE_FEATURES_KEY] = out
        return data
