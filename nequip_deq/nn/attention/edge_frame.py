"""Edge frames for eSCN / SO(2) convolutions (EquiformerV2, Liao et al. 2024; eSCN, Passaro &
Zitnick 2023): the Wigner-D matrices that turn each edge's direction into e3nn's polar axis.

e3nn's spherical harmonics single out the :math:`y` axis (:math:`Y_l(\\hat y)` is non-zero in
the middle, :math:`m = 0`, component only). For an edge with unit vector :math:`\\hat r` this
module builds a rotation :math:`R` with :math:`R\\hat y = \\hat r` and the matrices
:math:`D^l(R)` with :math:`Y_l(R\\,\\hat s) = D^l(R)\\, Y_l(\\hat s)` for all :math:`\\hat s`. A
feature :math:`x_l` seen from the edge frame is :math:`D^l(R)^\\top x_l`; there a rotation about
the edge is a rotation about :math:`y`, which turns each pair of components
:math:`(l, \\pm m)` by the angle :math:`m\\theta`.

**No singular directions.** Every smooth choice of :math:`R` over the whole sphere has a
singular direction (hairy-ball theorem), and Euler angles have two (:math:`\\pm\\hat y`), where
autograd gives NaN forces. The SO(2) convolutions built on this frame do not depend on the roll
of :math:`R` about :math:`\\hat r`, so each edge may use whichever of two frames is regular
there:

.. math::
    R = \\begin{cases} Q(\\hat y, \\hat r) & \\hat y\\cdot\\hat r \\ge 0 \\\\
                       Q(-\\hat y, \\hat r)\\, F & \\text{otherwise} \\end{cases},\\qquad
    Q(\\hat a, \\hat b) = I + [k]_\\times + \\frac{[k]_\\times^2}{1 + \\hat a\\cdot\\hat b},
    \\; k = \\hat a \\times \\hat b,

the smallest rotation taking :math:`\\hat a` to :math:`\\hat b` (Rodrigues; regular unless
:math:`\\hat b = -\\hat a`) and :math:`F` the half turn about :math:`x`. The frame jumps at the
equator :math:`\\hat y\\cdot\\hat r = 0`; the convolution's output does not.

**Wigner-D without angles.** :math:`D^l(R)` is obtained from the spherical harmonics of
rotated sample points: with :math:`K` fixed points :math:`\\hat s_k` and
:math:`A_l = [Y_l(\\hat s_1) \\cdots Y_l(\\hat s_K)]` of full rank :math:`2l + 1`,
:math:`D^l(R) = [Y_l(R\\hat s_1) \\cdots Y_l(R\\hat s_K)]\\, A_l^{+}` (a polynomial in
:math:`R`, exact up to rounding). Only the columns :math:`|m| \\le m_{max}` are kept: they take
the edge-frame components an SO(2) convolution uses back to the global frame.
"""

import math
from typing import List

import torch
from e3nn.o3._irreps import Irreps
from e3nn.o3._spherical_harmonics import SphericalHarmonics, spherical_harmonics
from e3nn.util.jit import compile_mode


def _smallest_rotation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """:math:`Q(a, b)` ``(E, 3, 3)`` for unit vectors ``a``, ``b`` ``(E, 3)`` with
    :math:`a\\cdot b \\ge 0` (regular there)."""
    k = torch.linalg.cross(a, b)
    zero = torch.zeros_like(k[:, 0])
    kx = torch.stack(
        [
            torch.stack([zero, -k[:, 2], k[:, 1]], -1),
            torch.stack([k[:, 2], zero, -k[:, 0]], -1),
            torch.stack([-k[:, 1], k[:, 0], zero], -1),
        ],
        -2,
    )
    c = (a * b).sum(-1)
    eye = torch.eye(3, dtype=a.dtype, device=a.device).expand_as(kx)
    return eye + kx + kx @ kx / (1.0 + c).reshape(-1, 1, 1)


def edge_rotation(r_hat: torch.Tensor) -> torch.Tensor:
    """Rotations ``(E, 3, 3)`` with :math:`R\\hat y = \\hat r` for unit vectors ``(E, 3)``, regular
    (and with finite gradients) for every direction (module docstring)."""
    y = torch.zeros_like(r_hat)
    y[:, 1] = 1.0
    upper = r_hat[:, 1:2] >= 0
    # each branch sees a harmless direction where it is not used, so that neither its value
    # nor its gradient can be non-finite there
    north = _smallest_rotation(y, torch.where(upper, r_hat, y))
    south = _smallest_rotation(-y, torch.where(upper, -y, r_hat))
    flip = torch.tensor(
        [[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]], dtype=r_hat.dtype, device=r_hat.device
    )
    return torch.where(upper.unsqueeze(-1), north, south @ flip)


def _sample_points(l_max: int) -> torch.Tensor:
    """``(K, 3)`` unit vectors, ``K = 2 l_max + 2``, on a Fibonacci spiral: generic enough
    that every :math:`A_l`, ``l <= l_max``, has full rank and a small condition number."""
    k = 2 * l_max + 2
    i = torch.arange(k, dtype=torch.float64) + 0.5
    polar = torch.acos(1.0 - 2.0 * i / k)
    azimuth = math.pi * (1.0 + math.sqrt(5.0)) * i
    return torch.stack(
        [torch.sin(polar) * torch.cos(azimuth), torch.sin(polar) * torch.sin(azimuth), torch.cos(polar)],
        -1,
    )


def kept_orders(l: int, m_max: int) -> List[int]:
    """Component indices (``0 .. 2l``, index ``l + m``) of the orders :math:`|m| \\le m_{max}`
    of degree ``l``, in e3nn's order."""
    m = min(l, m_max)
    return list(range(l - m, l + m + 1))


@compile_mode("script")
class EdgeWignerD(torch.nn.Module):
    """Edge vectors ``(E, 3)`` -> ``(E, sum_l (2l+1)(2 min(l, m_max)+1))``: per edge and degree
    ``l <= l_max`` the columns :math:`|m| \\le m_{max}` of :math:`D^l(R)` (module docstring),
    each ``(2l+1, 2 min(l, m_max)+1)`` row-major, concatenated over ``l``, in the model dtype.
    Geometry only: a DEQ computes it once per call and every iteration reuses it."""

    def __init__(self, l_max: int, m_max: int):
        super().__init__()
        self.l_max = l_max
        points = _sample_points(l_max)
        self.sh = SphericalHarmonics(
            Irreps.spherical_harmonics(l_max), normalize=False, normalization="component"
        )
        self.register_buffer("points", points.to(torch.get_default_dtype()))
        # per l: the kept columns of A_l^+ ((K, 2 min(l, m_max) + 1)), concatenated over l
        pinvs = []
        for l in range(l_max + 1):
            a = spherical_harmonics(l, points, normalize=False, normalization="component").T
            pinvs.append(torch.linalg.pinv(a)[:, kept_orders(l, m_max)])
        self.register_buffer("pinv", torch.cat(pinvs, 1).to(torch.get_default_dtype()))
        self._kept: List[int] = [len(kept_orders(l, m_max)) for l in range(l_max + 1)]
        self._output_dtype = torch.get_default_dtype()  # the model dtype (as nequip's modules)
        self.numel = sum((2 * l + 1) * kept for l, kept in enumerate(self._kept))

    def forward(self, edge_vectors: torch.Tensor) -> torch.Tensor:
        length = torch.linalg.vector_norm(edge_vectors, dim=-1, keepdim=True)
        rotation = edge_rotation(edge_vectors / length.clamp_min(1e-12))
        rotated = torch.einsum("eij,kj->eki", rotation, self.points.to(edge_vectors.dtype))
        sh = self.sh(rotated)  # (E, K, (l_max + 1)^2)
        pinv = self.pinv.to(edge_vectors.dtype)
        out: List[torch.Tensor] = []
        col = 0
        for l in range(self.l_max + 1):
            d = 2 * l + 1
            kept = self._kept[l]
            y = sh.narrow(2, l * l, d)  # (E, K, 2l+1)
            out.append(torch.einsum("ekd,km->edm", y, pinv.narrow(1, col, kept)).reshape(-1, d * kept))
            col += kept
        return torch.cat(out, 1).to(self._output_dtype)


@compile_mode("script")
class EdgeFrameRotation(torch.nn.Module):
    """Sphere arrays (:mod:`~nequip_deq.nn.attention.so2_convolution`) into and out of the edge frames of
    ``edge_wigner``: :meth:`into` ``(E, (L+1)^2, C) -> (E, P, C)``,
    :math:`x'_l = D^l(R)^\\top_{|m| \\le m_{max}}\\, x_l`; :meth:`out_of` ``(E, P, C) ->
    (E, (L+1)^2, C)``, :math:`x_l = s_l\\, D^l(R)_{|m| \\le m_{max}}\\, x'_l` with
    :math:`s_l = \\sqrt{(2l+1)/(2m_{max}+1)}` for ``l > m_max`` (else 1), which keeps the norm
    of a degree whose orders were truncated (EquiformerV2)."""

    def __init__(self, l_max: int, m_max: int):
        super().__init__()
        self.l_max = l_max
        self._kept: List[int] = [len(kept_orders(l, m_max)) for l in range(l_max + 1)]
        self._scales: List[float] = [
            math.sqrt((2 * l + 1) / (2 * m_max + 1)) if l > m_max else 1.0 for l in range(l_max + 1)
        ]

    def _blocks(self, wigner: torch.Tensor) -> List[torch.Tensor]:
        blocks: List[torch.Tensor] = []
        col = 0
        for l in range(self.l_max + 1):
            d = 2 * l + 1
            kept = self._kept[l]
            blocks.append(wigner.narrow(1, col, d * kept).reshape(-1, d, kept))
            col += d * kept
        return blocks

    def into(self, x: torch.Tensor, wigner: torch.Tensor) -> torch.Tensor:
        out: List[torch.Tensor] = []
        for l, d_l in enumerate(self._blocks(wigner)):
            out.append(torch.bmm(d_l.transpose(1, 2), x.narrow(1, l * l, 2 * l + 1)))
        return torch.cat(out, 1)

    def out_of(self, x: torch.Tensor, wigner: torch.Tensor) -> torch.Tensor:
        out: List[torch.Tensor] = []
        row = 0
        for l, d_l in enumerate(self._blocks(wigner)):
            kept = self._kept[l]
            out.append(self._scales[l] * torch.bmm(d_l, x.narrow(1, row, kept)))
            row += kept
        return torch.cat(out, 1)
