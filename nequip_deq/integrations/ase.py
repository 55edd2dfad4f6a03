"""ASE calculators: :class:`DEQCalculator` for DEQ models (it reuses the previous fixed point,
a warm start), and :func:`load_calculator`, the right calculator for any model file."""

import warnings
from typing import Optional

import numpy as np
import torch

from ase import Atoms

from nequip.data import AtomicDataDict
from nequip.integrations.ase import NequIPCalculator

from .._compile_targets import (
    ASE_DEQ_TARGET,
    DAMPING_METADATA_KEY,
    FIXED_POINT_METADATA_KEY,
    STATE_WIDTH_METADATA_KEY,
    compiled_target,
    solver_limits,
)
from .._keys import (
    DEQ_ADJOINT_STATE_KEY,
    DEQ_STATE_KEY,
    DEQ_TOLERANCE_KEY,
    SOLVER_ITERATIONS_KEY,
    SOLVER_RESIDUAL_KEY,
    SOLVER_STATISTICS,
)
from ..nn.fixed_point.extrapolation import DEFAULT_SCHEME, StartingPoints
from ..nn.fixed_point.solvers import TF32_TOLERANCE_FLOOR, FixedPointError, tolerance_floor


class DEQCalculator(NequIPCalculator):
    """:class:`~nequip.integrations.ase.NequIPCalculator` for
    :func:`~nequip_deq.model.DEQEquiformerModel`: each call starts the fixed-point and adjoint
    solves from the previous call's solutions (``deq_state``, ``deq_adjoint_state``), which in
    MD are close to the new ones, so a step needs far fewer iterations. Results differ from a
    cold start only within the solver tolerances.

    The start comes from the previous solves of the same atoms (``extrapolation``, one of
    :data:`~nequip_deq.nn.fixed_point.extrapolation.SCHEMES`; see that module): ``xlbomd`` (default, the
    extended Lagrangian) follows them with a time-reversible auxiliary state, which keeps the
    NVE total energy within an explicit model's fluctuation at tolerance 1e-3; ``quadratic`` extrapolates
    the last three solutions and needs about half the iterations, but its solve error acts as
    a friction in NVE (docs/deq.md tabulates both).

    Falls back to a cold start (zeros) on the first call, when the atomic numbers change
    (count or order), when the stored state has the wrong shape, after a call whose solve
    ended above its tolerance (nothing of it is kept to start from, as in the LAMMPS state
    cache), or after :meth:`reset_state`. A call that raises leaves neither results nor a
    start behind.
    ``warm_start=False`` always cold-starts (for comparisons).

    ``tolerance``: the relative tolerance of the forward and adjoint solves of every call
    (default: the model's own, for a compiled model the one recorded at compile time). Looser
    is cheaper and conserves energy less well: docs/deq.md tabulates both against it.

    ``shadow`` (variational DEQs, ``fixed_point: variational``, eager or compiled; with
    ``xlbomd``):
    zero-iteration extended-Lagrangian ("shadow") dynamics. Once the recurrence has its history
    (the first eight calls solve to tolerance), a call does not solve: it evaluates the energy
    at the auxiliary state :math:`p`, :math:`U(x; p) = \\Phi(p, x)`, whose forces are exactly
    :math:`-\\partial U/\\partial x` at fixed :math:`p` (energy error second order, force
    error first order in :math:`p - z^*`), and records one descent step from :math:`p` as the
    recurrence's "solution". A call whose residual at :math:`p` is above ``shadow_bound``
    is solved to tolerance instead, with a warning the first time (and its call number).

    Solver statistics of the last call are in ``results``: ``deq_iterations``,
    ``deq_residual``, ``deq_adjoint_iterations``, ``deq_adjoint_residual``, ``deq_warm``
    (whether it was warm-started) and ``deq_shadow`` (whether it was a shadow step).

    Eager models (``from_checkpoint_model`` / constructor) work as they are and check their
    own solves; compiled models must be compiled with ``nequip-compile --mode aotinductor
    --target ase_deq`` (load with :meth:`from_compiled_model`). A compiled model cannot warn or
    raise, so the calculator checks every call against the tolerances and caps recorded in the
    model's metadata (``solver_limits``): it raises :class:`FixedPointError` on non-finite
    energies, forces or residuals and warns, with the residual, the iterations and the call
    number, when a solve ended above its tolerance. A compiled variational DEQ does not
    iterate inside the model: the calculator solves it by calls (:meth:`_minimise_by_calls`).
    """

    implemented_properties = NequIPCalculator.implemented_properties + [
        "deq_iterations",
        "deq_residual",
        "deq_adjoint_iterations",
        "deq_adjoint_residual",
        "deq_warm",
        "deq_shadow",
    ]

    def __init__(
        self,
        *args,
        warm_start: bool = True,
        extrapolation: str = DEFAULT_SCHEME,
        state_width: Optional[int] = None,
        solver_limits: Optional[dict] = None,
        tolerance: Optional[float] = None,
        shadow: bool = False,
        shadow_bound: float = 0.05,
        **kwargs,
    ):
        if tolerance is not None and not tolerance > 0:
            raise ValueError(f"tolerance {tolerance} must be > 0 (a relative residual, e.g. 1e-4).")
        super().__init__(*args, **kwargs)
        self.warm_start = warm_start
        self.extrapolation = extrapolation
        self.state_width = state_width
        self.solver_limits = solver_limits
        self.tolerances = None  # (forward, adjoint) passed with every call, if any
        if tolerance is not None:
            floor = tolerance_floor(self._model_dtype(solver_limits))
            if solver_limits is not None and solver_limits.get("allow_tf32") == "1":
                floor = max(floor, TF32_TOLERANCE_FLOOR)  # compiled with --tf32
            self.tolerances = (max(tolerance, floor),) * 2
        elif solver_limits is not None:  # a compiled model takes them with every call
            self.tolerances = (solver_limits["f_tol"], solver_limits["b_tol"])
        if solver_limits is not None and self.tolerances is not None:
            self.solver_limits = {**solver_limits, "f_tol": self.tolerances[0], "b_tol": self.tolerances[1]}
        self.calls = 0
        self.shadow = bool(shadow)
        self.shadow_bound = float(shadow_bound)
        self._shadow_warned = False
        if self.shadow:
            self._check_shadow()
        self.reset_state()

    @property
    def solves_by_calls(self) -> bool:
        """A compiled variational DEQ: it does not iterate, the calculator does
        (:meth:`_minimise_by_calls`)."""
        return self.solver_limits is not None and self.solver_limits.get("fixed_point") == "variational"

    def _check_shadow(self) -> None:
        variational = self.solves_by_calls or any(
            type(m).__name__ == "VariationalDEQLayer" for m in self.model.modules()
        )
        if not variational or self.extrapolation != "xlbomd":
            raise ValueError(
                "shadow dynamics needs a variational DEQ (`fixed_point: variational`: "
                "its energy is stationary in the state, so a state that is not solved gives a "
                "shadow energy with exact forces) and `extrapolation='xlbomd'` (the recurrence "
                f"that carries the state); got {'a variational' if variational else 'another'} "
                f"model and extrapolation {self.extrapolation!r}."
            )

    @classmethod
    def _get_aoti_compile_target(cls):
        from nequip.scripts._compile_utils import COMPILE_TARGET_DICT

        return COMPILE_TARGET_DICT[ASE_DEQ_TARGET]

    @classmethod
    def from_compiled_model(cls, compile_path, device="cpu", **kwargs):
        """Load a ``.nequip.pt2`` compiled with ``--target ase_deq``; the state width and the
        solver limits come from its metadata."""
        metadata = torch._inductor.aoti_load_package(str(compile_path)).get_metadata()
        target = compiled_target(metadata)
        if STATE_WIDTH_METADATA_KEY not in metadata or target != ASE_DEQ_TARGET:
            raise ValueError(
                f"{compile_path} was compiled for `--target {target}`"
                + ("" if STATE_WIDTH_METADATA_KEY in metadata else " and is not a DEQ model")
                + f": DEQCalculator needs a DEQ model compiled with `--target {ASE_DEQ_TARGET}` "
                "(other models: nequip's NequIPCalculator with `--target ase`)."
            )
        return super().from_compiled_model(
            compile_path,
            device=device,
            state_width=int(metadata[STATE_WIDTH_METADATA_KEY]),
            solver_limits={
                **solver_limits(metadata),
                "model_dtype": metadata["model_dtype"],
                "allow_tf32": metadata.get("allow_tf32", "0"),
                "fixed_point": metadata.get(FIXED_POINT_METADATA_KEY, "lagrangian"),
                "damping": float(metadata.get(DAMPING_METADATA_KEY, 1.0)),
            },
            **kwargs,
        )

    def _model_dtype(self, solver_limits: Optional[dict]) -> torch.dtype:
        if solver_limits is not None and "model_dtype" in solver_limits:
            return getattr(torch, solver_limits["model_dtype"])
        return next(self.model.parameters()).dtype

    def reset_state(self) -> None:
        """Forget the stored fixed points: the next call starts cold."""
        self._starts = StartingPoints(self.extrapolation)  # of the current atoms
        self._numbers = None
        self._warm = False
        self._shadow_step = False

    def call_model(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        self.results = {}  # a call that raises leaves no results of an earlier one behind
        self.calls += 1
        num_atoms = data[AtomicDataDict.POSITIONS_KEY].shape[0]
        numbers = np.asarray(self.atoms.get_atomic_numbers())
        same_atoms = (
            self._numbers is not None
            and np.array_equal(numbers, self._numbers)
            and all(z.shape[0] == num_atoms for z, _ in self._starts.solutions)
        )
        if not same_atoms:
            self._starts.reset()
        warm = self.warm_start and len(self._starts) > 0
        # states travel in the dtype of the positions (the dtype a compiled model was traced with)
        dtype = data[AtomicDataDict.POSITIONS_KEY].dtype
        if warm:
            z, v = self._starts.start()
            data[DEQ_STATE_KEY], data[DEQ_ADJOINT_STATE_KEY] = z.to(dtype), v.to(dtype)
        elif self.state_width is not None:  # compiled models always take a state
            zeros = torch.zeros(num_atoms, self.state_width, dtype=dtype, device=self.device)
            data[DEQ_STATE_KEY], data[DEQ_ADJOINT_STATE_KEY] = zeros, zeros.clone()
        self._shadow_step = self.shadow and warm and self._starts.from_recurrence
        unsolved = data.copy()
        if self._shadow_step:  # no solve: the energy at the given state
            data[DEQ_TOLERANCE_KEY] = torch.full((1, 2), float("inf"), dtype=dtype, device=self.device)
            out = super().call_model(data)
        else:
            out = self._solve(data)
        if self._shadow_step and not float(out[SOLVER_RESIDUAL_KEY].max()) <= self.shadow_bound:
            out = self._solve_instead(unsolved, float(out[SOLVER_RESIDUAL_KEY].max()))
        # a shadow step is not a solve: its residual was checked against shadow_bound
        limits = {**self._limits(), "f_tol": float("inf")} if self._shadow_step else self._limits()
        if check_solves(out, limits, self.calls, warn=self.solver_limits is not None):
            self._starts.record((out[DEQ_STATE_KEY].detach(), out[DEQ_ADJOINT_STATE_KEY].detach()))
        else:  # as the LAMMPS state cache: nothing to start from, the next call starts cold
            self._starts.reset()
        self._numbers = numbers.copy()
        self._warm = warm
        return out

    def _limits(self) -> dict:
        """The tolerances and caps this calculator's solves run at: the compiled model's
        metadata, or an eager model's DEQ layer (at ``tolerance`` when one was given)."""
        if self.solver_limits is not None:
            return self.solver_limits
        layer = next(m for m in self.model.modules() if hasattr(m, "f_tol") and hasattr(m, "b_tol"))
        floor = tolerance_floor(self._model_dtype(None))
        f_tol, b_tol = self.tolerances or (max(layer.f_tol, floor), max(layer.b_tol, floor))
        return {"f_tol": f_tol, "b_tol": b_tol, "f_max_iter": layer.f_max_iter, "b_max_iter": layer.b_max_iter}

    def _solve_instead(self, data: AtomicDataDict.Type, residual: float) -> AtomicDataDict.Type:
        """A shadow step whose state is too far from the solution: solve it (from that state)."""
        if not self._shadow_warned:
            warnings.warn(
                f"shadow step at call {self.calls}: relative residual {residual:.3g} of the "
                f"auxiliary state is above shadow_bound {self.shadow_bound:g}; solving this step "
                "to tolerance instead (said once; `deq_shadow` in the results marks each step)."
            )
            self._shadow_warned = True
        self._shadow_step = False
        return self._solve(data)

    def _solve(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        """The model's solve from ``data``'s state at the calculator's tolerance: one call, or
        for a compiled variational DEQ :meth:`_minimise_by_calls`."""
        if self.tolerances is not None:
            dtype = data[AtomicDataDict.POSITIONS_KEY].dtype
            data[DEQ_TOLERANCE_KEY] = torch.tensor([self.tolerances], dtype=dtype, device=self.device)
        if self.solves_by_calls:
            return self._minimise_by_calls(data)
        return super().call_model(data)

    def _minimise_by_calls(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        """Solve a compiled variational DEQ, which does not iterate: each call evaluates the
        potential at the state :math:`p` it is given and returns the step :math:`f(p)` and the
        residual of :math:`p`; the next call starts from the damped step
        :math:`p + \\beta (f(p) - p)` (:math:`\\beta` the model's ``damping``) until the
        residual is within the forward tolerance or the cap (``f_max_iter`` calls) is reached.
        A call whose residual exceeds twice the lowest so far is undone and the damping halved
        (a Hessian eigenvalue beyond the step's range). Returns the last accepted call's
        outputs, with ``deq_iterations`` the number of calls before it (0: the start was
        within tolerance), as the eager model counts its evaluations beyond the last."""
        tol, cap = self.solver_limits["f_tol"], self.solver_limits["f_max_iter"]
        damping = self.solver_limits["damping"]
        p = data[DEQ_STATE_KEY]
        best, best_out, best_p, calls = float("inf"), None, p, 0
        while calls < cap:
            out = super().call_model({**data, DEQ_STATE_KEY: p})
            calls += 1
            residual = float(out[SOLVER_RESIDUAL_KEY].max())
            if not residual <= 2 * best:  # also non-finite
                if best_out is None:
                    break  # the start itself: nothing to go back to
                damping *= 0.5
                out, p = best_out, best_p
            else:
                best, best_out, best_p = residual, out, p
                if residual <= tol:
                    break
            p = p + damping * (out[DEQ_STATE_KEY] - p)
        out = dict(best_out if best_out is not None else out)
        out[SOLVER_ITERATIONS_KEY] = torch.full_like(out[SOLVER_ITERATIONS_KEY], calls - 1)
        return out

    def save_extra_outputs(self, out: AtomicDataDict.Type) -> None:
        self.results.update(solver_statistics(out))
        self.results["deq_warm"] = self._warm
        self.results["deq_shadow"] = self._shadow_step


def model_type_names(calculator) -> Optional[list]:
    """The type names of the model behind a nequip ``calculator`` (its chemical-species
    mapping), or None if it has no such mapping."""
    from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper

    for transform in getattr(calculator, "transforms", []):
        if isinstance(transform, ChemicalSpeciesToAtomTypeMapper):
            return list(transform.model_type_names)
    return None


def check_elements(atoms: Atoms, calculator) -> None:
    """Refuse, before any MD, a structure with elements the model has no type for."""
    known = model_type_names(calculator)
    unknown = sorted(set(atoms.get_chemical_symbols()) - set(known or []))
    if known is not None and unknown:
        raise ValueError(
            f"the structure contains {unknown}, which the model was not trained on (its "
            f"type_names are {known}); use a model trained with these elements."
        )


def load_calculator(
    model: str, device: str, extrapolation: str = DEFAULT_SCHEME, tolerance=None, shadow: bool = False
):
    """An ASE calculator for ``model``: :class:`~nequip_deq.integrations.ase.DEQCalculator`
    (warm-started solves) for DEQ models, nequip's ``NequIPCalculator`` otherwise. Compiled
    models must be compiled with ``--target ase`` (``ase_deq`` for DEQ models); others are
    refused with the target to use. ``extrapolation``: the DEQ's starting-point scheme
    (:data:`~nequip_deq.nn.fixed_point.extrapolation.SCHEMES`); ``tolerance``: its solver tolerance for
    every call (default: the model's); ``shadow``: shadow dynamics (variational DEQs, eager or
    compiled for ``ase_deq``; see :class:`DEQCalculator`)."""
    from ..nn.fixed_point.layer import DEQEquiformerLayer
    from ..nn.fixed_point.variational import VariationalDEQLayer

    if shadow and model.endswith(".pth"):
        raise ValueError(
            f"{model}: shadow dynamics needs a variational DEQ as a checkpoint, a package or "
            "compiled with `--mode aotinductor --target ase_deq`; TorchScript cannot run one."
        )
    if model.endswith(".pt2"):
        metadata = torch._inductor.aoti_load_package(model).get_metadata()
        target = compiled_target(metadata)
        if target not in ("ase", "ase_deq"):
            wanted = "ase_deq" if STATE_WIDTH_METADATA_KEY in metadata else "ase"
            raise ValueError(
                f"{model} was compiled for `--target {target}`; ASE needs `--target {wanted}` "
                f"(recompile: nequip-compile <checkpoint> <out>.nequip.pt2 --mode aotinductor "
                f"--target {wanted})."
            )
        if STATE_WIDTH_METADATA_KEY not in metadata:
            if shadow:
                raise ValueError(f"{model} is not a DEQ model: shadow dynamics needs a variational DEQ.")
            return NequIPCalculator.from_compiled_model(
                model, device=device, chemical_species_to_atom_type_map=True
            )
        return DEQCalculator.from_compiled_model(
            model, device=device, chemical_species_to_atom_type_map=True, extrapolation=extrapolation,
            tolerance=tolerance, shadow=shadow,
        )
    if model.endswith(".pth"):
        return NequIPCalculator.from_compiled_model(
            model, device=device, chemical_species_to_atom_type_map=True
        )
    calc = NequIPCalculator._from_saved_model(
        model, device=device, chemical_species_to_atom_type_map=True
    )
    # by class name: a packaged model (.nequip.zip) carries its own copy of the class
    deq_layers = (DEQEquiformerLayer.__name__, VariationalDEQLayer.__name__)
    if any(type(m).__name__ in deq_layers for m in calc.model.modules()):
        return DEQCalculator(
            calc.model, device=device, transforms=calc.transforms, extrapolation=extrapolation,
            tolerance=tolerance, shadow=shadow,
        )
    if shadow:
        raise ValueError(f"{model} is not a DEQ model: shadow dynamics needs a variational DEQ.")
    return calc


def solver_statistics(out: AtomicDataDict.Type) -> dict:
    """The solver statistics of a single-frame model output as numbers (:data:`SOLVER_STATISTICS`)."""
    return {key: out[key].detach().cpu().numpy().reshape(-1)[0] for key in SOLVER_STATISTICS}


def check_solves(out: AtomicDataDict.Type, limits: dict, call: int, warn: bool = True) -> bool:
    """Check the output of call number ``call``: raise :class:`FixedPointError` on non-finite
    energies, forces or residuals (what a compiled DEQ model cannot do itself); return whether
    the forward and adjoint solves ended within their tolerances (``limits``: see
    :func:`~nequip_deq._compile_targets.solver_limits`), and when not, with ``warn``, warn
    with the residual and the iterations (an eager model warns itself)."""
    stats = solver_statistics(out)
    values = [out[AtomicDataDict.TOTAL_ENERGY_KEY], out[AtomicDataDict.FORCE_KEY]]
    residuals = (stats["deq_residual"], stats["deq_adjoint_residual"])
    if not all(bool(torch.isfinite(v).all()) for v in values) or not np.isfinite(residuals).all():
        raise FixedPointError(
            f"DEQ model returned non-finite values at call {call} (forward residual "
            f"{residuals[0]:g} after {stats['deq_iterations']} iterations, adjoint "
            f"{residuals[1]:g} after {stats['deq_adjoint_iterations']}): the solver diverged. "
            "Check the structure (overlapping atoms?) and the time step."
        )
    converged = True
    for what, res, it, tol, cap in (
        ("forward", residuals[0], stats["deq_iterations"], limits["f_tol"], limits["f_max_iter"]),
        ("adjoint", residuals[1], stats["deq_adjoint_iterations"], limits["b_tol"], limits["b_max_iter"]),
    ):
        if res > tol:
            converged = False
            if warn:
                warnings.warn(
                    f"DEQ {what} solve at call {call} ended at relative residual {res:.3g} above "
                    f"its tolerance {tol:g} after {int(it)} iterations (cap {cap}): energies and "
                    "forces carry that error, and the next call starts cold. Recompile with a "
                    "larger iteration cap (`f_max_iter`, `b_max_iter`) or check the structure."
                )
    return converged
