"""DEQCalculator: warm starts (same results, fewer iterations, cold fallback), tolerances per
call and at deploy time, the checks of compiled solves, and what it keeps for the next call."""

import warnings

import numpy as np
import pytest
import torch
from ase.build import molecule

from nequip.data import AtomicDataDict
from nequip.data.transforms import NeighborListTransform

from nequip_deq._compile_targets import solver_limits
from nequip_deq._keys import DEQ_ADJOINT_STATE_KEY, DEQ_STATE_KEY
from nequip_deq.integrations.ase import DEQCalculator, check_solves
from nequip_deq.nn.fixed_point.layer import DEQEquiformerLayer, FixedPointError

from small_deq import (
    R_MAX,
    TOL,
    build,
    mapper,
    graph,
    rattled,
    deq_layer,
    calculator,
    short_trajectory,
)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_warm_start_same_results_fewer_iterations(dtype):
    """At an MD tolerance (1e-5 relative residual), warm-started solves agree with cold ones
    within what the tolerance allows, with far fewer iterations."""
    model = build(dtype, f_tol=1e-5, b_tol=1e-5)
    cold, warm = calculator(model, warm_start=False), calculator(model)
    tol = 1e-4
    cold_iters, warm_iters = [], []
    for i, atoms in enumerate(short_trajectory(steps=4)):
        ref = cold.get_forces(atoms.copy()), cold.get_potential_energy(atoms.copy())
        forces, energy = warm.get_forces(atoms.copy()), warm.get_potential_energy(atoms.copy())
        np.testing.assert_allclose(forces, ref[0], atol=tol, rtol=0)
        assert abs(energy - ref[1]) < tol
        assert warm.results["deq_warm"] == (i > 0)
        cold_iters.append(cold.results["deq_iterations"] + cold.results["deq_adjoint_iterations"])
        warm_iters.append(warm.results["deq_iterations"] + warm.results["deq_adjoint_iterations"])
    assert warm_iters[0] == cold_iters[0]  # first call is cold
    # the second call starts from the previous z*, later ones extrapolate from the last two
    assert warm_iters[1] < cold_iters[1], (cold_iters, warm_iters)
    assert np.mean(warm_iters[2:]) < 0.5 * np.mean(cold_iters[2:]), (cold_iters, warm_iters)


def test_warm_start_falls_back_to_cold_when_atoms_change():
    model = build("float64")
    calc = calculator(model)
    calc.get_forces(rattled("CH3CH2OH", 0))
    other = rattled("CH3CHO", 0)  # different count and types
    forces = calc.get_forces(other)
    assert calc.results["deq_warm"] is False
    np.testing.assert_allclose(forces, calculator(model, warm_start=False).get_forces(other), atol=1e-9)
    swapped = rattled("CH3CHO", 1)
    swapped.numbers = swapped.numbers[::-1].copy()  # same count, different order of types
    calc.get_forces(swapped)
    assert calc.results["deq_warm"] is False


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_solver_limits_are_recorded_for_compiled_models(dtype):
    """The model's metadata carries its solver tolerances (floored in float32, as the solves
    are) and iteration caps, which calculators and checks read back."""
    model = build(dtype, f_tol=1e-7, b_tol=1e-4, f_max_iter=33, b_max_iter=44)
    limits = solver_limits(deq_layer(model)._get_metadata_contributions())
    f_tol = 2e-6 if dtype == "float32" else 1e-7
    assert limits == {"f_tol": f_tol, "f_max_iter": 33, "b_tol": 1e-4, "b_max_iter": 44}


def test_deploy_time_tolerances():
    """set_DEQSolverTolerances changes a trained model's solver settings for deployment (a
    persistent modifier, so that `nequip-package modify` applies it with arguments before
    nequip-compile), and the metadata a compiled model records follows; numbers written as
    YAML reads them (`f_tol=1e-3` is a string) are taken; bad or missing values are refused."""
    from nequip.model.modify_utils import modify
    from nequip.nn.model_modifier_utils import is_persistent_model_modifier

    assert is_persistent_model_modifier(DEQEquiformerLayer.set_DEQSolverTolerances)
    model = modify(build("float64", f_tol=1e-8), [{"modifier": "set_DEQSolverTolerances", "f_tol": 1e-3}])
    assert solver_limits(deq_layer(model)._get_metadata_contributions())["f_tol"] == 1e-3
    model = modify(build("float64"), [{"modifier": "set_DEQSolverTolerances", "b_tol": "2e-4", "f_max_iter": 170}])
    limits = solver_limits(deq_layer(model)._get_metadata_contributions())
    assert (limits["b_tol"], limits["f_max_iter"], limits["f_tol"]) == (2e-4, 170, TOL["float64"])
    loose = calculator(model)
    loose.get_forces(rattled("CH3CH2OH", 0))
    assert loose.results["deq_adjoint_residual"] <= 2e-4 and loose.results["deq_residual"] <= TOL["float64"]
    for bad, message in [({"f_tol": "tight"}, "f_tol = 'tight' must be a number > 0"),
                         ({"b_tol": -1.0}, "b_tol = -1.0 must be a number > 0"),
                         ({"f_max_iter": 30.5}, "f_max_iter = 30.5 must be a whole number > 0"),
                         ({}, "got no setting: pass f_tol, b_tol, f_max_iter and/or b_max_iter")]:
        with pytest.raises(ValueError, match=message):
            modify(build("float64"), [{"modifier": "set_DEQSolverTolerances", **bad}])


def test_tolerance_per_call():
    """DEQCalculator(tolerance=...) sets the tolerance of every call without touching the
    model: looser solves take fewer iterations and give the model's forces within it; a
    tolerance that is not a positive number is refused."""
    model = build("float64", f_tol=1e-10, b_tol=1e-10)
    atoms = rattled("CH3CH2OH", 0)
    tight = calculator(model, warm_start=False)
    loose = DEQCalculator(model, device="cpu", warm_start=False, tolerance=1e-3,
                          transforms=[mapper(), NeighborListTransform(r_max=R_MAX)])
    reference = tight.get_forces(atoms.copy())
    forces = loose.get_forces(atoms.copy())
    assert loose.results["deq_residual"] <= 1e-3 and loose.results["deq_adjoint_residual"] <= 1e-3
    assert loose.results["deq_iterations"] < tight.results["deq_iterations"]
    np.testing.assert_allclose(forces, reference, atol=1e-2 * np.abs(reference).max(), rtol=0)
    assert deq_layer(model).f_tol == 1e-10
    with pytest.raises(ValueError, match="tolerance -0.1 must be > 0"):
        DEQCalculator(model, device="cpu", tolerance=-0.1)


def test_tf32_raises_the_float32_tolerance_floor():
    """With TF32 matrix products (nequip-compile --tf32, nequip's TF32 scheduler) a float32
    solve cannot reach 1e-4 reliably: the tolerance is floored at 1e-3, in the solves and in
    the limits a compiled model records."""
    from nequip_deq.nn.fixed_point.solvers import tolerance_floor

    assert tolerance_floor(torch.float32) == 2e-6 and tolerance_floor(torch.float64) == 0.0
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # what allow_tf32 = True sets
    try:
        assert tolerance_floor(torch.float32) == 1e-3 and tolerance_floor(torch.float64) == 0.0
        model = build("float32", f_tol=1e-4, b_tol=1e-4)
        assert solver_limits(deq_layer(model)._get_metadata_contributions())["f_tol"] == 1e-3
        calc = calculator(model, warm_start=False)
        calc.get_forces(rattled("CH3CH2OH", 0))
        assert 1e-4 < max(calc.results["deq_residual"], calc.results["deq_adjoint_residual"]) <= 1e-3
    finally:
        torch.set_float32_matmul_precision(precision)


def solver_output(residual=5e-5, iterations=7, adjoint_residual=2e-5, adjoint_iterations=5, forces=0.0):
    """A single-frame output of a compiled DEQ model (3 atoms, state width 4)."""
    frame = lambda v: torch.tensor([[v]], dtype=torch.float64)
    return {
        AtomicDataDict.TOTAL_ENERGY_KEY: torch.zeros(1, 1, dtype=torch.float64),
        AtomicDataDict.FORCE_KEY: torch.full((3, 3), forces, dtype=torch.float64),
        "deq_residual": frame(residual), "deq_iterations": frame(iterations),
        "deq_adjoint_residual": frame(adjoint_residual), "deq_adjoint_iterations": frame(adjoint_iterations),
        DEQ_STATE_KEY: torch.ones(3, 4, dtype=torch.float64),
        DEQ_ADJOINT_STATE_KEY: torch.ones(3, 4, dtype=torch.float64),
    }


def test_compiled_solves_are_checked_by_the_calculator():
    """A compiled model can neither warn nor raise: DEQCalculator checks each call's results
    against the recorded limits, names the call, and raises on non-finite values."""
    limits = {"f_tol": 1e-4, "f_max_iter": 30, "b_tol": 1e-4, "b_max_iter": 30}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_solves(solver_output(), limits, call=3)  # converged: silent
    with pytest.warns(UserWarning, match=r"adjoint solve at call 12 ended at relative residual 0.003 .*after 30 iterations \(cap 30\)"):
        assert not check_solves(solver_output(adjoint_residual=3e-3, adjoint_iterations=30), limits, call=12)
    with pytest.raises(FixedPointError, match="non-finite values at call 4"):
        check_solves(solver_output(residual=float("nan")), limits, call=4)
    with pytest.raises(FixedPointError, match="non-finite"):
        check_solves(solver_output(forces=float("inf")), limits, call=5)


class ScriptedModel(torch.nn.Module):
    """Stands in for a compiled DEQ: returns the next of ``outputs`` and keeps the states it
    was given."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs, self.states = list(outputs), []

    def forward(self, data):
        self.states.append(data[DEQ_STATE_KEY].clone())
        return self.outputs.pop(0)


def test_calculator_keeps_only_solutions_that_passed():
    """A non-finite call raises and leaves neither results nor a warm start behind; an
    unconverged one is returned with a warning but not started from: the next call is cold."""
    limits = {"f_tol": 1e-4, "f_max_iter": 30, "b_tol": 1e-4, "b_max_iter": 30, "model_dtype": "float64"}
    model = ScriptedModel([
        solver_output(), solver_output(forces=float("nan")), solver_output(),
        solver_output(residual=1e-2, iterations=30), solver_output(),
    ]).eval()
    calc = DEQCalculator(model, device="cpu", state_width=4, solver_limits=limits)
    atoms = molecule("H2O")
    atoms.calc = calc
    atoms.get_potential_energy()
    atoms.positions[0, 0] += 0.01
    with pytest.raises(FixedPointError, match="call 2"):
        atoms.get_potential_energy()
    assert calc.results == {}
    atoms.positions[0, 0] += 0.01
    atoms.get_potential_energy()  # warm from call 1, the only good solution
    assert calc.results["deq_warm"] and bool((model.states[2] == 1).all())
    atoms.positions[0, 0] += 0.01
    with pytest.warns(UserWarning, match="forward solve at call 4 .* the next call starts cold"):
        atoms.get_potential_energy()
    atoms.positions[0, 0] += 0.01
    atoms.get_potential_energy()
    assert not calc.results["deq_warm"] and bool((model.states[4] == 0).all())


def test_compiling_without_state_says_every_call_starts_cold(monkeypatch):
    """Traced for a target that passes no state (nequip's `ase`, `pair_nequip`) and without
    the state cache, the DEQ says at compile time that it will start cold at every call and
    names the warm routes; traced with a state input it says nothing."""
    from nequip_deq.nn.fixed_point import layer as fixed_point

    monkeypatch.setattr(fixed_point, "_call_mode", lambda: "traced")
    # torch.while_loop runs only under export: the eager loops stand in for the traced ones
    monkeypatch.setattr(DEQEquiformerLayer, "_iterate_traced", DEQEquiformerLayer._iterate)
    monkeypatch.setattr(DEQEquiformerLayer, "_adjoint_traced", lambda self, *a: DEQEquiformerLayer._adjoint(self, *a)[:3])
    model = build("float64", f_tol=1e-6, b_tol=1e-6)
    data = graph(rattled("CH3CHO", 0))
    with pytest.warns(UserWarning, match=r"start its solves cold.*--target ase_deq.*enable_DEQStateCache"):
        model(dict(data))
    given = dict(data)
    given["deq_state"] = torch.zeros(7, deq_layer(model).injection.norm.irreps.dim, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(given)
