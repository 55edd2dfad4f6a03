"""Variational deep-equilibrium layer: the latent state minimises a potential, so forces need
no adjoint solve.

With the encoder output :math:`x` and the Equiformer blocks :math:`B` on the injected state
(:class:`~nequip_deq.nn.fixed_point.injection.Injection`, as in
:class:`~nequip_deq.nn.fixed_point.layer.DEQEquiformerLayer`), the per-atom energies of a latent
state :math:`z` are

.. math::
    E_i(z, x) = s_i\\,\\big(\\tfrac{\\kappa}{2}\\langle z_i, z_i\\rangle
        + \\hat R_i(B(\\mathrm{inject}(z, x)))\\big) + b_i ,

:math:`\\hat R` the energy readout (output block and MLP), :math:`s_i, b_i` the per-type
scale and shift of atom :math:`i` and :math:`\\kappa` the stiffness of the latent state
(``stiffness``): the readout's curvature in :math:`z` must stay below it for :math:`\\Phi` to
be convex (at initialisation the readout's Hessian has eigenvalues of a few units). The
model's latent state is the minimiser of :math:`\\Phi(z, x) = \\sum_i E_i`, the fixed point of
the preconditioned gradient step

.. math::
    f(z) = z - (\\kappa S)^{-1}\\nabla_z\\Phi(z, x)
         = -(\\kappa S)^{-1}\\nabla_z \\sum_j s_j \\hat R_j ,

and the energy is :math:`E(x) = \\Phi(z^*(x), x)`. Because :math:`\\nabla_z\\Phi = 0` at
:math:`z^*`, :math:`dE/dx = \\partial\\Phi/\\partial x` with :math:`z^*` held constant: forces
and stress come from ordinary autograd of :math:`\\Phi(z^*, x)`, exact up to the solver
tolerance, with **no adjoint solve** (the energy error is second order in the residual).

The Jacobian of :math:`f` is :math:`I - (\\kappa S)^{-1} H`, :math:`H = \\nabla_z^2\\Phi`
symmetric, so its eigenvalues are real (:math:`S^{-1}H` is similar to
:math:`S^{-1/2} H S^{-1/2}`); the iteration converges when
:math:`0 < \\beta\\,\\mathrm{eig}((\\kappa S)^{-1}H) < 2` (damping :math:`\\beta`), and
:math:`z^*` is a strict minimum when :math:`H` is positive definite. The norm
:math:`\\langle z_i, z_i\\rangle` of e3nn irreps (orthonormal real spherical-harmonic
components) is rotation invariant, so :math:`\\Phi` is invariant and :math:`f` equivariant.

One application of :math:`f` is a forward and a backward pass of the block and readout (about
three forward passes), against one forward pass for the Lagrangian layer's :math:`f`; in
exchange there is no adjoint solve, and the residual :math:`\\nabla_z\\Phi` at any state comes
with the same passes that give the energy and forces there (what shadow dynamics needs): in
evaluation one backward pass gives :math:`\\partial\\Phi/\\partial z`, the gradient in the
positions and in the (strained) cell together, and the energy handed to nequip's force and
stress output is :math:`\\Phi` plus a first-order term of value zero that carries those
gradients (:func:`_first_order`), so a call costs one forward and one backward pass. The
parameter gradient of a force loss needs one symmetric positive-definite solve per step
(:func:`~nequip_deq.nn.fixed_point.training_gradients.attach_minimiser_gradient`).

Compiled (``nequip-compile --mode aotinductor --target ase_deq``), the model does not iterate:
the map :math:`f` is itself a gradient, which ``torch.while_loop`` cannot trace. A compiled
call evaluates :math:`\\Phi` at the state it is given, with its forces, and returns one step
:math:`f(z)` and the residual; :class:`~nequip_deq.integrations.ase.DEQCalculator` solves by
calling it again from the damped step (``DEQCalculator._minimise_by_calls``) or,
with shadow dynamics, takes the one call as the step. TorchScript cannot script the layer.
"""

from typing import List, Optional, Tuple

import torch

from nequip.data import AtomicDataDict
from nequip.nn import PerTypeScaleShift, scatter

from ... import _keys
from .layer import DEQEquiformerLayer, _call_mode, _TotalEnergyGradientOnly
from .solvers import frame_products, frame_residual, solver_start
from .training_gradients import attach_minimiser_gradient

__all__ = ["VariationalDEQLayer"]


class VariationalDEQLayer(DEQEquiformerLayer):
    """:class:`~nequip_deq.nn.fixed_point.layer.DEQEquiformerLayer` whose fixed point minimises the
    energy (module docstring): same arguments, inputs and outputs, except that there is no
    adjoint (``deq_adjoint_state`` is zero, ``deq_adjoint_iterations`` 0), ``gradient`` must be
    ``implicit`` and ``train_gradient`` ``implicit`` (the Hessian solve, tolerance
    ``grad_tol``, cap ``grad_max_iter``). ``readout`` must contain a ``PerTypeScaleShift``:
    the quadratic term is added before it. ``stiffness``: :math:`\\kappa` of the module
    docstring."""

    variational = True

    def __init__(self, *args, stiffness: float = 10.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.stiffness = float(stiffness)
        kinds = [isinstance(m, PerTypeScaleShift) for m in self.readout]
        if not any(kinds):
            raise ValueError("VariationalDEQLayer: the readout needs a PerTypeScaleShift.")
        self.scale_index = kinds.index(True)

    def potential(
        self,
        z: torch.Tensor,
        data: AtomicDataDict.Type,
        x_hat: torch.Tensor,
        weights: List[torch.Tensor],
    ) -> torch.Tensor:
        """Per-atom energies :math:`E_i(z, x)` ``(N, 1)`` of the state ``z`` ``(N, X)``."""
        d = data.copy()
        d[AtomicDataDict.NODE_FEATURES_KEY] = DEQEquiformerLayer.f(self, z, data, x_hat, weights)
        for module in self.readout[: self.scale_index]:
            d = module(d)
        d[AtomicDataDict.PER_ATOM_ENERGY_KEY] = (
            d[AtomicDataDict.PER_ATOM_ENERGY_KEY]
            + 0.5 * self.stiffness * z.square().sum(-1, keepdim=True)
        )
        for module in self.readout[self.scale_index:]:
            d = module(d)
        return d[AtomicDataDict.PER_ATOM_ENERGY_KEY]

    def atom_scales(self, data: AtomicDataDict.Type, like: torch.Tensor) -> torch.Tensor:
        """The per-type energy scale :math:`s_i` of every atom, ``(N, 1)``."""
        scale_shift = self.readout[self.scale_index]
        types = data[AtomicDataDict.ATOM_TYPE_KEY]
        one, zero = (
            scale_shift({AtomicDataDict.ATOM_TYPE_KEY: types, AtomicDataDict.PER_ATOM_ENERGY_KEY: e})
            for e in (like.new_ones(like.shape[0], 1), like.new_zeros(like.shape[0], 1))
        )
        return one[AtomicDataDict.PER_ATOM_ENERGY_KEY] - zero[AtomicDataDict.PER_ATOM_ENERGY_KEY]

    def descent(
        self,
        z: torch.Tensor,
        data: AtomicDataDict.Type,
        x_hat: torch.Tensor,
        weights: List[torch.Tensor],
        metric: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-atom :math:`\\Phi` ``(N, 1)`` and the preconditioned descent direction
        :math:`-(\\kappa S)^{-1}\\nabla_z\\Phi = f(z) - z` ``(N, X)`` from one forward and
        one backward pass, geometry and parameters held constant (``metric``:
        :math:`\\kappa s_i`, ``(N, 1)``, :meth:`metric`)."""
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True)
            per_atom = self.potential(zz, data, x_hat.detach(), [w.detach() for w in weights])
            gradient = torch.autograd.grad([per_atom.sum()], [zz])[0]
        return per_atom.detach(), -gradient.detach() / metric

    def metric(self, data: AtomicDataDict.Type, z: torch.Tensor) -> torch.Tensor:
        """:math:`\\kappa s_i` ``(N, 1)`` in the dtype of ``z`` (energies may be float64)."""
        return self.stiffness * self.atom_scales(data, z).detach().to(z.dtype)

    def _iterate(
        self,
        data: AtomicDataDict.Type,
        x_hat: torch.Tensor,
        weights: List[torch.Tensor],
        z: torch.Tensor,
        batch: torch.Tensor,
        num_frames: int,
        tol: float,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Minimise :math:`\\Phi` from ``z``, per frame, by preconditioned gradient steps
        :math:`z \\leftarrow z + \\beta\\,(f(z) - z)`: the damped fixed-point iteration
        (:math:`\\beta` = ``damping``), as the other solvers do, until the residual exceeds
        twice its lowest value (a Hessian eigenvalue beyond :math:`2\\kappa s/\\beta`): that
        frame undoes the step and goes on with Barzilai-Borwein step sizes
        :math:`\\beta = \\langle s, s\\rangle_M / \\langle s, \\Delta\\nabla\\Phi\\rangle`
        (:math:`s` the last step, :math:`M = \\kappa S`), which adapt to the spread of the
        eigenvalues; there a step that raises both :math:`\\Phi` above its largest value of
        the last five accepted steps and the residual is undone and halved. Stops at the same
        per-frame residual as the other solvers; every evaluation counts as an iteration."""
        metric = self.metric(data, z)
        dot, per_atom = frame_products(batch, num_frames)

        def evaluate(state: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
            energies, direction = self.descent(state, data, x_hat, weights, metric)
            return dot(energies, torch.ones_like(energies)), direction

        iters, res, active = solver_start(num_frames, z)
        if not bool(torch.isfinite(torch.as_tensor(tol)).any()):
            # no iteration asked for (a shadow step): the residual comes with the energy
            return z, iters, res
        plain = torch.ones_like(active)  # still the damped fixed-point iteration
        step = torch.full((num_frames,), self.damping, dtype=z.dtype, device=z.device)
        value, direction = evaluate(z)
        recent = value.unsqueeze(-1).repeat(1, 5)
        r = frame_residual(z + direction, z, batch, num_frames)
        best = r
        for _ in range(self.f_max_iter):
            active = active & ~(r <= tol)
            if not bool(active.any()):
                break
            move = per_atom(step * active) * direction
            trial = z + move
            value_t, direction_t = evaluate(trial)
            r_t = frame_residual(trial + direction_t, trial, batch, num_frames)
            decrease = 1e-4 * step * dot(direction * metric, direction)
            improved = (value_t <= recent.max(-1).values - decrease) | (r_t < r)
            blow_up = ~(r_t <= 2 * best)
            accept = active & torch.where(plain, ~blow_up, improved)
            switch = active & plain & blow_up
            curvature = dot(move * metric, direction - direction_t)
            bb = dot(move * metric, move) / curvature.clamp_min(1e-300)
            bb = torch.where(curvature > 0, bb, torch.full_like(bb, self.damping))
            iters = iters + active.long()
            keep = per_atom(accept)
            z = torch.where(keep, trial, z)
            direction = torch.where(keep, direction_t, direction)
            recent = torch.where(accept.unsqueeze(-1), torch.cat([recent[:, 1:], value_t.unsqueeze(-1)], -1), recent)
            r = torch.where(accept, r_t, r)
            best = torch.minimum(best, r)
            adaptive = torch.where(accept, bb.clamp(1e-3, 1e3), torch.where(active, 0.5 * step, step))
            plain = plain & ~switch
            step = torch.where(plain, step, adaptive)
        return z, iters, r

    def f(
        self,
        z: torch.Tensor,
        data: AtomicDataDict.Type,
        x_hat: torch.Tensor,
        weights: List[torch.Tensor],
    ) -> torch.Tensor:
        """:math:`f(z) = z - (\\kappa S)^{-1}\\nabla_z\\Phi` ``(N, X) -> (N, X)``, geometry
        and parameters held constant (a solver step, e.g. of torchdeq's training solvers; the
        model's gradients come from :meth:`potential` at the solution)."""
        return z + self.descent(z, data, x_hat, weights, self.metric(data, z))[1]

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        if torch.jit.is_scripting():
            raise RuntimeError(
                "A variational DEQ (`fixed_point: variational`) cannot run as TorchScript: "
                "compile it with `nequip-compile --mode aotinductor --target ase_deq`."
            )
        if AtomicDataDict.NUM_LOCAL_GHOST_NODES_KEY in data:
            raise RuntimeError(
                "A variational DEQ cannot run under LAMMPS ML-IAP yet (its potential would "
                "count ghost atoms' latent states); use the Lagrangian DEQ there."
            )
        if _call_mode() == "traced" and (
            _keys.DEQ_STATE_KEY not in data or self.state_cache.capacity > 0
        ):
            raise RuntimeError(
                "A compiled variational DEQ evaluates its potential at the state it is given and "
                "leaves the solve to nequip_deq's DEQCalculator: compile it with `--target "
                "ase_deq` and without `--modifiers enable_DEQStateCache` (LAMMPS: "
                "nequip-deq-lammps-run, which uses DEQCalculator)."
            )
        return super().forward(data)

    def _iterate_traced(
        self,
        data: AtomicDataDict.Type,
        x_hat: torch.Tensor,
        weights: List[torch.Tensor],
        z0: torch.Tensor,
        batch: torch.Tensor,
        num_frames: int,
        tol: float,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Compiled: no iteration (module docstring); the residual of ``z0`` is computed with
        the energy (:meth:`_energy_at_solution`)."""
        iters, res, _ = solver_start(num_frames, z0)
        return z0, iters, res

    def _energy_at_solution(
        self,
        data: AtomicDataDict.Type,
        x_hat: torch.Tensor,
        weights: List[torch.Tensor],
        z_star: torch.Tensor,
        f_res: torch.Tensor,
        v0: torch.Tensor,
        batch: torch.Tensor,
        num_frames: int,
        b_stop: float,
        b_tol: float,
        floor: float,
        mode: str,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:math:`\\Phi` per atom at the solver's last state :math:`z`, held constant (exact
        forces of :math:`\\Phi(z, x)`; with a converged solve, of :math:`E`); in training the
        minimiser carries its parameter dependence (Hessian solve). The state returned is one
        more step, :math:`f(z)`, from the same forward pass and one backward pass to
        :math:`z`: the solution itself within the tolerance, and what shadow dynamics needs
        when :math:`z` is a given, unsolved state (an infinite ``deq_tolerance``: then the solver
        did not evaluate anything and the residual of :math:`z` is computed here)."""
        no_adjoint = torch.zeros(num_frames, dtype=torch.long, device=z_star.device)
        no_adjoint_state = torch.zeros_like(z_star)
        if self.training:
            tol, statistics = self._backward_solve_settings(data, num_frames, floor)
            z = attach_minimiser_gradient(
                self, data, x_hat, z_star.detach(), batch, num_frames, tol, self.grad_max_iter,
                statistics,
            )
            per_atom = _TotalEnergyGradientOnly.apply(self.potential(z, data, x_hat, weights), batch)
            return per_atom, z_star, f_res, no_adjoint_state, no_adjoint, no_adjoint.to(z_star.dtype)
        z = z_star.detach().requires_grad_(True)
        per_atom = self.potential(z, data, x_hat, weights)
        geometry = _geometry(data)
        # one backward pass for the residual and the forces and stress (module docstring)
        gradients = torch.autograd.grad([per_atom.sum()], [z] + geometry, allow_unused=True)
        step = z_star.detach() - gradients[0].detach() / self.metric(data, z_star)
        f_res = torch.where(torch.isfinite(f_res), f_res, frame_residual(step, z_star.detach(), batch, num_frames))
        per_atom = per_atom.detach() + _first_order(per_atom, geometry, gradients[1:], batch, num_frames)
        if mode == "eager":
            per_atom = _TotalEnergyGradientOnly.apply(per_atom, batch)
        return per_atom, step, f_res, no_adjoint_state, no_adjoint, no_adjoint.to(z_star.dtype)


def _geometry(data: AtomicDataDict.Type) -> List[torch.Tensor]:
    """The positions ``(N, 3)`` and cell ``(F, 3, 3)`` of ``data`` that require a gradient
    (nequip's force and stress outputs set them up, strained for the stress)."""
    keys = (AtomicDataDict.POSITIONS_KEY, AtomicDataDict.CELL_KEY)
    return [data[k] for k in keys if k in data and data[k].requires_grad]


def _first_order(
    like: torch.Tensor,
    geometry: List[torch.Tensor],
    gradients: Tuple[Optional[torch.Tensor], ...],
    batch: torch.Tensor,
    num_frames: int,
) -> torch.Tensor:
    """Per-atom terms ``(N, 1)``, in the dtype of ``like``, of value zero whose total has the gradient ``gradients`` with
    respect to ``geometry`` (positions ``(N, 3)``, cell ``(F, 3, 3)``):
    :math:`\\sum_i g_i \\cdot (x_i - \\bar x_i)` with :math:`\\bar x` the same values
    detached, the cell's term shared equally by the atoms of its frame. Added to the detached
    energies, it hands nequip's force and stress backward the gradients already computed, so
    that pass costs almost nothing (evaluation only: no second derivatives)."""
    num_atoms = batch.shape[0]
    terms = torch.zeros_like(like)
    for x, g in zip(geometry, gradients):
        if g is None:
            continue
        change = (g.detach() * (x - x.detach())).reshape(x.shape[0], -1).sum(-1)
        if x.dim() == 3:  # the cell, per frame: shared by its atoms
            if num_frames == 1:  # (compiled models: a scatter here trips AOTInductor's codegen)
                change = change.expand(num_atoms) / num_atoms
            else:
                counts = scatter(torch.ones_like(terms[:, 0]), batch, dim=0, dim_size=num_frames)
                change = (change / counts.clamp_min(1.0))[batch]
        terms = terms + change.unsqueeze(-1).to(terms.dtype)
    return terms
