"""SO(2) convolution (eSCN, Passaro & Zitnick 2023; EquiformerV2, Liao et al. 2024), on the
edge-frame features of :mod:`~nequip_deq.nn.attention.edge_frame`.

Features here are *sphere arrays*: ``C`` channels of every degree ``l = 0 .. L`` (irreps
``C x (0e + 1o + 2e + ...)``), laid out ``(E, S, C)`` with ``S = (L+1)^2`` components in e3nn's
order (``l^2 + l + m`` for order ``m``). Seen from the edge frame, only the orders
:math:`|m| \\le m_{max}` are kept: ``(E, P, C)`` with ``P = sum_l (2 min(l, m_max) + 1)``, the
same order within each degree.

In the edge frame a rotation about the edge turns each pair :math:`(x_{l,+m}, x_{l,-m})` by the
angle :math:`m\\theta`, the same for every degree. The linear maps that commute with this for
every :math:`\\theta` mix degrees freely but not orders (Schur): for each :math:`m` the vectors
:math:`x_m = (x_{l,m})_{l \\ge m,\\,c}` are mapped by

.. math::
    y_0 &= W_0\\, x_0 + b, \\\\
    \\begin{pmatrix} y_{+m} \\\\ y_{-m} \\end{pmatrix} &=
    \\begin{pmatrix} W^r_m & -W^i_m \\\\ W^i_m & W^r_m \\end{pmatrix}
    \\begin{pmatrix} x_{+m} \\\\ x_{-m} \\end{pmatrix} \\quad (m > 0),

which is the eSCN form of an SO(3) tensor product with the edge's spherical harmonics
(:math:`O(L^3)` instead of :math:`O(L^6)`). The :math:`W^i` part couples the pseudo-tensor
paths (:math:`l_1 + l_2 + l_3` odd): a mirror maps the edge frame to one rolled by a half turn,
which flips the sign of :math:`x_{l,-m}` for the natural-parity irreps ``0e, 1o, 2e, ...``, so
:math:`W^i` is dropped (``mirror_symmetric=True``) in an E(3)-equivariant model and kept in an
SE(3)-only one. Before the maps, ``radial`` weights (one per edge, ``m``, degree and input
channel, shared by :math:`\\pm m`) multiply the inputs; the m = 0 map can emit
``extra_scalars`` invariant outputs per edge besides (attention logits, gates).
"""

from typing import List, Optional, Tuple

import torch
from e3nn.util.jit import compile_mode

from .edge_frame import kept_orders


def _order_positions(l_max: int, m_max: int) -> List[List[int]]:
    """For ``m = 0, +1, -1, +2, -2, ...``: the positions in ``P`` of order ``m`` of the degrees
    ``l >= |m|``."""
    offsets = []
    off = 0
    for l in range(l_max + 1):
        offsets.append(off)
        off += len(kept_orders(l, m_max))
    groups = [[offsets[l] + min(l, m_max) for l in range(l_max + 1)]]
    for m in range(1, m_max + 1):
        for sign in (1, -1):
            groups.append([offsets[l] + min(l, m_max) + sign * m for l in range(m, l_max + 1)])
    return groups


@compile_mode("script")
class SO2Convolution(torch.nn.Module):
    """The per-order linear maps of the module docstring: ``x (E, P, c_in)`` (edge frame,
    ``radial (E, radial_numel)`` optional) ``-> (E, P, c_out), (E, extra_scalars)``.

    Args:
        l_max, m_max: degrees and orders of the edge-frame features
        c_in, c_out: channels per component
        extra_scalars: further invariant outputs of the m = 0 map
        mirror_symmetric: drop :math:`W^i` (E(3) with natural-parity irreps)
    """

    def __init__(
        self,
        l_max: int,
        m_max: int,
        c_in: int,
        c_out: int,
        extra_scalars: int = 0,
        mirror_symmetric: bool = True,
    ):
        super().__init__()
        self.c_in = c_in
        self.c_out = c_out
        self.extra_scalars = extra_scalars
        self.mirror_symmetric = mirror_symmetric
        groups = _order_positions(l_max, m_max)
        # degrees per order: n_0, n_1, n_1, n_2, n_2, ...
        self._sizes: List[int] = [len(g) for g in groups]
        order = [p for g in groups for p in g]
        self.register_buffer("order", torch.tensor(order, dtype=torch.long))
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        self.register_buffer("inverse", inverse)
        n0 = self._sizes[0]
        self.m0 = torch.nn.Linear(n0 * c_in, n0 * c_out + extra_scalars)
        self.maps = torch.nn.ModuleList()
        for m in range(1, m_max + 1):
            n = self._sizes[2 * m - 1]
            parts = 1 if mirror_symmetric else 2  # W^r (and W^i)
            lin = torch.nn.Linear(n * c_in, parts * n * c_out, bias=False)
            with torch.no_grad():
                lin.weight.mul_(2.0**-0.5)
            self.maps.append(lin)
        # radial weights: order 0 for n_0 degrees, then each m > 0 once for +-m
        self.radial_numel = c_in * (n0 + sum(self._sizes[1::2]))

    def forward(
        self, x: torch.Tensor, radial: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        num_edges = x.size(0)
        parts = torch.split(x.index_select(1, self.order), self._sizes, dim=1)
        x0 = parts[0].reshape(num_edges, -1)
        r_off = x0.size(1)
        if radial is not None:
            x0 = x0 * radial.narrow(1, 0, r_off)
        y0 = self.m0(x0)
        extra = y0.narrow(1, y0.size(1) - self.extra_scalars, self.extra_scalars)
        out: List[torch.Tensor] = [y0.narrow(1, 0, y0.size(1) - self.extra_scalars).reshape(num_edges, -1, self.c_out)]
        for k, lin in enumerate(self.maps):
            plus = parts[2 * k + 1].reshape(num_edges, -1)
            minus = parts[2 * k + 2].reshape(num_edges, -1)
            if radial is not None:
                w = radial.narrow(1, r_off, plus.size(1))
                plus, minus = plus * w, minus * w
            r_off += plus.size(1)
            both = lin(torch.stack([plus, minus], 0))  # (2, E, parts * n * c_out)
            n_out = plus.size(1) // self.c_in * self.c_out
            real = both.narrow(2, 0, n_out)
            y_plus, y_minus = real[0], real[1]
            if not self.mirror_symmetric:
                imag = both.narrow(2, n_out, n_out)
                y_plus, y_minus = y_plus - imag[1], y_minus + imag[0]
            out.append(y_plus.reshape(num_edges, -1, self.c_out))
            out.append(y_minus.reshape(num_edges, -1, self.c_out))
        return torch.cat(out, 1).index_select(1, self.inverse), extra


def to_sphere(x: torch.Tensor, l_max: int, channels: int) -> torch.Tensor:
    """e3nn features ``(N, C x (0 + 1 + ... + L))`` (``mul_ir`` layout) as a sphere array
    ``(N, (L+1)^2, C)``."""
    blocks: List[torch.Tensor] = []
    off = 0
    for l in range(l_max + 1):
        d = 2 * l + 1
        blocks.append(x.narrow(1, off, channels * d).reshape(-1, channels, d).transpose(1, 2))
        off += channels * d
    return torch.cat(blocks, 1)


def from_sphere(x: torch.Tensor, l_max: int) -> torch.Tensor:
    """The inverse of :func:`to_sphere`: ``(N, (L+1)^2, C) -> (N, C x (0 + ... + L))``."""
    blocks: List[torch.Tensor] = []
    for l in range(l_max + 1):
        blocks.append(x.narrow(1, l * l, 2 * l + 1).transpose(1, 2).reshape(x.size(0), -1))
    return torch.cat(blocks, 1)
