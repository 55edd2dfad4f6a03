"""Equivariant building blocks on e3nn: depth-wise tensor products and gated linear maps."""

from typing import Optional, Tuple

import torch
from e3nn.o3._irreps import Irrep, Irreps
from e3nn.o3._linear import Linear
from e3nn.o3._tensor_product._tensor_product import TensorProduct
from e3nn.nn._gate import Gate
from e3nn.util.jit import compile_mode


def depthwise_instructions(
    irreps_in: Irreps, irreps_sh: Irreps, irreps_target: Irreps
) -> Tuple[Irreps, list]:
    """Paths of a depth-wise ("uvu") tensor product :math:`x \\otimes Y`.

    Every input block ``(mul, l1)`` is coupled to every spherical harmonic ``l2`` and every
    ``l3`` in ``l1 x l2`` that appears in ``irreps_target`` (or is ``0e``) gets its own output
    block ``(mul, l3)``, one weight per channel. The output is sorted but not merged.

    Returns:
        (irreps_out, instructions) for :class:`e3nn.o3.TensorProduct`.
    """
    targets = {ir for _, ir in irreps_target} | {Irrep("0e")}
    irreps_out = []
    instructions = []
    for i, (mul, ir_in) in enumerate(irreps_in):
        for j, (_, ir_sh) in enumerate(irreps_sh):
            for ir_out in ir_in * ir_sh:
                if ir_out in targets:
                    instructions.append((i, j, len(irreps_out), "uvu", True))
                    irreps_out.append((mul, ir_out))
    irreps_out, perm, _ = Irreps(irreps_out).sort()
    instructions = [(i, j, perm[k], mode, w) for i, j, k, mode, w in instructions]
    return irreps_out, instructions


@compile_mode("script")
class DepthwiseTensorProduct(torch.nn.Module):
    """Depth-wise tensor product of node-pair features with edge spherical harmonics.

    .. math::
        y^{(l_3)}_{c} = \\sum_{l_1 l_2} w_{c}^{(l_1 l_2 l_3)}\\, (x^{(l_1)}_c \\otimes Y^{(l_2)})^{(l_3)}

    The weights :math:`w` are either per-edge (``internal_weights=False``, given by a radial
    MLP, shape ``(E, weight_numel)``) or learned constants.

    Shapes: ``x (E, irreps_in.dim)``, ``sh (E, irreps_sh.dim)`` -> ``(E, irreps_out.dim)``;
    ``irreps_out`` is sorted and simplified (same memory layout as the unmerged blocks).
    """

    def __init__(self, irreps_in, irreps_sh, irreps_target, internal_weights: bool):
        super().__init__()
        irreps_in, irreps_sh = Irreps(irreps_in), Irreps(irreps_sh)
        irreps_mid, instructions = depthwise_instructions(
            irreps_in, irreps_sh, Irreps(irreps_target)
        )
        self.tp = TensorProduct(
            irreps_in,
            irreps_sh,
            irreps_mid,
            instructions,
            shared_weights=internal_weights,
            internal_weights=internal_weights,
        )
        self.irreps_out = irreps_mid.simplify()
        self.weight_numel = self.tp.weight_numel if not internal_weights else 0
        self.internal_weights = internal_weights

    def forward(
        self, x: torch.Tensor, sh: torch.Tensor, weight: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if self.internal_weights:
            return self.tp(x, sh)
        assert weight is not None
        return self.tp(x, sh, weight)


def gate_irreps(irreps: Irreps) -> Tuple[Irreps, Irreps, Irreps]:
    """Split ``irreps`` into (scalars, gates, gated) for :class:`e3nn.nn.Gate`: every
    non-scalar channel gets one ``0e`` gate."""
    irreps = Irreps(irreps).simplify()
    scalars = Irreps([(m, ir) for m, ir in irreps if ir.l == 0])
    gated = Irreps([(m, ir) for m, ir in irreps if ir.l > 0])
    gates = Irreps([(gated.num_irreps, "0e")]) if gated.num_irreps > 0 else Irreps("")
    return scalars, gates, gated


@compile_mode("script")
class GatedLinear(torch.nn.Module):
    """``Gate(Linear(x))``: an equivariant linear map to scalars + gates + gated irreps
    followed by the gate non-linearity (SiLU on even scalars, tanh on odd scalars, sigmoid on
    gates), output ``irreps_out``.

    Shapes: ``(B, irreps_in.dim) -> (B, irreps_out.dim)``.
    """

    def __init__(self, irreps_in, irreps_out):
        super().__init__()
        scalars, gates, gated = gate_irreps(irreps_out)
        acts = {1: torch.nn.functional.silu, -1: torch.tanh}
        self.gate = Gate(
            scalars,
            [acts[ir.p] for _, ir in scalars],
            gates,
            [torch.sigmoid] * len(gates),
            gated,
        )
        self.linear = Linear(Irreps(irreps_in), self.gate.irreps_in, biases=True)
        self.irreps_out = self.gate.irreps_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.linear(x))
