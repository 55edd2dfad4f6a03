"""Equivariant layer normalisation (Equiformer, Liao & Smidt 2023, eq. in §3.2)."""

from typing import List

import torch
from e3nn.o3._irreps import Irreps
from e3nn.util.jit import compile_mode


@compile_mode("script")
class EquivariantLayerNorm(torch.nn.Module):
    """Layer norm applied separately to each block ``mul x l`` of a ``mul_ir`` feature:

    .. math::
        \\sigma_l^2 = \\frac{1}{C_l}\\sum_c \\frac{1}{2l+1}\\sum_m x_{c,m}^2,\\qquad
        y_{c,m} = \\frac{x_{c,m}}{\\sqrt{\\sigma_l^2 + \\epsilon}}\\,\\gamma_c
        \\;(+\\,\\beta_c \\text{ for } 0e)

    with scalars (``l = 0``) centred over their channels first, so that for scalars it is
    ordinary ``LayerNorm``. Rotations act within ``m`` and leave :math:`\\sigma_l` unchanged,
    so the map is equivariant (for either parity).

    Shapes: ``(N, irreps.dim) -> (N, irreps.dim)``.
    """

    def __init__(self, irreps, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.irreps = Irreps(irreps)
        self.eps = eps
        self.affine = affine
        self._muls: List[int] = [mul for mul, _ in self.irreps]
        self._dims: List[int] = [ir.dim for _, ir in self.irreps]
        self._is_scalar: List[bool] = [ir.l == 0 for _, ir in self.irreps]
        self._has_bias: List[bool] = [ir.l == 0 and ir.p == 1 for _, ir in self.irreps]
        num_weights = sum(self._muls)
        num_bias = sum(mul for (mul, _), b in zip(self.irreps, self._has_bias) if b)
        if affine:
            self.weight = torch.nn.Parameter(torch.ones(num_weights))
            self.bias = torch.nn.Parameter(torch.zeros(num_bias))
        else:
            self.register_buffer("weight", torch.ones(num_weights))
            self.register_buffer("bias", torch.zeros(num_bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: List[torch.Tensor] = []
        ix = 0
        iw = 0
        ib = 0
        for i in range(len(self._muls)):
            mul = self._muls[i]
            d = self._dims[i]
            block = x.narrow(1, ix, mul * d).reshape(-1, mul, d)
            if self._is_scalar[i]:
                block = block - block.mean(dim=-2, keepdim=True)
            var = block.square().mean(dim=-1, keepdim=True).mean(dim=-2, keepdim=True)
            block = block * torch.rsqrt(var + self.eps)
            block = block * self.weight.narrow(0, iw, mul).unsqueeze(-1)
            if self._has_bias[i]:
                block = block + self.bias.narrow(0, ib, mul).unsqueeze(-1)
                ib += mul
            out.append(block.reshape(-1, mul * d))
            ix += mul * d
            iw += mul
        return torch.cat(out, dim=-1)

    def extra_repr(self) -> str:
        return f"{self.irreps}, eps={self.eps}"
