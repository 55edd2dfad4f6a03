"""Input injection of a deep-equilibrium layer: how the encoder output enters :math:`f`."""

import torch
from e3nn.o3._irreps import Irreps
from e3nn.o3._linear import Linear
from e3nn.util.jit import compile_mode

from ..attention.layer_norm import EquivariantLayerNorm

INJECTIONS = ("add", "concat")


@compile_mode("script")
class Injection(torch.nn.Module):
    """Combine the state :math:`z` with the injection :math:`x` (both ``(N, X)``, irreps ``X``).

    The injection is first normalised, :math:`\\hat x = \\mathrm{LN}(x)` (equivariant layer norm
    without affine weights, unit RMS per degree :math:`l`), so that every degree of the block
    input has a scale of one and the layer norms inside the blocks cannot amplify a
    nearly-vanishing :math:`l > 0` part of :math:`z`.

    - ``add``: :math:`u_i = (z_i + \\hat x_i)\\,\\|\\hat x_i\\| / \\|z_i + \\hat x_i\\|`
      (per atom; added, then rescaled to the injection's norm);
    - ``concat``: :math:`u = W_z z + W_x \\hat x`, an equivariant linear map of the
      concatenation :math:`[z, \\hat x]` (more expressive, not norm-controlled).
    """

    def __init__(self, irreps, mode: str = "add"):
        super().__init__()
        irreps = Irreps(irreps)
        self.is_add = mode == "add"
        self.norm = EquivariantLayerNorm(irreps, affine=False)
        self.lin_z = None if self.is_add else Linear(irreps, irreps)
        self.lin_x = None if self.is_add else Linear(irreps, irreps)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`\\hat x`: computed once per solve."""
        return self.norm(x)

    def forward(self, z: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        if self.lin_z is not None and self.lin_x is not None:
            return self.lin_z(z) + self.lin_x(x_hat)
        u = z + x_hat
        scale = torch.linalg.vector_norm(x_hat, dim=-1, keepdim=True) / (
            torch.linalg.vector_norm(u, dim=-1, keepdim=True) + 1e-6
        )
        return u * scale
