"""Initial node features: atom-type embedding plus the edge-degree embedding."""

import math
from typing import List, Optional

import torch
from e3nn.o3._irreps import Irreps
from e3nn.o3._linear import Linear
from e3nn.util.jit import compile_mode

from nequip.data import AtomicDataDict
from nequip.nn import GraphModuleMixin, ScalarMLPFunction, scatter


def _radial_sh_layout(irreps_node: Irreps, irreps_sh: Irreps):
    """Irreps of ``irreps_node`` that a spherical harmonic can seed, and for each of their
    components the index of its radial weight and of its spherical-harmonic component."""
    sh_offsets = {ir: off for (_, ir), off in zip(irreps_sh, irreps_sh.slices())}
    seeded = Irreps([(mul, ir) for mul, ir in irreps_node if ir in sh_offsets])
    weight_idx: List[int] = []
    sh_idx: List[int] = []
    w = 0
    for mul, ir in seeded:
        for _ in range(mul):
            weight_idx += [w] * ir.dim
            sh_idx += list(range(sh_offsets[ir].start, sh_offsets[ir].stop))
            w += 1
    return seeded, torch.tensor(weight_idx), torch.tensor(sh_idx), w


@compile_mode("script")
class EdgeDegreeEmbedding(GraphModuleMixin, torch.nn.Module):
    """Initial node features ``X`` from the atom-type embedding (``node_features``, scalars)
    and the edge-degree embedding:

    .. math::
        h_i = L_{type}(t_i) + \\frac{1}{\\sqrt{\\bar n}}
              L_{deg}\\Big(\\sum_j R(\\phi_{ij})_c\\, Y^{(l)}_{ij}\\Big)

    :math:`R(\\phi_{ij})` (bias-free MLP of the enveloped basis) gives one weight per channel
    of every irrep of ``X`` that a spherical harmonic can seed; :math:`\\bar n` is
    ``avg_num_neighbors`` (nequip's data statistic). This is Equiformer's
    :math:`\\mathrm{DTP}(c, Y; R(\\phi))` with the constant :math:`c` absorbed into :math:`R`.

    Args:
        irreps_node: irreps ``X`` of the output features
        avg_num_neighbors: normaliser :math:`\\bar n` (``None``: 1)
        radial_mlp_depth, radial_mlp_width: hidden layers of :math:`R`
    """

    def __init__(
        self,
        irreps_node,
        avg_num_neighbors: Optional[float] = None,
        radial_mlp_depth: int = 2,
        radial_mlp_width: int = 64,
        irreps_in=None,
    ):
        super().__init__()
        X = Irreps(irreps_node)
        self._init_irreps(
            irreps_in=irreps_in,
            required_irreps_in=[
                AtomicDataDict.NODE_FEATURES_KEY,
                AtomicDataDict.EDGE_ATTRS_KEY,
                AtomicDataDict.EDGE_EMBEDDING_KEY,
            ],
            irreps_out={AtomicDataDict.NODE_FEATURES_KEY: X},
        )
        type_irreps = self.irreps_in[AtomicDataDict.NODE_FEATURES_KEY]
        sh_irreps = Irreps(self.irreps_in[AtomicDataDict.EDGE_ATTRS_KEY])
        seeded, weight_idx, sh_idx, num_weights = _radial_sh_layout(X, sh_irreps)
        self.register_buffer("weight_idx", weight_idx)
        self.register_buffer("sh_idx", sh_idx)
        self.radial = ScalarMLPFunction(
            input_dim=self.irreps_in[AtomicDataDict.EDGE_EMBEDDING_KEY].num_irreps,
            output_dim=num_weights,
            hidden_layers_depth=radial_mlp_depth,
            hidden_layers_width=radial_mlp_width,
            nonlinearity="silu",
            bias=False,
        )
        self.lin_type = Linear(type_irreps, X, biases=True)
        self.lin_degree = Linear(seeded, X)
        self.norm = 1.0 / math.sqrt(avg_num_neighbors if avg_num_neighbors else 1.0)

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        edge_center = data[AtomicDataDict.EDGE_INDEX_KEY][0]
        weights = self.radial(data[AtomicDataDict.EDGE_EMBEDDING_KEY])
        sh = data[AtomicDataDict.EDGE_ATTRS_KEY]
        messages = torch.index_select(weights, 1, self.weight_idx) * torch.index_select(
            sh, 1, self.sh_idx
        )
        node_type = data[AtomicDataDict.NODE_FEATURES_KEY]
        degree = scatter(messages, edge_center, dim=0, dim_size=node_type.size(0))
        data[AtomicDataDict.NODE_FEATURES_KEY] = self.lin_type(
            node_type
        ) + self.norm * self.lin_degree(degree)
        return data
