"""Separable S2 activation (EquiformerV2, Liao et al. 2024, §3.3) on sphere arrays.

A sphere array :math:`x` (``(N, (L+1)^2, C)``, :mod:`~nequip_deq.nn.attention.so2_convolution`) is, per
channel, a function on the sphere, :math:`F x(\\hat s) = \\sum_{l,m} x_{l,m} Y_{l,m}(\\hat s)`.
The activation applies SiLU pointwise on a grid of points and projects back to degrees
:math:`\\le L`; the scalars instead come from separate gating scalars :math:`g`:

.. math::
    y_0 = \\mathrm{SiLU}(g), \\qquad y_{l > 0} = \\big[F^{-1}\\, \\mathrm{SiLU}(F x)\\big]_{l > 0}.

:math:`F` and :math:`F^{-1}` are e3nn's ``ToS2Grid`` / ``FromS2Grid`` stored as dense
matrices. SiLU of a band-limited
function is not band-limited, so the projection aliases: the map is equivariant only up to an
error that falls exponentially with the grid ``resolution`` (SiLU is analytic; measured in
tests/test_equiformer_v2.py). It is applied to node features only (in the global frame, so the
energy stays a smooth function of the positions), never in edge frames, and is off by default.
"""

import importlib
from typing import Optional, Tuple

import torch
from e3nn.util.jit import compile_mode


def s2_grid(l_max: int, resolution: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(F, F^{-1})``: ``((L+1)^2, G)`` and ``(G, (L+1)^2)`` float64 matrices between
    spherical-harmonic coefficients and the values at the ``G = resolution[0] * resolution[1]``
    points of e3nn's grid. (e3nn's grid module is imported here, at construction, and not at the
    top: its import pulls ``e3nn.o3`` and sympy, which ``nequip-package`` cannot pack; a
    packaged model restores the matrices from its buffers and never calls this.)"""
    s2grid = importlib.import_module("e3nn.o3._s2grid")
    num_components = (l_max + 1) ** 2
    num_points = resolution[0] * resolution[1]
    to_grid = s2grid.ToS2Grid(l_max, resolution, dtype=torch.float64)
    from_grid = s2grid.FromS2Grid(resolution, l_max, dtype=torch.float64)
    eye = torch.eye(num_components, dtype=torch.float64)
    points = torch.eye(num_points, dtype=torch.float64).reshape(num_points, *resolution)
    return to_grid(eye).reshape(num_components, num_points), from_grid(points)


@compile_mode("script")
class SeparableS2Activation(torch.nn.Module):
    """``x (N, (L+1)^2, C)``, ``gates (N, C)`` ``-> (N, (L+1)^2, C)`` (module docstring).

    Args:
        l_max: :math:`L`
        resolution: grid points ``(beta, alpha)`` (default ``(8 (L + 1), 4 (2 L + 1))``, four
            times e3nn's minimum for an exact round trip in each direction; the aliasing error
            falls exponentially with it, see docs/equiformer_v2.md)
    """

    def __init__(self, l_max: int, resolution: Optional[Tuple[int, int]] = None):
        super().__init__()
        if resolution is None:
            resolution = (8 * (l_max + 1), 4 * (2 * l_max + 1))
        to_grid, from_grid = s2_grid(l_max, resolution)
        self.register_buffer("to_grid", to_grid.to(torch.get_default_dtype()))
        self.register_buffer("from_grid", from_grid.to(torch.get_default_dtype()))

    def forward(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        on_grid = torch.nn.functional.silu(torch.einsum("nsc,sg->ngc", x, self.to_grid.to(x.dtype)))
        back = torch.einsum("ngc,gs->nsc", on_grid, self.from_grid.to(x.dtype))
        scalars = torch.nn.functional.silu(gates).unsqueeze(1)
        return torch.cat([scalars, back.narrow(1, 1, back.size(1) - 1)], 1)
