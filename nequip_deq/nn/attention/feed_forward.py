"""Feed-forward networks of Equiformer blocks: gated (Equiformer) and with the separable S2
activation (EquiformerV2)."""

import torch
from e3nn.o3._irreps import Irreps
from e3nn.o3._linear import Linear
from e3nn.util.jit import compile_mode

from .s2_activation import SeparableS2Activation
from .so2_convolution import from_sphere, to_sphere
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


@compile_mode("script")
class S2FeedForward(torch.nn.Module):
    """EquiformerV2's feed-forward network on features ``C x (0 + 1 + ... + L)``:
    :math:`\\mathrm{FFN}(x) = L_2(\\mathrm{S2act}(L_1 x,\\ L_g x))` with ``multiplier * C``
    hidden channels of every degree and as many gating scalars
    (:class:`~nequip_deq.nn.attention.s2_activation.SeparableS2Activation`; equivariant only up to its
    grid's aliasing error).

    Shapes: ``(N, irreps_in.dim) -> (N, irreps_out.dim)``.
    """

    def __init__(self, irreps_in, irreps_out, multiplier: int = 3):
        super().__init__()
        irreps_in = Irreps(irreps_in)
        self.l_max = irreps_in.lmax
        self.hidden = multiplier * irreps_in[0].mul
        hidden = Irreps([(self.hidden, ir) for _, ir in irreps_in])
        self.hidden_dim = hidden.dim
        self.lin1 = Linear(irreps_in, hidden + Irreps(f"{self.hidden}x0e"), biases=True)
        self.act = SeparableS2Activation(self.l_max)
        self.lin2 = Linear(hidden, Irreps(irreps_out), biases=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin1(x)
        features = to_sphere(h.narrow(1, 0, self.hidden_dim), self.l_max, self.hidden)
        gates = h.narrow(1, self.hidden_dim, self.hidden)
        return self.lin2(from_sphere(self.act(features, gates), self.l_max))
