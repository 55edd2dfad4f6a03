"""Equivariant graph attention (Equiformer, Liao & Smidt 2023, §3.3), with a smooth cutoff.

Notation: edge ``e = (i, j)`` with ``i = edge_index[0]`` (centre, receives) and
``j = edge_index[1]`` (neighbour, sends), :math:`Y_{ij}` the edge spherical harmonics,
:math:`\\phi_{ij}` the enveloped radial basis and :math:`u_{ij}` the envelope itself.

.. math::
    m_{ij} &= L_{src}(x_j) + L_{dst}(x_i) \\\\
    f_{ij} &= \\mathrm{DTP}(m_{ij}, Y_{ij};\\ R(\\phi_{ij})) \\\\
    v_{ij} &= u_{ij}\\,\\begin{cases}
        L_v(\\mathrm{DTP}(\\mathrm{Gate}(L_g f_{ij}), Y_{ij}; w)) & \\text{non-linear messages}\\\\
        L_v f_{ij} & \\text{linear messages}\\end{cases} \\\\
    z^h_{ij} &= \\begin{cases}
        a_h^\\top \\mathrm{SmoothLeakyReLU}(L_\\alpha f_{ij})_h & \\text{MLP attention}\\\\
        \\langle q^h_i, k^h_{ij}\\rangle / \\sqrt{n_h(2l+1)} & \\text{dot-product attention}
        \\end{cases} \\\\
    \\alpha^h_{ij} &= \\frac{u_{ij}\\, e^{z^h_{ij}}}{\\sum_k u_{ik}\\, e^{z^h_{ik}}} \\\\
    \\mathrm{GA}(x)_i &= L_{out}\\Big(\\bigoplus_h \\sum_j \\alpha^h_{ij} v^h_{ij}\\Big)

The envelope enters twice: inside the softmax (a neighbour's weight fades out as it leaves)
and on the value (an atom's last neighbour fades out too), so the output and its gradient are
continuous in the positions everywhere, including at :math:`r_{max}`. Heads split every irrep
block into ``num_heads`` equal channel groups.
"""

import math
from typing import List

import torch
from e3nn.o3._irreps import Irreps
from e3nn.o3._linear import Linear
from e3nn.util.jit import compile_mode

from nequip.nn import ScalarMLPFunction, scatter

from .tensor_product import DepthwiseTensorProduct, GatedLinear

ATTENTION_TYPES = ("mlp", "dot_product")


class SmoothLeakyReLU(torch.nn.Module):
    """:math:`\\frac{1+a}{2}x + \\frac{1-a}{2}x\\,(2\\sigma(x) - 1)`, smooth for forces."""

    def __init__(self, negative_slope: float = 0.2):
        super().__init__()
        self.alpha = negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (1.0 + self.alpha) * x + 0.5 * (1.0 - self.alpha) * x * (
            2.0 * torch.sigmoid(x) - 1.0
        )


def _head_layout(irreps: Irreps, num_heads: int):
    """For every component of ``irreps`` (``mul_ir`` layout): its head, and the dot-product
    scale :math:`1/\\sqrt{n_h (2l+1)}` with :math:`n_h` irreps per head."""
    per_head = irreps.num_irreps // num_heads
    head: List[int] = []
    scale: List[float] = []
    for mul, ir in irreps:
        for c in range(mul):
            head += [c // (mul // num_heads)] * ir.dim
            scale += [1.0 / math.sqrt(per_head * ir.dim)] * ir.dim
    return torch.tensor(head, dtype=torch.long), torch.tensor(scale)


def envelope_softmax(
    logits: torch.Tensor, edge_cutoff: torch.Tensor, edge_center: torch.Tensor, num_nodes: int
) -> torch.Tensor:
    """Softmax of ``logits`` ``(E, H)`` over the edges of each centre, each edge weighted by
    its envelope ``edge_cutoff`` ``(E, 1)``:
    :math:`\\alpha_{ij} = u_{ij} e^{z_{ij}} / \\sum_k u_{ik} e^{z_{ik}}`.

    A neighbour's weight goes continuously to 0 as it reaches the cutoff; a centre whose
    neighbours all sit at the cutoff gets all-zero weights instead of ``0/0``.

    For a stable ``exp``, each centre's terms are scaled by :math:`e^{-m_i}` with
    :math:`m_i = \\max_k (z_{ik} + \\log u_{ik})` (the softmax does not depend on it, so it
    carries no gradient): the largest term is then exactly 1, whatever the logits of edges
    whose envelope is (near) zero, and no term overflows
    (:math:`u_{ik} e^{z_{ik} - m_i} \\le 1`; edges with :math:`u = 0` are left out of the
    maximum and get weight 0; :math:`\\log u` is floored near the dtype's smallest normal
    number).
    """
    index = edge_center.unsqueeze(-1).expand_as(logits)
    tiny = 1e-300 if logits.dtype == torch.float64 else 1e-37
    u = edge_cutoff.detach()
    scaled = torch.where(
        u > 0, logits.detach() + torch.log(u.clamp_min(tiny)), torch.full_like(logits, float("-inf"))
    )
    shift = torch.full(
        (num_nodes, logits.size(1)), float("-inf"), dtype=logits.dtype, device=logits.device
    ).scatter_reduce(0, index, scaled, reduce="amax", include_self=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    # u = 0 edges: weight 0 whatever their logit (the exponent is not evaluated for them)
    exponent = logits - torch.index_select(shift, 0, edge_center)
    w = edge_cutoff * torch.exp(torch.where(u > 0, exponent, torch.zeros_like(exponent)))
    denom = torch.index_select(scatter(w, edge_center, dim=0, dim_size=num_nodes), 0, edge_center)
    # all of a centre's neighbours at the cutoff: zero weights instead of 0/0
    return w / torch.where(denom > 0, denom, torch.ones_like(denom))


@compile_mode("script")
class MLPAttentionLogits(torch.nn.Module):
    """:math:`z^h_{ij} = a_h^\\top \\mathrm{SmoothLeakyReLU}(L_\\alpha f_{ij})_h`, shape ``(E, H)``."""

    def __init__(self, irreps_f, num_heads: int, alpha_channels: int):
        super().__init__()
        self.num_heads = num_heads
        self.alpha_channels = alpha_channels
        self.lin_alpha = Linear(
            irreps_f, Irreps(f"{num_heads * alpha_channels}x0e"), biases=True
        )
        self.act = SmoothLeakyReLU(0.2)
        a = torch.empty(num_heads, alpha_channels)
        torch.nn.init.xavier_uniform_(a)
        self.alpha_dot = torch.nn.Parameter(a)

    def forward(
        self, x: torch.Tensor, f: torch.Tensor, edge_center: torch.Tensor
    ) -> torch.Tensor:
        a = self.lin_alpha(f).view(-1, self.num_heads, self.alpha_channels)
        return (self.act(a) * self.alpha_dot).sum(-1)


@compile_mode("script")
class DotProductAttentionLogits(torch.nn.Module):
    """:math:`z^h_{ij} = \\sum_{c,m \\in h} q_{i,cm} k_{ij,cm} / \\sqrt{n_h (2l+1)}` with
    the query from the centre's features and the key from the edge features, shape ``(E, H)``."""

    def __init__(self, irreps_node, irreps_f, num_heads: int):
        super().__init__()
        X = Irreps(irreps_node)
        self.lin_query = Linear(X, X)
        self.lin_key = Linear(irreps_f, X)
        head, scale = _head_layout(X, num_heads)
        self.register_buffer(
            "head_matrix",
            torch.nn.functional.one_hot(head, num_heads).to(scale.dtype)
            * scale.unsqueeze(-1),
        )

    def forward(
        self, x: torch.Tensor, f: torch.Tensor, edge_center: torch.Tensor
    ) -> torch.Tensor:
        q = torch.index_select(self.lin_query(x), 0, edge_center)
        return torch.mm(q * self.lin_key(f), self.head_matrix)


@compile_mode("script")
class NonlinearValue(torch.nn.Module):
    """:math:`v_{ij} = L_v(\\mathrm{DTP}(\\mathrm{Gate}(L_g f_{ij}), Y_{ij}; w))`, learned
    constant weights :math:`w`; ``(E, irreps_f) -> (E, X)``."""

    def __init__(self, irreps_f, irreps_sh, irreps_node):
        super().__init__()
        self.gate = GatedLinear(irreps_f, irreps_node)
        self.dtp = DepthwiseTensorProduct(
            self.gate.irreps_out, irreps_sh, irreps_node, internal_weights=True
        )
        self.lin = Linear(self.dtp.irreps_out, Irreps(irreps_node))

    def forward(self, f: torch.Tensor, sh: torch.Tensor) -> torch.Tensor:
        return self.lin(self.dtp(self.gate(f), sh))


@compile_mode("script")
class LinearValue(torch.nn.Module):
    """:math:`v_{ij} = L_v f_{ij}`; ``(E, irreps_f) -> (E, X)``."""

    def __init__(self, irreps_f, irreps_node):
        super().__init__()
        self.lin = Linear(irreps_f, Irreps(irreps_node))

    def forward(self, f: torch.Tensor, sh: torch.Tensor) -> torch.Tensor:
        return self.lin(f)


@compile_mode("script")
class EquivariantGraphAttention(torch.nn.Module):
    """Multi-head equivariant graph attention (see the module docstring for the equations).

    Args:
        irreps_node: node feature irreps ``X`` (input and output)
        irreps_sh: edge spherical-harmonic irreps
        num_basis: radial basis size :math:`K`
        num_heads: heads; must divide every multiplicity of ``irreps_node``
        attention_type: ``"mlp"`` or ``"dot_product"``
        nonlinear_messages: gate + second depth-wise TP on the value path
        alpha_channels: logit channels per head (MLP attention); ``0``: ``0e`` scalars per head
        radial_mlp_depth, radial_mlp_width: hidden layers of the radial MLP :math:`R`

    The radial weights :math:`R(\\phi_{ij})` depend on the geometry only: they are computed
    by :meth:`edge_weights` and passed to :meth:`forward`, so that a caller applying the
    same attention to many features on one geometry (a DEQ solve) computes them once.

    Shapes: ``x (N, X)``, ``sh (E, irreps_sh)``, ``radial_weights (E, W)`` (from
    ``edge_embedding (E, K)``), ``edge_cutoff (E, 1)``, ``edge_center``, ``edge_neighbor (E,)``
    -> ``(N, X)``.
    """

    def __init__(
        self,
        irreps_node,
        irreps_sh,
        num_basis: int,
        num_heads: int,
        attention_type: str = "mlp",
        nonlinear_messages: bool = True,
        alpha_channels: int = 0,
        radial_mlp_depth: int = 2,
        radial_mlp_width: int = 64,
    ):
        super().__init__()
        X = Irreps(irreps_node)
        self.num_heads = num_heads
        self.lin_src = Linear(X, X, biases=True)
        self.lin_dst = Linear(X, X)
        self.dtp = DepthwiseTensorProduct(X, irreps_sh, X, internal_weights=False)
        self.radial = ScalarMLPFunction(
            input_dim=num_basis,
            output_dim=self.dtp.weight_numel,
            hidden_layers_depth=radial_mlp_depth,
            hidden_layers_width=radial_mlp_width,
            nonlinearity="silu",
            bias=False,
        )
        f_irreps = self.dtp.irreps_out
        if attention_type == "mlp":
            channels = alpha_channels if alpha_channels > 0 else X.count("0e") // num_heads
            self.logits = MLPAttentionLogits(f_irreps, num_heads, channels)
        else:
            self.logits = DotProductAttentionLogits(X, f_irreps, num_heads)
        if nonlinear_messages:
            self.value = NonlinearValue(f_irreps, irreps_sh, X)
        else:
            self.value = LinearValue(f_irreps, X)
        self.register_buffer("head_of_component", _head_layout(X, num_heads)[0])
        self.lin_out = Linear(X, X, biases=True)

    def edge_weights(self, edge_vectors: torch.Tensor, edge_embedding: torch.Tensor) -> torch.Tensor:
        """:math:`R(\\phi_{ij})`, the per-edge weights of the depth-wise tensor product:
        ``edge_embedding (E, K) -> (E, W)`` (``edge_vectors``: unused, for the interface that
        :class:`~nequip_deq.nn.attention.so2_attention.SO2GraphAttention` shares)."""
        return self.radial(edge_embedding)

    def forward(
        self,
        x: torch.Tensor,
        sh: torch.Tensor,
        radial_weights: torch.Tensor,
        edge_cutoff: torch.Tensor,
        edge_center: torch.Tensor,
        edge_neighbor: torch.Tensor,
    ) -> torch.Tensor:
        num_nodes = x.size(0)
        m = torch.index_select(self.lin_src(x), 0, edge_neighbor) + torch.index_select(
            self.lin_dst(x), 0, edge_center
        )
        f = self.dtp(m, sh, radial_weights)

        alpha = envelope_softmax(
            self.logits(x, f, edge_center), edge_cutoff, edge_center, num_nodes
        )

        # === weighted, enveloped values, summed per centre ===
        v = self.value(f, sh) * edge_cutoff
        v = v * torch.index_select(alpha, 1, self.head_of_component)
        out = scatter(v, edge_center, dim=0, dim_size=num_nodes)
        return self.lin_out(out)
