"""Equivariant layer normalisation (Equiformer, Liao & Smidt 2023, eq. in §3.2)."""

from typing import List

import torch
from e3nn.o3._irreps import Irreps
from e3nn.util.jit import compile_mode


def _block_variances(blocks: List[torch.Tensor]) -> List[torch.Tensor]:
    """:math:`\\sigma_l^2` ``(N, 1, 1)`` of every block ``(N, mul, 2l+1)``."""
    return [b.square().mean(dim=-1, keepdim=True).mean(dim=-2, keepdim=True) for b in blocks]


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
        blocks = self._centred_blocks(x)
        return self._normalise(blocks, self._variances(blocks))

    def _centred_blocks(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The blocks ``(N, mul, 2l+1)`` of ``x``, scalars centred over their channels."""
        blocks: List[torch.Tensor] = []
        ix = 0
        for i in range(len(self._muls)):
            mul = self._muls[i]
            d = self._dims[i]
            block = x.narrow(1, ix, mul * d).reshape(-1, mul, d)
            if self._is_scalar[i]:
                block = block - block.mean(dim=-2, keepdim=True)
            blocks.append(block)
            ix += mul * d
        return blocks

    def _variances(self, blocks: List[torch.Tensor]) -> List[torch.Tensor]:
        return _block_variances(blocks)

    def _normalise(self, blocks: List[torch.Tensor], variances: List[torch.Tensor]) -> torch.Tensor:
        out: List[torch.Tensor] = []
        iw = 0
        ib = 0
        for i in range(len(self._muls)):
            mul = self._muls[i]
            block = blocks[i] * torch.rsqrt(variances[i] + self.eps)
            block = block * self.weight.narrow(0, iw, mul).unsqueeze(-1)
            if self._has_bias[i]:
                block = block + self.bias.narrow(0, ib, mul).unsqueeze(-1)
                ib += mul
            out.append(block.reshape(-1, mul * self._dims[i]))
            iw += mul
        return torch.cat(out, dim=-1)

    def extra_repr(self) -> str:
        return f"{self.irreps}, eps={self.eps}"


@compile_mode("script")
class SeparableLayerNorm(EquivariantLayerNorm):
    """EquiformerV2's separable layer norm: ordinary ``LayerNorm`` on the scalars, and one
    variance for all degrees :math:`l > 0` together,

    .. math::
        \\sigma^2 = \\frac{1}{L}\\sum_{l \\ge 1} \\frac{1}{C_l}\\sum_c \\frac{1}{2l+1}\\sum_m
        x_{l,c,m}^2,\\qquad y_{l,c,m} = \\frac{x_{l,c,m}}{\\sqrt{\\sigma^2 + \\epsilon}}\\,\\gamma_{l,c}

    (:math:`L`: the number of ``l > 0`` blocks), which keeps the relative size of the degrees
    that :class:`EquivariantLayerNorm` would equalise. Equivariant for either parity.

    Shapes: ``(N, irreps.dim) -> (N, irreps.dim)``.
    """

    def __init__(self, irreps, eps: float = 1e-5):
        super().__init__(irreps, eps=eps)
        self._num_tensor_blocks = max(1, sum(1 for s in self._is_scalar if not s))

    def _variances(self, blocks: List[torch.Tensor]) -> List[torch.Tensor]:
        per_block = _block_variances(blocks)
        tensors = torch.zeros_like(per_block[0])
        for i in range(len(per_block)):
            if not self._is_scalar[i]:
                tensors = tensors + per_block[i]
        tensors = tensors / self._num_tensor_blocks
        return [per_block[i] if self._is_scalar[i] else tensors for i in range(len(per_block))]
