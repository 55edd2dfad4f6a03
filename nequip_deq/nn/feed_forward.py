"""Equivariant feed-forward network of an Equiformer block."""

import torch
from e3nn.o3._irreps import Irreps
from e3nn.o3._linear import Linear
from e3nn.util.jit import compile_mode

from .tensor_product import GatedLinear


@compile_mode("script")
class EquivariantFeedForward(torch.nn.Module):
    """:math:`\\mathrm{FFN}(x) = L_2(\\mathrm{Gate}(L_1 x))`, with a hidden width of
    ``multiplier`` times every multiplicity of ``irreps_in`` (3 in the paper).

    Shapes: ``(N, irreps_in.dim) -> (N, irreps_out.dim)``; ``irreps_out`` may differ from
    ``irreps_in`` (the last block maps to scalars only; only hidden irreps that also appear in
    ``irreps_out`` contribute).
    """

    def __init__(self, irreps_in, irreps_out, multiplier: int = 3):
        super().__init__()
        irreps_in = Irreps(irreps_in)
        hidden = Irreps([(multiplier * mul, ir) for mul, ir in irreps_in])
        self.gated = GatedLinear(irreps_in, hidden)
        self.lin = Linear(self.gated.irreps_out, Irreps(irreps_out), biases=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.gated(x))
