"""Radial bases for edge lengths, multiplied by a smooth cutoff envelope.

Every basis here writes

.. math::
    \\phi_k(r) = b_k(r)\\, u(r / r_{max}),

to ``edge_embedding`` (``Kx0e``) and the envelope :math:`u` to ``edge_cutoff`` (``0e``).
:math:`u` is nequip's :class:`~nequip.nn.embedding.PolynomialCutoff`: it and its first
``p`` derivatives vanish at :math:`r_{max}`, so every quantity built from :math:`\\phi` by a
bias-free map is continuous, with continuous forces, when an atom crosses the cutoff.
nequip's :class:`~nequip.nn.embedding.BesselEdgeLengthEncoding` follows the same contract
and is the third option of the model builders.
"""

import math

import torch
from e3nn.o3._irreps import Irreps
from e3nn.util.jit import compile_mode

from nequip.data import AtomicDataDict
from nequip.nn import GraphModuleMixin
from nequip.nn.embedding import PolynomialCutoff
from nequip.utils.compile import conditional_torchscript_jit


class _EnvelopedBasis(GraphModuleMixin, torch.nn.Module):
    """Shared plumbing: read normalised lengths ``x = r / r_max`` (``(E, 1)``), write
    ``basis(x) * u(x)`` (``(E, K)``) and ``u(x)`` (``(E, 1)``) in the model dtype."""

    def __init__(self, num_basis: int, polynomial_cutoff_p: float, irreps_in=None):
        super().__init__()
        if num_basis < 1:
            raise ValueError(f"`num_basis` must be >= 1, got {num_basis}")
        self.num_basis = num_basis
        self.cutoff = conditional_torchscript_jit(PolynomialCutoff(polynomial_cutoff_p))
        self._init_irreps(
            irreps_in=irreps_in,
            required_irreps_in=[AtomicDataDict.NORM_LENGTH_KEY],
            irreps_out={
                AtomicDataDict.EDGE_EMBEDDING_KEY: Irreps([(num_basis, (0, 1))]),
                AtomicDataDict.EDGE_CUTOFF_KEY: Irreps("0e"),
            },
        )
        self._output_dtype = torch.get_default_dtype()

    def basis(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        x = data[AtomicDataDict.NORM_LENGTH_KEY]
        cutoff = self.cutoff(x).to(self._output_dtype)
        data[AtomicDataDict.EDGE_CUTOFF_KEY] = cutoff
        data[AtomicDataDict.EDGE_EMBEDDING_KEY] = (
            self.basis(x).to(self._output_dtype) * cutoff
        )
        return data

    def extra_repr(self) -> str:
        return f"num_basis={self.num_basis}"


@compile_mode("script")
class GaussianEdgeLengthEncoding(_EnvelopedBasis):
    """Gaussian radial basis (the Equiformer seed design), in units of ``x = r / r_max``:

    .. math::
        b_k(x) = \\exp\\left(-\\frac{(x - \\mu_k)^2}{2\\sigma^2}\\right),\\quad
        \\mu_k = \\frac{k}{K-1},\\ \\sigma = \\frac{1}{K-1}

    Args:
        num_basis (int): number of Gaussians :math:`K`
        trainable (bool): learn the centres and the width
        polynomial_cutoff_p (float): exponent of the envelope
    """

    def __init__(
        self,
        num_basis: int = 32,
        trainable: bool = False,
        polynomial_cutoff_p: float = 6.0,
        irreps_in=None,
    ):
        super().__init__(num_basis, polynomial_cutoff_p, irreps_in=irreps_in)
        centers = torch.linspace(0.0, 1.0, num_basis).unsqueeze(0)
        width = torch.tensor(1.0 / max(num_basis - 1, 1))
        if trainable:
            self.centers = torch.nn.Parameter(centers)
            self.width = torch.nn.Parameter(width)
        else:
            self.register_buffer("centers", centers)
            self.register_buffer("width", width)

    def basis(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(-0.5 * ((x - self.centers) / self.width).square())


@compile_mode("script")
class ExpNormalEdgeLengthEncoding(_EnvelopedBasis):
    """Exponential-normal radial basis (PhysNet/TorchMD-Net; the published Equiformer MD17
    model), with :math:`r` in Å:

    .. math::
        b_k(r) = \\exp\\left(-\\beta\\,(e^{-\\alpha r} - \\mu_k)^2\\right),\\quad
        \\alpha = 5 / r_{max},\\ \\mu_k \\in \\mathrm{linspace}(e^{-5}, 1, K),\\
        \\beta = \\left(\\tfrac{2 (1 - e^{-5})}{K}\\right)^{-2}

    (written with :math:`\\alpha r = 5x`). The published cosine cutoff is replaced by the
    shared polynomial envelope.

    Args:
        num_basis (int): number of functions :math:`K`
        polynomial_cutoff_p (float): exponent of the envelope
    """

    def __init__(
        self,
        num_basis: int = 32,
        polynomial_cutoff_p: float = 6.0,
        irreps_in=None,
    ):
        super().__init__(num_basis, polynomial_cutoff_p, irreps_in=irreps_in)
        start = math.exp(-5.0)
        self.register_buffer(
            "means", torch.linspace(start, 1.0, num_basis).unsqueeze(0)
        )
        self.beta = float((2.0 * (1.0 - start) / num_basis) ** -2)

    def basis(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(-self.beta * (torch.exp(-5.0 * x) - self.means).square())
