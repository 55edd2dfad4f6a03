"""EquiformerV2 graph attention (Liao et al., ICLR 2024, §3), with SO(2) convolutions in
each edge's frame and the smooth cutoff of :mod:`~nequip_deq.nn.attention.graph_attention`.

Node features are sphere arrays :math:`x_i` (``C`` channels per component, degrees up to
:math:`L`; :mod:`~nequip_deq.nn.attention.so2_convolution`). For edge ``e = (i, j)`` (``i`` receives),
with :math:`D_{ij}` the edge frame (:mod:`~nequip_deq.nn.attention.edge_frame`), :math:`\\phi_{ij}` the
enveloped radial basis and :math:`u_{ij}` the envelope:

.. math::
    h_{ij}, (a_{ij}, g_{ij}) &= \\mathrm{SO2}_1\\big(D_{ij}^\\top [x_j \\,\\|\\, x_i];\\ R(\\phi_{ij})\\big) \\\\
    z^h_{ij} &= w_h^\\top\\, \\mathrm{SmoothLeakyReLU}\\big(\\mathrm{LN}(a^h_{ij})\\big) \\\\
    \\alpha^h_{ij} &= u_{ij}\\, e^{z^h_{ij}} \\big/ \\textstyle\\sum_k u_{ik}\\, e^{z^h_{ik}} \\\\
    v_{ij} &= u_{ij}\\, D_{ij}\\, \\mathrm{SO2}_2\\big(\\mathrm{act}(h_{ij}, g_{ij})\\big) \\\\
    \\mathrm{GA}(x)_i &= L_{out}\\Big(\\bigoplus_h \\sum_j \\alpha^h_{ij}\\, v^h_{ij}\\Big)

:math:`a^h_{ij}` (``alpha_channels`` per head) and :math:`g_{ij}` (one gate per hidden channel)
are invariant outputs of the first convolution's m = 0 map; LN, the *attention
re-normalisation*, is a layer norm over each head's logit channels (``attention_renorm``).
``act`` is a gate: :math:`\\mathrm{SiLU}` on degree 0, each channel of degree :math:`l > 0`
multiplied by :math:`\\sigma(g_c)`. Heads split the channels into ``num_heads`` groups;
:math:`L_{out}` is a linear map per degree (e3nn ``Linear``).

The published model's separable S2 activation (SiLU on a grid of points on the sphere) is not
used on edges: a finite grid is not exactly invariant under rolls about the edge, and each edge
frame's roll jumps where the frame switches branches, so the energy would jump by the grid's
aliasing error as bonds turn. The gate is exactly equivariant and smooth.
"""

import torch
from e3nn.o3._irreps import Irreps
from e3nn.o3._linear import Linear
from e3nn.util.jit import compile_mode

from nequip.nn import ScalarMLPFunction, scatter

from .graph_attention import SmoothLeakyReLU, envelope_softmax
from .edge_frame import EdgeFrameRotation, EdgeWignerD
from .so2_convolution import SO2Convolution, from_sphere, to_sphere


@compile_mode("script")
class SO2GraphAttention(torch.nn.Module):
    """Multi-head EquiformerV2 attention (see the module docstring for the equations).

    Args:
        irreps_node: node feature irreps ``C x (0e + 1o + ... + L)`` (or all even: SE(3))
        l_max: :math:`L`, the largest degree of ``irreps_node``
        m_max: largest order kept in the edge frames (:math:`\\le L`)
        num_basis: radial basis size :math:`K`
        num_heads: heads; must divide ``C``
        alpha_channels: logit channels per head (``0``: ``C // num_heads``)
        hidden_channels: channels of :math:`h` (``0``: ``C``)
        attention_renorm: layer norm on the logit channels (EquiformerV2's default)
        mirror_symmetric: E(3) (natural-parity irreps; see
            :mod:`~nequip_deq.nn.attention.so2_convolution`) rather than SE(3) only
        radial_mlp_depth, radial_mlp_width: hidden layers of the radial MLP :math:`R`

    The radial weights and the edge frames depend on the geometry only (:meth:`edge_weights`),
    so a DEQ solve computes them once per call.

    Shapes: ``x (N, X)``, ``sh`` (unused: the edge frames replace the spherical harmonics),
    ``edge_weights (E, W + F)``, ``edge_cutoff (E, 1)``, ``edge_center``,
    ``edge_neighbor (E,)`` -> ``(N, X)``.
    """

    def __init__(
        self,
        irreps_node,
        l_max: int,
        m_max: int,
        num_basis: int,
        num_heads: int,
        alpha_channels: int = 0,
        hidden_channels: int = 0,
        attention_renorm: bool = True,
        mirror_symmetric: bool = True,
        radial_mlp_depth: int = 2,
        radial_mlp_width: int = 64,
    ):
        super().__init__()
        X = Irreps(irreps_node)
        self.l_max = l_max
        self.channels = X[0].mul
        self.num_heads = num_heads
        self.alpha_channels = alpha_channels if alpha_channels > 0 else self.channels // num_heads
        self.hidden = hidden_channels if hidden_channels > 0 else self.channels
        self.wigner = EdgeWignerD(l_max, m_max)
        self.frame = EdgeFrameRotation(l_max, m_max)
        num_logits = num_heads * self.alpha_channels
        self.conv1 = SO2Convolution(
            l_max, m_max, 2 * self.channels, self.hidden,
            extra_scalars=num_logits + self.hidden, mirror_symmetric=mirror_symmetric,
        )
        self.conv2 = SO2Convolution(
            l_max, m_max, self.hidden, self.channels, mirror_symmetric=mirror_symmetric
        )
        self.radial = ScalarMLPFunction(
            input_dim=num_basis,
            output_dim=self.conv1.radial_numel,
            hidden_layers_depth=radial_mlp_depth,
            hidden_layers_width=radial_mlp_width,
            nonlinearity="silu",
            bias=False,
        )
        self.renorm = (
            torch.nn.LayerNorm(self.alpha_channels) if attention_renorm else torch.nn.Identity()
        )
        self.act = SmoothLeakyReLU(0.2)
        w = torch.empty(num_heads, self.alpha_channels)
        torch.nn.init.xavier_uniform_(w)
        self.alpha_dot = torch.nn.Parameter(w)
        self.lin_out = Linear(X, X, biases=True)

    def edge_weights(self, edge_vectors: torch.Tensor, edge_embedding: torch.Tensor) -> torch.Tensor:
        """The geometry-only inputs of :meth:`forward`, ``(E, W + F)``: the first
        convolution's radial weights :math:`R(\\phi_{ij})` (``W``) and the edge frames
        :math:`D_{ij}` (``F``, :class:`~nequip_deq.nn.attention.edge_frame.EdgeWignerD`)."""
        return torch.cat([self.radial(edge_embedding), self.wigner(edge_vectors)], 1)

    def forward(
        self,
        x: torch.Tensor,
        sh: torch.Tensor,
        edge_weights: torch.Tensor,
        edge_cutoff: torch.Tensor,
        edge_center: torch.Tensor,
        edge_neighbor: torch.Tensor,
    ) -> torch.Tensor:
        num_nodes = x.size(0)
        radial_weights = edge_weights.narrow(1, 0, self.conv1.radial_numel)
        wigner = edge_weights.narrow(1, self.conv1.radial_numel, self.wigner.numel)
        xs = to_sphere(x, self.l_max, self.channels)
        pair = torch.cat(
            [torch.index_select(xs, 0, edge_neighbor), torch.index_select(xs, 0, edge_center)], -1
        )
        h, extra = self.conv1(self.frame.into(pair, wigner), radial_weights)
        num_logits = self.num_heads * self.alpha_channels
        a = extra.narrow(1, 0, num_logits).reshape(-1, self.num_heads, self.alpha_channels)
        logits = (self.act(self.renorm(a)) * self.alpha_dot).sum(-1)
        alpha = envelope_softmax(logits, edge_cutoff, edge_center, num_nodes)

        gate = torch.sigmoid(extra.narrow(1, num_logits, self.hidden)).unsqueeze(1)
        h = torch.cat([torch.nn.functional.silu(h.narrow(1, 0, 1)), h.narrow(1, 1, h.size(1) - 1) * gate], 1)
        v, _ = self.conv2(h)
        v = self.frame.out_of(v, wigner) * edge_cutoff.unsqueeze(-1)
        per_channel = alpha.repeat_interleave(self.channels // self.num_heads, dim=1)
        out = scatter(v * per_channel.unsqueeze(1), edge_center, dim=0, dim_size=num_nodes)
        return self.lin_out(from_sphere(out, self.l_max))
