"""Deep-equilibrium layer: weight-tied Equiformer blocks solved to their fixed point, with the
energy gradient taken exactly through the fixed point.

With the encoder output :math:`x`, the DEQ function is
:math:`f(z, x) = B(\\mathrm{inject}(z, x))` for ``num_deq_layers`` Equiformer blocks :math:`B`
(see :class:`~nequip_deq.nn.fixed_point.injection.Injection`), and the energy is read out from the fixed
point :math:`z^* = f(z^*, x)`: :math:`E = R(z^*)`. Its exact derivative with respect to
positions, cell and parameters follows from the Lagrangian

.. math::
    \\mathcal{L}(z, v) = R(z) + \\langle v, f(z, x) - z \\rangle ,

which is stationary in :math:`z` and :math:`v` at :math:`(z^*, v^*)`, where :math:`v^*` solves the
adjoint fixed point :math:`v = \\partial R/\\partial z + (\\partial f/\\partial z)^\\top v`, and
equals :math:`E` there. With :math:`z^*, v^*` held constant, ordinary autograd of
:math:`\\mathcal{L}` gives :math:`dE/dx` (implicit function theorem): nequip's
``ForceStressOutput`` then produces forces and stress exact up to the solver tolerances, and the
energy error is second order in the residuals.

The solvers are in :mod:`~nequip_deq.nn.fixed_point.solvers` (per frame; Python loop, ``torch.while_loop``
when traced for AOTInductor, torchdeq in training), the training-only gradients (implicit,
unrolled, Jacobian penalty) in :mod:`~nequip_deq.nn.fixed_point.training_gradients`. Everything in
:math:`f` that depends on the geometry only (the blocks' radial weights) is computed once per
call and reused by every iteration, adjoint product and the Lagrangian.
"""

import warnings
from typing import Dict, List, Tuple

import torch
from e3nn.o3._irreps import Irreps
from e3nn.util.jit import compile_mode

from nequip.data import AtomicDataDict
from nequip.nn import GraphModuleMixin

from ... import _keys
from ..attention.block import EquiformerBlock
from .deployment import DEQDeployment
from .injection import Injection
from .solvers import FixedPointError, FixedPointSolvers, check_solution, tolerance_floor
from .state_cache import (
    DEQStateCache,
    cache_inputs,
)
from .training_gradients import attach_implicit_gradient, jacobian_penalty, unroll

SOLVERS = ("fixed_point_iter", "anderson", "broyden")
GRADIENTS = ("implicit", "phantom")
TRAIN_GRADIENTS = ("implicit", "unroll")

__all__ = ["DEQEquiformerLayer", "FixedPointError", "PartialForcesNotExact"]


class PartialForcesNotExact(RuntimeError):
    """Per-atom energy gradients were requested from a DEQ model."""


@torch.jit.unused
def _call_mode() -> str:
    """``traced`` while nequip's compile traces the model (``make_fx`` / ``torch.export``),
    else ``eager``."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    tracing = torch.compiler.is_compiling() or get_proxy_mode() is not None
    return "traced" if tracing else "eager"


@torch.jit.unused
def _warn_compiled_cold() -> None:
    """Said while nequip-compile traces a DEQ for a target that passes no state (nequip's
    ``ase`` or ``pair_nequip``) into a model without the state cache."""
    warnings.warn(
        "This DEQ model is being compiled for a target that passes it no previous fixed point "
        "and it has no state cache: every call of the compiled model will start its solves "
        "cold (several times the iterations of a warm-started MD step). For ASE compile with "
        "`--target ase_deq` (run it with nequip_deq's DEQCalculator or nequip-deq-md); for "
        "LAMMPS with `--target pair_nequip_deq --modifiers enable_DEQStateCache`."
    )


@torch.jit.unused
def _call_tolerances(given: torch.Tensor, floor: float) -> Tuple[float, float]:
    """Forward and adjoint tolerances per frame, ``(num_frames,)`` each, from the
    ``deq_tolerance`` input ``(num_frames, 2)``, floored for the dtype. (Tensors, although
    annotated as floats for TorchScript, which never reads this input.)"""
    given = given.reshape(-1, 2).clamp_min(floor)
    return given[:, 0], given[:, 1]


def _stop_messages() -> Tuple[str, str]:
    """The errors of :func:`_stop_unless_solved` (non-finite, not converged); a function
    because TorchScript cannot read module-level strings."""
    not_finite = (
        "nequip-deq: the DEQ solve gave non-finite values (it diverged, or the positions are not "
        "finite), so the model stops instead of returning them. Check the structure (overlapping "
        "atoms?) and the time step."
    )
    not_converged = (
        "nequip-deq: a DEQ solve ended above its tolerance at its iteration cap, so the model "
        "stops instead of returning inexact forces. Recompile with a larger cap or a looser "
        "tolerance (`nequip-package modify <in>.nequip.zip <out>.nequip.zip --modifier "
        "set_DEQSolverTolerances f_max_iter=... b_max_iter=...`, then nequip-compile <out>), "
        "or check the structure."
    )
    return not_finite, not_converged


def _solved(
    z: torch.Tensor,
    v: torch.Tensor,
    per_atom: torch.Tensor,
    f_res: torch.Tensor,
    b_res: torch.Tensor,
    f_tol: float,
    b_tol: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """0-dim bools: are the states and energies finite, and did both solves end within
    tolerance? (Tolerances may be per-frame tensors, annotated as floats for TorchScript.)"""
    finite = torch.isfinite(z).all() & torch.isfinite(v).all() & torch.isfinite(per_atom).all()
    converged = (f_res <= f_tol).all() & (b_res <= b_tol).all()
    return finite, converged


def _stop_unless_solved(finite: torch.Tensor, converged: torch.Tensor) -> None:
    """For compiled and scripted models called without a state (LAMMPS ``pair_style nequip``,
    nequip's plain ``ase`` target), whose callers check nothing: raise instead of returning
    non-finite values or the forces of a solve that ended above its tolerance at the
    iteration cap (60 by default, several times what a solve needs: hitting it means
    something is wrong). LAMMPS stops with the message. ``finite``, ``converged``: from
    :func:`_solved`."""
    not_finite, not_converged = _stop_messages()
    if torch.jit.is_scripting():  # TorchScript's interpreter ignores _assert_async
        if not bool(finite):
            raise RuntimeError(not_finite)
        if not bool(converged):
            raise RuntimeError(not_converged)
    else:  # data-dependent checks that AOTInductor keeps (it may evaluate them in either
        # order: a non-finite solve can also be reported as unconverged)
        torch._assert_async(finite, not_finite)
        torch._assert_async(converged, not_converged)


class _TotalEnergyGradientOnly(torch.autograd.Function):
    """Identity on per-atom energies ``(N, 1)`` whose backward refuses gradients that are not
    the same for all atoms of a frame: only the gradient of the *total* energy is exact."""

    @staticmethod
    def forward(ctx, per_atom: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(batch)
        return per_atom.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (batch,) = ctx.saved_tensors
        message = (
            "A DEQ model gives exact gradients of the total energy only (one adjoint solve per "
            "frame); per-atom energy gradients (partial forces, `PartialForceOutput`, losses on "
            "per-atom energies) would need one adjoint per atom and are refused rather than "
            "returned inexact. Use forces/stress of the total energy."
        )
        if torch._C._functorch.is_batchedtensor(grad):
            raise PartialForcesNotExact(message)
        num_frames = int(batch.max()) + 1 if batch.numel() > 0 else 0
        flat = grad.reshape(grad.shape[0], -1)[:, 0]
        hi = torch.full((num_frames,), -float("inf"), dtype=flat.dtype, device=flat.device)
        lo = torch.full((num_frames,), float("inf"), dtype=flat.dtype, device=flat.device)
        hi = hi.scatter_reduce(0, batch, flat, "amax")
        lo = lo.scatter_reduce(0, batch, flat, "amin")
        if bool(((hi - lo).abs() > 1e-6 * hi.abs().clamp(min=1.0)).any()):
            raise PartialForcesNotExact(message)
        return grad, None


@compile_mode("script")
class DEQEquiformerLayer(FixedPointSolvers, DEQDeployment, GraphModuleMixin, torch.nn.Module):
    """Fixed point of weight-tied Equiformer blocks followed by the energy readout.

    Reads ``node_features`` (the encoder output :math:`x`, irreps ``X``) and optionally the
    starting points ``deq_state`` / ``deq_adjoint_state`` (``(N, X)``; used when their shape
    matches, else zeros = cold start) and per-call tolerances ``deq_tolerance``
    (``(num_frames, 2)``: forward, adjoint; eager and AOTInductor models, not TorchScript). Writes ``per_atom_energy`` (the Lagrangian of the module
    docstring, per atom), ``deq_state`` (:math:`z^*`), ``deq_adjoint_state`` (:math:`v^*`) and per
    frame ``deq_iterations``, ``deq_residual``, ``deq_adjoint_iterations``,
    ``deq_adjoint_residual``.

    A single-frame caller that passes no state (LAMMPS ``pair_style nequip``) gets warm starts
    from the in-model :class:`~nequip_deq.nn.fixed_point.state_cache.DEQStateCache` once the model modifier
    ``enable_DEQStateCache`` is applied (off by default; evaluation only).

    Gradients:

    - ``gradient: implicit`` (default): exact forces and stress (up to the solver tolerances).
      In training, the parameter gradient of a force loss needs how :math:`(z^*, v^*)` moves
      with the parameters: ``train_gradient: implicit`` (default) solves one more fixed point
      in the backward pass (exact to ``grad_tol``; no graph recorded per iteration),
      ``train_gradient: unroll`` differentiates ``train_unroll_steps`` refinement iterations
      (error ~ contraction factor^steps); see :mod:`~nequip_deq.nn.fixed_point.training_gradients`.
    - ``gradient: phantom``: energy :math:`R(f^K(z^*))` with :math:`z^*` constant,
      ``K = max(train_unroll_steps, 1)``: the gradient ignores how :math:`z^*` moves, so
      forces are **not** −dE/dx and MD does **not** conserve energy. For comparison only.

    Args:
        num_deq_layers: Equiformer blocks inside :math:`f`
        block_kwargs: arguments of :class:`EquiformerBlock` for the blocks of :math:`f`
        readout: graph modules mapping ``node_features`` to ``per_atom_energy``
        injection: ``add`` or ``concat`` (:class:`~nequip_deq.nn.fixed_point.injection.Injection`)
        damping: relaxation :math:`\\beta` of :math:`z \\leftarrow z + \\beta (f(z) - z)` (and
            of the adjoint and backward iterations)
        solver: training-time forward solver (``fixed_point_iter``, or torchdeq's
            ``anderson`` / ``broyden``); evaluation always uses the damped iteration
        f_tol, f_max_iter: relative tolerance and iteration cap of the forward solve
        b_tol, b_max_iter: the same for the adjoint solve
        gradient: ``implicit`` or ``phantom``
        train_gradient: ``implicit`` or ``unroll``
        train_unroll_steps: refinement steps of ``unroll`` (and K of ``phantom``)
        grad_tol, grad_max_iter: tolerance and cap of the implicit gradient's backward solve
        jacobian_penalty: in a training call whose ``deq_jacobian_penalty_step`` input is true,
            also compute a Hutchinson estimate of
            :math:`\\|\\partial f/\\partial z\\|_F^2 / \\dim z` at :math:`z^*` and return it,
            with its graph, as ``deq_jacobian_penalty`` (for a Jacobian-regularisation loss)
        force_pass: whether the model differentiates the energy for forces inside its
            forward (nequip's force output: the builder's ``do_derivatives``); in training,
            the implicit gradient passes nothing to that first backward pass
            (:mod:`~nequip_deq.nn.fixed_point.training_gradients`)
    """

    variational = False  # whether the fixed point minimises the energy (nn.variational)

    def __init__(
        self,
        num_deq_layers: int,
        block_kwargs: Dict,
        readout: List[GraphModuleMixin],
        injection: str = "add",
        damping: float = 1.0,
        solver: str = "fixed_point_iter",
        f_tol: float = 1e-5,
        f_max_iter: int = 60,
        b_tol: float = 1e-5,
        b_max_iter: int = 60,
        gradient: str = "implicit",
        train_gradient: str = "implicit",
        train_unroll_steps: int = 3,
        grad_tol: float = 1e-6,
        grad_max_iter: int = 60,
        jacobian_penalty: bool = False,
        force_pass: bool = True,
        irreps_in=None,
    ):
        super().__init__()
        irreps = Irreps(irreps_in[AtomicDataDict.NODE_FEATURES_KEY])
        self._init_irreps(
            irreps_in=irreps_in,
            required_irreps_in=[AtomicDataDict.NODE_FEATURES_KEY],
            irreps_out={
                AtomicDataDict.PER_ATOM_ENERGY_KEY: Irreps("0e"),
                _keys.DEQ_STATE_KEY: irreps,
                _keys.DEQ_ADJOINT_STATE_KEY: irreps,
                _keys.SOLVER_ITERATIONS_KEY: None,
                _keys.SOLVER_RESIDUAL_KEY: None,
                _keys.ADJOINT_ITERATIONS_KEY: None,
                _keys.ADJOINT_RESIDUAL_KEY: None,
            },
        )
        self.injection = Injection(irreps, injection)
        blocks = []
        prev = self.irreps_in
        for _ in range(num_deq_layers):
            block = EquiformerBlock(irreps_in=prev, **block_kwargs)
            blocks.append(block)
            prev = block.irreps_out
        self.blocks = torch.nn.ModuleList(blocks)
        self.readout = torch.nn.ModuleList(readout)
        self.damping = float(damping)
        self.solver = solver
        self.f_tol = float(f_tol)
        self.f_max_iter = int(f_max_iter)
        self.b_tol = float(b_tol)
        self.b_max_iter = int(b_max_iter)
        self.implicit = gradient == "implicit"
        self.train_implicit = train_gradient == "implicit"
        self.train_unroll_steps = int(train_unroll_steps)
        self.grad_tol = float(grad_tol)
        self.grad_max_iter = int(grad_max_iter)
        self.jacobian_penalty = bool(jacobian_penalty)
        self.force_pass = bool(force_pass)
        self.state_cache = DEQStateCache(0, irreps.dim, torch.get_default_dtype())

    # ---- the DEQ function and the readout ------------------------------------------------

    def edge_weights(self, data: AtomicDataDict.Type) -> List[torch.Tensor]:
        """The geometry-only part of :math:`f`: each block's radial weights ``(E, W)``,
        computed once per call and reused by every application of :math:`f`."""
        return [block.edge_weights(data) for block in self.blocks]

    def f(
        self,
        z: torch.Tensor,
        data: AtomicDataDict.Type,
        x_hat: torch.Tensor,
        weights: List[torch.Tensor],
    ) -> torch.Tensor:
        """:math:`f(z, x)`: ``(N, X) -> (N, X)``."""
        d = data.copy()
        d[AtomicDataDict.NODE_FEATURES_KEY] = self.injection(z, x_hat)
        for i, block in enumerate(self.blocks):
            d = block.update(d, weights[i])
        return d[AtomicDataDict.NODE_FEATURES_KEY]

    def energy(self, z: torch.Tensor, data: AtomicDataDict.Type) -> torch.Tensor:
        """Per-atom energies ``(N, 1)`` read out from the state ``z``."""
        d = data.copy()
        d[AtomicDataDict.NODE_FEATURES_KEY] = z
        for module in self.readout:
            d = module(d)
        return d[AtomicDataDict.PER_ATOM_ENERGY_KEY]

    # ---- forward -----------------------------------------------------------------------

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        mode = "script"
        if not torch.jit.is_scripting():
            mode = _call_mode()
            if mode == "traced" and self.training:
                raise RuntimeError(
                    "DEQEquiformerModel cannot be trained with `compile_mode: compile`: the "
                    "traced model would drop the exact training gradient. Train with "
                    "`compile_mode: eager` (the default); compile the trained model for "
                    "deployment with nequip-compile."
                )
        eager = mode == "eager"
        x = data[AtomicDataDict.NODE_FEATURES_KEY]
        num_frames = AtomicDataDict.num_frames(data)
        if AtomicDataDict.BATCH_KEY in data:
            batch = data[AtomicDataDict.BATCH_KEY]
        else:
            batch = torch.zeros(x.size(0), dtype=torch.long, device=x.device)
        x_hat = self.injection.normalize(x)
        weights = self.edge_weights(data)
        floor = tolerance_floor(x.dtype)
        f_tol = max(self.f_tol, floor)
        b_tol = max(self.b_tol, floor)
        if not torch.jit.is_scripting():
            if _keys.DEQ_TOLERANCE_KEY in data:  # per call (ase_deq models, DEQCalculator)
                f_tol, b_tol = _call_tolerances(data[_keys.DEQ_TOLERANCE_KEY], floor)
        z0 = self._start(data, _keys.DEQ_STATE_KEY, x)
        v0 = self._start(data, _keys.DEQ_ADJOINT_STATE_KEY, x)
        use_cache = (
            self.state_cache.capacity > 0
            and not self.training
            and AtomicDataDict.BATCH_KEY not in data
            and _keys.DEQ_STATE_KEY not in data
            and AtomicDataDict.POSITIONS_KEY in data  # not under LAMMPS ML-IAP
        )
        if mode == "traced" and not use_cache and _keys.DEQ_STATE_KEY not in data:
            _warn_compiled_cold()
        cache_hit = torch.zeros((), dtype=torch.bool, device=x.device)
        if use_cache:
            pos, types, cell = cache_inputs(data)
            z0, v0, cache_hit = self.state_cache.lookup(pos, types, cell, z0)

        # the tolerances the solves stop at. Under LAMMPS ML-IAP every iteration exchanges
        # ghost features with the other MPI ranks, so all ranks must iterate equally often: no
        # solve stops early there, each runs to its cap (residuals are still checked)
        f_stop, b_stop = f_tol, b_tol
        if AtomicDataDict.NUM_LOCAL_GHOST_NODES_KEY in data:
            f_stop, b_stop = -1.0, -1.0

        # forward fixed point z* (no gradient)
        if mode == "traced":
            z_star, f_it, f_res = self._iterate_traced(
                data, x_hat, weights, z0, batch, num_frames, f_stop
            )
        elif eager and self.training and self.solver != "fixed_point_iter":
            z_star, f_it, f_res = self._solve_torchdeq(
                data, x_hat, weights, z0, batch, num_frames, f_stop
            )
        else:
            z_star, f_it, f_res = self._iterate(data, x_hat, weights, z0, batch, num_frames, f_stop)
        if eager:
            check_solution("forward solve", z_star, f_it, f_res, f_tol)

        per_atom, z_out, f_res, v_star, b_it, b_res = self._energy_at_solution(
            data, x_hat, weights, z_star, f_res, v0, batch, num_frames, b_stop, b_tol, floor, mode
        )

        if eager and self.training and self.jacobian_penalty:
            self._jacobian_penalty_output(data, x_hat, weights, z_star)
        unchecked = not eager and _keys.DEQ_STATE_KEY not in data  # no caller checks the solves
        if use_cache or unchecked:
            finite, converged = _solved(z_star, v_star, per_atom, f_res, b_res, f_tol, b_tol)
            if use_cache:
                pos, types, cell = cache_inputs(data)
                self.state_cache.store(
                    pos, types, (z0, v0), (z_star, v_star), cache_hit, finite & converged
                )
            if unchecked:
                _stop_unless_solved(finite, converged)
        data[AtomicDataDict.PER_ATOM_ENERGY_KEY] = per_atom
        data[_keys.DEQ_STATE_KEY] = z_out.detach()
        data[_keys.DEQ_ADJOINT_STATE_KEY] = v_star.detach()
        data[_keys.SOLVER_ITERATIONS_KEY] = f_it
        data[_keys.SOLVER_RESIDUAL_KEY] = f_res
        data[_keys.ADJOINT_ITERATIONS_KEY] = b_it
        data[_keys.ADJOINT_RESIDUAL_KEY] = b_res
        return data

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
        """Per-atom energies ``(N, 1)`` at the fixed point ``z_star``, with the graph whose
        gradient is the exact force (the Lagrangian of the module docstring, after the
        adjoint solve from ``v0``), the state and forward residuals to return (``z_star``,
        ``f_res``), and the adjoint's solution, iterations and residuals."""
        eager = mode == "eager"
        v_star = torch.zeros_like(z_star)
        b_it = torch.zeros(num_frames, dtype=torch.long, device=z_star.device)
        b_res = torch.zeros(num_frames, dtype=z_star.dtype, device=z_star.device)
        if self.implicit:
            # adjoint v* = dR/dz + (df/dz)^T v* at z*, and the recorded f(z*) it used
            if mode == "traced":
                v_star, b_it, b_res = self._adjoint_traced(
                    data, x_hat, weights, z_star, v0, batch, num_frames, b_stop
                )
                fz = self.f(z_star.detach(), data, x_hat, weights)
            elif eager:
                v_star, b_it, b_res, fz = self._adjoint_eager(
                    data, x_hat, weights, z_star, v0, batch, num_frames, b_stop
                )
                check_solution("adjoint solve", v_star, b_it, b_res, b_tol)
            else:
                v_star, b_it, b_res, fz = self._adjoint(
                    data, x_hat, weights, z_star, v0, batch, num_frames, b_stop
                )
            z, v = z_star.detach(), v_star.detach()
            if eager and self.training:
                z, v = self._training_states(
                    data, x_hat, weights, z, v, batch, num_frames, floor
                )
                fz = self.f(z, data, x_hat, weights)
            # Lagrangian with z*, v* constant: exact dE/dx, dE/dcell, dE/dtheta by autograd
            # (eager and TorchScript evaluation reuse the adjoint's recording of f(z*))
            per_atom = self.energy(z, data) + (v * (fz - z)).sum(-1, keepdim=True)
            if eager:
                per_atom = _TotalEnergyGradientOnly.apply(per_atom, batch)
        else:
            z = z_star.detach()
            for _ in range(max(self.train_unroll_steps, 1)):
                z = self.f(z, data, x_hat, weights)
            per_atom = self.energy(z, data)
        return per_atom, z_star, f_res, v_star, b_it, b_res

    def _start(self, data: AtomicDataDict.Type, key: str, x: torch.Tensor) -> torch.Tensor:
        """Starting point from ``data[key]`` when given with the right shape, else zeros."""
        zero = torch.zeros_like(x)
        if key in data:
            given = data[key]
            if given.shape == x.shape:
                return given.detach().to(x.dtype) + zero
        return zero

    @torch.jit.unused
    def _training_states(
        self,
        data: AtomicDataDict.Type,
        x_hat: torch.Tensor,
        weights: List[torch.Tensor],
        z: torch.Tensor,
        v: torch.Tensor,
        batch: torch.Tensor,
        num_frames: int,
        floor: float,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """:math:`(z^*, v^*)` with the parameter dependence the force loss needs
        (``train_gradient``; see :mod:`~nequip_deq.nn.fixed_point.training_gradients`)."""
        if self.train_implicit:
            tol, statistics = self._backward_solve_settings(data, num_frames, floor)
            return attach_implicit_gradient(
                self, data, x_hat, z, v, batch, num_frames, tol, self.grad_max_iter, statistics
            )
        return unroll(self, z, v, data, x_hat, weights, self.train_unroll_steps)

    @torch.jit.unused
    def _backward_solve_settings(
        self, data: AtomicDataDict.Type, num_frames: int, floor: float
    ) -> Tuple[float, torch.Tensor]:
        """The training gradient's backward solve: its tolerance (``grad_tol``, or the call's
        adjoint tolerance when ``deq_tolerance`` is given, e.g. by ``train_tol``) and the
        ``deq_backward_statistics`` output ``(num_frames, 2)`` it fills when it runs."""
        tol = self.grad_tol
        if _keys.DEQ_TOLERANCE_KEY in data:
            tol = float(data[_keys.DEQ_TOLERANCE_KEY].reshape(-1, 2)[:, 1].max())
        device = data[AtomicDataDict.NODE_FEATURES_KEY].device
        statistics = torch.zeros(num_frames, 2, dtype=torch.float64, device=device)
        data[_keys.DEQ_BACKWARD_STATISTICS_KEY] = statistics
        return max(tol, floor), statistics

    @torch.jit.unused
    def _jacobian_penalty_output(
        self,
        data: AtomicDataDict.Type,
        x_hat: torch.Tensor,
        weights: List[torch.Tensor],
        z_star: torch.Tensor,
    ) -> None:
        """``deq_jacobian_penalty`` (0-dim, with its graph) when the call asks for it
        (``deq_jacobian_penalty_step``)."""
        wanted = data.get(_keys.DEQ_PENALTY_STEP_KEY)
        if wanted is not None and bool(wanted.any()):
            data[_keys.DEQ_JACOBIAN_PENALTY_KEY] = jacobian_penalty(self, data, x_hat, weights, z_star)
