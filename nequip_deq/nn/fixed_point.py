"""Deep-equilibrium layer: weight-tied Equiformer blocks solved to their fixed point, with the
energy gradient taken exactly through the fixed point.

With the encoder output :math:`x`, the DEQ function is
:math:`f(z, x) = B(\\mathrm{inject}(z, x))` for ``num_deq_layers`` Equiformer blocks :math:`B`
(see :class:`~nequip_deq.nn.injection.Injection`), and the energy is read out from the fixed
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

Solvers: every frame of a batch is iterated until its own relative residual
:math:`\\|f(z) - z\\| / \\|f(z)\\|` is below the tolerance (converged frames stop updating), so a
frame gives the same result alone or in a batch. The same damped fixed-point iteration runs as a
Python loop (eager, TorchScript) and as ``torch.while_loop`` when traced for
``nequip-compile --mode aotinductor``, so compiled models also stop at the tolerance and profit
from a warm start. In training, torchdeq's ``anderson`` / ``broyden`` may replace the forward
iteration.
"""

import os
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from e3nn.o3._irreps import Irreps
from e3nn.util.jit import compile_mode

from nequip.data import AtomicDataDict
from nequip.nn import GraphModuleMixin, scatter
from nequip.nn.model_modifier_utils import model_modifier, replace_submodules

from .. import _keys
from .._compile_targets import STATE_CACHE_METADATA_KEY, STATE_WIDTH_METADATA_KEY, set_state_cache
from .block import EquiformerBlock
from .injection import Injection
from .state_cache import (
    CAPACITY_ENV,
    DEFAULT_CAPACITY,
    DEFAULT_MAX_DISPLACEMENT,
    DEQStateCache,
    cache_inputs,
)

SOLVERS = ("fixed_point_iter", "anderson", "broyden")
GRADIENTS = ("implicit", "phantom")


class FixedPointError(RuntimeError):
    """The fixed-point or adjoint solve produced non-finite values."""


class PartialForcesNotExact(RuntimeError):
    """Per-atom energy gradients were requested from a DEQ model."""


def frame_residual(
    new: torch.Tensor, old: torch.Tensor, batch: torch.Tensor, num_frames: int
) -> torch.Tensor:
    """Relative change per frame, :math:`\\|new - old\\|_F / (\\|new\\|_F + 10^{-30})`:
    ``new``, ``old`` ``(N, X)``, ``batch`` ``(N,)`` -> ``(num_frames,)``."""
    diff = scatter((new - old).square().sum(-1), batch, dim=0, dim_size=num_frames)
    norm = scatter(new.square().sum(-1), batch, dim=0, dim_size=num_frames)
    return diff.sqrt() / (norm.sqrt() + 1e-30)


@torch.jit.unused
def _is_tracing() -> bool:
    """True while nequip's compile traces the model (``make_fx`` / ``torch.export``)."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return torch.compiler.is_compiling() or get_proxy_mode() is not None


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
class DEQEquiformerLayer(GraphModuleMixin, torch.nn.Module):
    """Fixed point of weight-tied Equiformer blocks followed by the energy readout.

    Reads ``node_features`` (the encoder output :math:`x`, irreps ``X``) and optionally the
    starting points ``deq_state`` / ``deq_adjoint_state`` (``(N, X)``; used when their shape
    matches, else zeros = cold start). Writes ``per_atom_energy`` (the Lagrangian of the module
    docstring, per atom), ``deq_state`` (:math:`z^*`), ``deq_adjoint_state`` (:math:`v^*`) and per
    frame ``deq_iterations``, ``deq_residual``, ``deq_adjoint_iterations``,
    ``deq_adjoint_residual``.

    A single-frame caller that passes no state (LAMMPS ``pair_style nequip``) gets warm starts
    from the in-model :class:`~nequip_deq.nn.state_cache.DEQStateCache` once the model modifier
    ``enable_DEQStateCache`` is applied (off by default; evaluation only).

    Gradients (``gradient``):

    - ``implicit`` (default): exact forces and stress (up to the solver tolerances). In
      training, :math:`z^*` and :math:`v^*` are refined by ``train_unroll_steps``
      differentiable iterations before the Lagrangian is formed, which makes the second
      derivatives that a force loss needs (forces w.r.t. parameters) accurate; their error
      decays like (contraction factor)^steps.
    - ``phantom``: energy :math:`R(f^K(z^*))` with :math:`z^*` constant,
      ``K = max(train_unroll_steps, 1)``: the gradient ignores how :math:`z^*` moves, so
      forces are **not** −dE/dx and MD does **not** conserve energy. For comparison only.

    Args:
        num_deq_layers: Equiformer blocks inside :math:`f`
        block_kwargs: arguments of :class:`EquiformerBlock` for the blocks of :math:`f`
        readout: graph modules mapping ``node_features`` to ``per_atom_energy``
        injection: ``add`` or ``concat`` (:class:`~nequip_deq.nn.injection.Injection`)
        damping: relaxation :math:`\\beta` of :math:`z \\leftarrow z + \\beta (f(z) - z)` (and
            of the adjoint iteration)
        solver: training-time forward solver (``fixed_point_iter``, or torchdeq's
            ``anderson`` / ``broyden``); evaluation always uses the damped iteration
        f_tol, f_max_iter: relative tolerance and iteration cap of the forward solve
        b_tol, b_max_iter: the same for the adjoint solve
        gradient: ``implicit`` or ``phantom``
        train_unroll_steps: differentiable refinement steps in training (see above)
        jacobian_penalty: in training, also compute a Hutchinson estimate of
            :math:`\\|\\partial f/\\partial z\\|_F^2 / \\dim z` at :math:`z^*` (kept, with its
            graph, in ``last_jacobian_penalty`` for a Jacobian-regularisation loss)
    """

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
        train_unroll_steps: int = 3,
        jacobian_penalty: bool = False,
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
        self.train_unroll_steps = int(train_unroll_steps)
        self.jacobian_penalty = bool(jacobian_penalty)
        self.last_jacobian_penalty = None
        self.state_cache = DEQStateCache(0, irreps.dim, torch.get_default_dtype())

    @torch.jit.unused
    def _get_metadata_contributions(self) -> Dict[str, str]:
        # the state width lets a calculator give a compiled model a cold-start state
        out = {STATE_WIDTH_METADATA_KEY: str(self.injection.norm.irreps.dim)}
        if self.state_cache.capacity > 0:
            out[STATE_CACHE_METADATA_KEY] = str(self.state_cache.capacity)
        return out

    @model_modifier(persistent=False)
    @classmethod
    def enable_DEQStateCache(
        cls,
        model: torch.nn.Module,
        capacity: Optional[int] = None,
        max_displacement: float = DEFAULT_MAX_DISPLACEMENT,
    ) -> torch.nn.Module:
        """Keep the last fixed point inside the model and warm-start the next call from it
        when it is the same system a moment later (:mod:`~nequip_deq.nn.state_cache`): for
        callers that pass no state, such as LAMMPS ``pair_style nequip``. ``capacity`` (atoms;
        default: environment variable ``NEQUIP_DEQ_STATE_CACHE_ATOMS`` or 10000) bounds the
        systems that profit; larger ones run cold."""
        if capacity is None:
            capacity = int(os.environ.get(CAPACITY_ENV, DEFAULT_CAPACITY))
        if capacity < 1:
            raise ValueError(
                f"enable_DEQStateCache: capacity {capacity} must be a number of atoms >= 1 "
                f"(set {CAPACITY_ENV} or pass `capacity`)."
            )

        def factory(layer: "DEQEquiformerLayer") -> "DEQEquiformerLayer":
            old = layer.state_cache
            layer.state_cache = DEQStateCache(
                capacity, old.state.shape[1], old.state.dtype, max_displacement
            ).to(old.state.device)
            return layer

        set_state_cache(capacity)
        return replace_submodules(model, cls, factory)

    # ---- the DEQ function and the readout ------------------------------------------------

    def f(self, z: torch.Tensor, data: AtomicDataDict.Type, x_hat: torch.Tensor) -> torch.Tensor:
        """:math:`f(z, x)`: ``(N, X) -> (N, X)``."""
        d = data.copy()
        d[AtomicDataDict.NODE_FEATURES_KEY] = self.injection(z, x_hat)
        for block in self.blocks:
            d = block(d)
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
        x = data[AtomicDataDict.NODE_FEATURES_KEY]
        num_frames = AtomicDataDict.num_frames(data)
        if AtomicDataDict.BATCH_KEY in data:
            batch = data[AtomicDataDict.BATCH_KEY]
        else:
            batch = torch.zeros(x.size(0), dtype=torch.long, device=x.device)
        x_hat = self.injection.normalize(x)
        # float32 cannot resolve relative residuals much below 1e-6: floor the tolerances
        floor = 2e-6 if x.dtype == torch.float32 else 0.0
        f_tol = max(self.f_tol, floor)
        b_tol = max(self.b_tol, floor)
        z0 = self._start(data, _keys.DEQ_STATE_KEY, x)
        v0 = self._start(data, _keys.DEQ_ADJOINT_STATE_KEY, x)
        use_cache = (
            self.state_cache.capacity > 0
            and not self.training
            and AtomicDataDict.BATCH_KEY not in data
            and _keys.DEQ_STATE_KEY not in data
            and AtomicDataDict.POSITIONS_KEY in data  # not under LAMMPS ML-IAP
        )
        cache_hit = torch.zeros((), dtype=torch.bool, device=x.device)
        if use_cache:
            pos, types, cell = cache_inputs(data)
            z0, v0, cache_hit = self.state_cache.lookup(pos, types, cell, z0)
        eager = False
        if not torch.jit.is_scripting():
            eager = not _is_tracing()

        # forward fixed point z* (no gradient)
        if torch.jit.is_scripting() or eager:
            if eager and self.training and self.solver != "fixed_point_iter":
                z_star, f_it, f_res = self._solve_torchdeq(data, x_hat, z0, batch, num_frames, f_tol)
            else:
                z_star, f_it, f_res = self._iterate(data, x_hat, z0, batch, num_frames, f_tol)
        else:
            z_star, f_it, f_res = self._iterate_traced(data, x_hat, z0, batch, num_frames, f_tol)
        if eager:
            _check("forward solve", z_star, f_it, f_res, f_tol)

        v_star = torch.zeros_like(z_star)
        b_it = torch.zeros_like(f_it)
        b_res = torch.zeros_like(f_res)
        if self.implicit:
            # adjoint v* = dR/dz + (df/dz)^T v* at z*
            if torch.jit.is_scripting():
                v_star, b_it, b_res = self._adjoint(
                    data, x_hat, z_star, v0, batch, num_frames, b_tol
                )
            elif eager:
                with torch.enable_grad():
                    v_star, b_it, b_res = self._adjoint(
                        data, x_hat, z_star, v0, batch, num_frames, b_tol
                    )
                _check("adjoint solve", v_star, b_it, b_res, b_tol)
            else:
                v_star, b_it, b_res = self._adjoint_traced(
                    data, x_hat, z_star, v0, batch, num_frames, b_tol
                )
            z, v = z_star.detach(), v_star.detach()
            if eager and self.training and self.train_unroll_steps > 0:
                z, v = self._unroll(z, v, data, x_hat)
            # Lagrangian with z*, v* constant: exact dE/dx, dE/dcell, dE/dtheta by autograd
            per_atom = self.energy(z, data) + (v * (self.f(z, data, x_hat) - z)).sum(
                -1, keepdim=True
            )
            if eager:
                per_atom = _TotalEnergyGradientOnly.apply(per_atom, batch)
        else:
            z = z_star.detach()
            for _ in range(max(self.train_unroll_steps, 1)):
                z = self.f(z, data, x_hat)
            per_atom = self.energy(z, data)

        if eager and self.training and self.jacobian_penalty:
            self._jacobian_penalty(data, x_hat, z_star)
        if use_cache:
            pos, types, cell = cache_inputs(data)
            self.state_cache.store(pos, types, z_star, v_star, cache_hit)
        data[AtomicDataDict.PER_ATOM_ENERGY_KEY] = per_atom
        data[_keys.DEQ_STATE_KEY] = z_star.detach()
        data[_keys.DEQ_ADJOINT_STATE_KEY] = v_star.detach()
        data[_keys.SOLVER_ITERATIONS_KEY] = f_it
        data[_keys.SOLVER_RESIDUAL_KEY] = f_res
        data[_keys.ADJOINT_ITERATIONS_KEY] = b_it
        data[_keys.ADJOINT_RESIDUAL_KEY] = b_res
        return data

    def _start(self, data: AtomicDataDict.Type, key: str, x: torch.Tensor) -> torch.Tensor:
        """Starting point from ``data[key]`` when given with the right shape, else zeros."""
        zero = torch.zeros_like(x)
        if key in data:
            given = data[key]
            if given.shape == x.shape:
                return given.detach().to(x.dtype) + zero
        return zero

    # ---- solvers: Python loops (eager and TorchScript) ----------------------------------

    def _iterate(
        self,
        data: AtomicDataDict.Type,
        x_hat: torch.Tensor,
        z: torch.Tensor,
        batch: torch.Tensor,
        num_frames: int,
        tol: float,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Damped fixed-point iteration per frame. Returns ``z*``, iterations and the last
        relative residual per frame."""
        active = torch.ones(num_frames, dtype=torch.bool, device=z.device)
        iters = torch.zeros(num_frames, dtype=torch.long, device=z.device)
        res = torch.full((num_frames,), float("inf"), dtype=z.dtype, device=z.device)
        with torch.no_grad():
            for _ in range(self.f_max_iter):
                fz = self.f(z, data, x_hat)
                z, iters, res, active = self._step(
                    z, fz, iters, res, active, batch, num_frames, tol
                )
                if not bool(active.any()):
                    break
        return z, iters, res

    def _adjoint(
        self,
        data: AtomicDataDict.Type,
        x_hat: torch.Tensor,
        z_star: torch.Tensor,
        v: torch.Tensor,
        batch: torch.Tensor,
        num_frames: int,
        tol: float,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Damped iteration :math:`v \\leftarrow g + J^\\top v` per frame, with
        :math:`g = \\partial R/\\partial z` and :math:`J = \\partial f/\\partial z` at :math:`z^*`
        (vector-Jacobian products by autograd on one recorded :math:`f(z^*)`)."""
        z = z_star.detach().requires_grad_(True)
        e = self.energy(z, data).sum()
        g_opt = torch.autograd.grad([e], [z])[0]
        assert g_opt is not None
        g = g_opt.detach()
        fz = self.f(z, data, x_hat)
        active = torch.ones(num_frames, dtype=torch.bool, device=z.device)
        iters = torch.zeros(num_frames, dtype=torch.long, device=z.device)
        res = torch.full((num_frames,), float("inf"), dtype=z.dtype, device=z.device)
        for _ in range(self.b_max_iter):
            grad_out: List[Optional[torch.Tensor]] = [v]
            jtv = torch.autograd.grad([fz], [z], grad_out, retain_graph=True)[0]
            assert jtv is not None
            v, iters, res, active = self._step(
                v, g + jtv.detach(), iters, res, active, batch, num_frames, tol
            )
            if not bool(active.any()):
                break
        return v.detach(), iters, res

    def _step(
        self,
        z: torch.Tensor,
        fz: torch.Tensor,
        iters: torch.Tensor,
        res: torch.Tensor,
        active: torch.Tensor,
        batch: torch.Tensor,
        num_frames: int,
        tol: float,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One damped update of the frames still active; returns the new
        ``(z, iters, res, active)``."""
        r = frame_residual(fz, z, batch, num_frames)
        z = torch.where(active[batch].unsqueeze(-1), z + self.damping * (fz - z), z)
        res = torch.where(active, r, res)
        iters = iters + active.long()
        active = active & (r > tol)
        return z, iters, res, active

    # ---- solvers: torch.while_loop (traced for AOTInductor) ------------------------------

    @torch.jit.unused
    def _loop_data(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        """The fields the blocks read, with ``edge_index`` re-made from clones of its rows:
        a ``torch.while_loop`` body must not capture the graph input itself."""
        d = {
            k: data[k]
            for k in (
                AtomicDataDict.EDGE_ATTRS_KEY,
                AtomicDataDict.EDGE_EMBEDDING_KEY,
                AtomicDataDict.EDGE_CUTOFF_KEY,
            )
        }
        edge_index = data[AtomicDataDict.EDGE_INDEX_KEY]
        d[AtomicDataDict.EDGE_INDEX_KEY] = torch.stack(
            [edge_index[0].clone(), edge_index[1].clone()]
        )
        return d

    @torch.jit.unused
    def _iterate_traced(
        self,
        data: AtomicDataDict.Type,
        x_hat: torch.Tensor,
        z0: torch.Tensor,
        batch: torch.Tensor,
        num_frames: int,
        tol: float,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d = self._loop_data(data)
        return self._while(
            lambda z: self.f(z, d, x_hat), z0, self.f_max_iter, batch, num_frames, tol
        )

    @torch.jit.unused
    def _adjoint_traced(
        self,
        data: AtomicDataDict.Type,
        x_hat: torch.Tensor,
        z_star: torch.Tensor,
        v0: torch.Tensor,
        batch: torch.Tensor,
        num_frames: int,
        tol: float,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z_star = z_star.detach()
        with torch.enable_grad():
            z = z_star.requires_grad_(True)
            g = torch.autograd.grad(self.energy(z, data).sum(), z)[0]
        d = self._loop_data(data)
        g = g.detach()
        z_star = z_star.detach().clone()

        def adjoint_map(v):
            _, vjp = torch.func.vjp(lambda zz: self.f(zz, d, x_hat), z_star)
            return g + vjp(v)[0]

        return self._while(adjoint_map, v0, self.b_max_iter, batch, num_frames, tol)

    @torch.jit.unused
    def _while(self, fixed_map, s0, max_iter: int, batch, num_frames: int, tol: float):
        """The damped iteration of :meth:`_step` on ``s <- fixed_map(s)`` as a
        ``torch.while_loop`` (exportable: it stops at the tolerance inside the compiled model).
        Returns ``s``, iterations and the last relative residual per frame."""
        batch = batch.clone()

        def cond(it, s, iters, res, active):
            return (it < max_iter) & active.any()

        def body(it, s, iters, res, active):
            s, iters, res, active = self._step(
                s, fixed_map(s), iters, res, active, batch, num_frames, tol
            )
            return it + 1, s, iters, res, active

        start = (
            torch.zeros((), dtype=torch.long, device=s0.device),
            s0,
            torch.zeros(num_frames, dtype=torch.long, device=s0.device),
            torch.full((num_frames,), float("inf"), dtype=s0.dtype, device=s0.device),
            torch.ones(num_frames, dtype=torch.bool, device=s0.device),
        )
        with torch.no_grad():
            _, s, iters, res, _ = torch.while_loop(cond, body, start)
        return s, iters, res

    # ---- training-only parts (eager) ------------------------------------------------------

    @torch.jit.unused
    def _solve_torchdeq(
        self,
        data: AtomicDataDict.Type,
        x_hat: torch.Tensor,
        z0: torch.Tensor,
        batch: torch.Tensor,
        num_frames: int,
        tol: float,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """torchdeq's ``anderson`` / ``broyden`` on frames packed as ``(num_frames, max_atoms*X)``
        (zero padding), so that its per-sample mixing and residuals are per frame."""
        from torchdeq.solver import get_solver

        counts = torch.bincount(batch, minlength=num_frames)
        first = torch.cumsum(counts, 0) - counts
        slot = torch.arange(batch.numel(), device=batch.device) - first[batch]
        width = z0.shape[-1]
        max_atoms = int(counts.max())

        def pack(z):
            out = z.new_zeros(num_frames, max_atoms, width)
            out[batch, slot] = z
            return out.reshape(num_frames, -1)

        def unpack(p):
            return p.reshape(num_frames, max_atoms, width)[batch, slot]

        kwargs = {"tau": self.damping} if self.solver == "anderson" else {}
        with torch.no_grad():
            packed, _, info = get_solver(self.solver)(
                lambda p: pack(self.f(unpack(p), data, x_hat)),
                pack(z0),
                max_iter=self.f_max_iter,
                tol=tol,
                stop_mode="rel",
                **kwargs,
            )
        iters = info["nstep"].reshape(-1).to(torch.long)
        return unpack(packed), iters, info["rel_lowest"].reshape(-1).to(z0.dtype)

    @torch.jit.unused
    def _unroll(
        self, z: torch.Tensor, v: torch.Tensor, data: AtomicDataDict.Type, x_hat: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``train_unroll_steps`` differentiable iterations of both fixed points from
        :math:`(z^*, v^*)`: their derivatives w.r.t. parameters and positions then approximate
        those of the exact fixed points, which the force loss needs."""
        for _ in range(self.train_unroll_steps):
            z = self.f(z, data, x_hat)
        for _ in range(self.train_unroll_steps):
            fz = self.f(z, data, x_hat)
            e = self.energy(z, data).sum()
            # d/dz (R(z) + <v, f(z)>) = dR/dz + J^T v
            v = torch.autograd.grad([e, fz], [z], [torch.ones_like(e), v], create_graph=True)[0]
        return z, v

    @torch.jit.unused
    def _jacobian_penalty(
        self, data: AtomicDataDict.Type, x_hat: torch.Tensor, z_star: torch.Tensor
    ) -> None:
        """Store torchdeq's Hutchinson estimate of the Jacobian penalty at z* (with graph)."""
        from torchdeq.loss import jac_reg

        z = z_star.detach().requires_grad_(True)
        self.last_jacobian_penalty = jac_reg(self.f(z, data, x_hat), z)


@torch.jit.unused
def _check(what: str, z: torch.Tensor, iters: torch.Tensor, res: torch.Tensor, tol: float) -> None:
    """Raise on non-finite solutions, warn when a frame ended above the tolerance."""
    if not bool(torch.isfinite(z).all()):
        raise FixedPointError(
            f"DEQ {what} produced non-finite values after {iters.tolist()} iterations (last "
            f"relative residuals {res.tolist()}). Lower `damping`, the learning rate or "
            "`branch_scale`, or add `jacobian_penalty`."
        )
    if bool((res > tol).any()):
        warnings.warn(
            f"DEQ {what} did not reach the tolerance {tol:g}: relative residuals "
            f"{res.tolist()} after {iters.tolist()} iterations; results carry that error "
            "(raise the iteration cap, lower `damping`, or loosen the tolerance)."
        )
