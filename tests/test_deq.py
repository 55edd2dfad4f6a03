"""DEQEquiformerModel beyond the harness: exact forces through the fixed point, solver
residuals, warm start (same results, fewer iterations, cold fallback), refusal of partial
forces, failure reporting, parameter gradients in training, TorchScript, bad settings."""

import warnings

import numpy as np
import pytest
import torch
from ase.build import molecule

from nequip.data import AtomicDataDict, compute_neighborlist_, from_ase
from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform
from nequip.nn import PartialForceOutput
from nequip.utils.global_state import set_global_state

from nequip_deq._compile_targets import solver_limits
from nequip_deq._keys import FRAME_INDEX_KEY
from nequip_deq.integrations.ase import DEQCalculator, check_solves
from nequip_deq.model import DEQEquiformerModel, InvalidModelConfig
from nequip_deq.nn.fixed_point import DEQEquiformerLayer, FixedPointError, PartialForcesNotExact
from nequip_deq.train.fixed_point_store import FixedPointStore

TYPES = ["H", "C", "O"]
R_MAX = 3.5
TOL = {"float64": 1e-10, "float32": 1e-5}


def build(dtype="float64", **overrides):
    set_global_state()
    kwargs = dict(
        seed=5, model_dtype=dtype, type_names=TYPES, r_max=R_MAX, l_max=2,
        irreps_node_features="8x0e+4x1o+4x2e", num_heads=2, num_basis=8,
        radial_mlp_width=16, num_output_features=16,
        f_tol=TOL[dtype], b_tol=TOL[dtype], f_max_iter=200, b_max_iter=200,
    )
    kwargs.update(overrides)
    model = DEQEquiformerModel(**kwargs)
    model.eval()
    return model


def mapper():
    return ChemicalSpeciesToAtomTypeMapper(
        model_type_names=TYPES, chemical_species_to_atom_type_map={t: t for t in TYPES}
    )


def graph(atoms):
    return mapper()(compute_neighborlist_(from_ase(atoms), r_max=R_MAX))


def rattled(name, seed, amount=0.1):
    atoms = molecule(name)
    atoms.rattle(amount, seed=seed)
    return atoms


def deq_layer(model) -> DEQEquiformerLayer:
    return next(m for m in model.modules() if isinstance(m, DEQEquiformerLayer))


def central_difference_forces(model, data, eps, atoms_to_check):
    pos = data[AtomicDataDict.POSITIONS_KEY]
    numeric = torch.zeros(len(atoms_to_check), 3, dtype=torch.float64)
    for row, atom in enumerate(atoms_to_check):
        for k in range(3):
            energies = []
            for sign in (1, -1):
                shifted = dict(data)
                shifted[AtomicDataDict.POSITIONS_KEY] = pos.clone()
                shifted[AtomicDataDict.POSITIONS_KEY][atom, k] += sign * eps
                energies.append(float(model(shifted)[AtomicDataDict.TOTAL_ENERGY_KEY].detach()))
            numeric[row, k] = -(energies[0] - energies[1]) / (2 * eps)
    return numeric


@pytest.mark.parametrize("dtype, eps, atol", [("float64", 1e-4, 1e-6), ("float32", 1e-2, 2e-3)])
def test_forces_are_minus_dE_dx(dtype, eps, atol):
    """Central differences of the reported energy equal the reported forces: the fixed point
    moves with the atoms and the adjoint accounts for it."""
    model = build(dtype)
    data = graph(rattled("CH3CHO", 0))
    out = model(dict(data))
    assert int(out["deq_iterations"][0]) > 5  # it really iterates
    atoms_to_check = [0, 3]
    numeric = central_difference_forces(model, data, eps, atoms_to_check)
    analytic = out[AtomicDataDict.FORCE_KEY].detach().double()[atoms_to_check]
    assert analytic.abs().max() > 1e-2
    torch.testing.assert_close(analytic, numeric, atol=atol, rtol=0)


def test_phantom_gradient_is_not_exact():
    """The phantom-gradient option is there for comparison; its forces are measurably not
    -dE/dx (why it is not the default)."""
    model = build("float64", gradient="phantom", train_unroll_steps=1)
    data = graph(rattled("CH3CHO", 0))
    out = model(dict(data))
    numeric = central_difference_forces(model, data, 1e-4, [0, 3])
    analytic = out[AtomicDataDict.FORCE_KEY].detach().double()[[0, 3]]
    assert (analytic - numeric).abs().max() > 1e-3


def test_residuals_below_tolerance():
    """The reported statistics are true: recomputing f at the returned z* and the adjoint
    equation at the returned v* gives residuals below the tolerances."""
    model = build("float64")
    data = graph(rattled("CH3CH2OH", 1))
    out = model(dict(data))
    layer = deq_layer(model)
    assert float(out["deq_residual"][0]) <= TOL["float64"]
    assert float(out["deq_adjoint_residual"][0]) <= TOL["float64"]
    # independent check on the returned solutions, with the encoder output of this call
    d = dict(out)
    x = out[AtomicDataDict.NODE_FEATURES_KEY]
    assert x.shape == out["deq_state"].shape
    # node_features in the output is the encoder output (the DEQ layer writes only its fields)
    x_hat = layer.injection.normalize(x.detach())
    z = out["deq_state"].detach().requires_grad_(True)
    fz = layer.f(z, d, x_hat, layer.edge_weights(d))
    assert float(((fz - z).norm() / fz.norm()).detach()) < 1e-9
    g = torch.autograd.grad(layer.energy(z, d).sum(), z, retain_graph=True)[0]
    v = out["deq_adjoint_state"]
    jtv = torch.autograd.grad(fz, z, v)[0]
    assert float((g + jtv - v).norm() / (g + jtv).norm()) < 1e-9


def test_every_atom_of_a_large_box_meets_the_tolerance():
    """The convergence test is per atom: on a periodic box of 1125 atoms, every atom's
    forward and adjoint residual is below the tolerance (relative to the frame's RMS norm),
    not just the frame as a whole (a frame norm divides one atom's error by sqrt(N))."""
    tol = 1e-4
    model = build("float64", f_tol=tol, b_tol=tol)
    box = rattled("CH3CH2OH", 3, 0.05)
    box.center()
    box.cell = [5.0, 5.0, 5.0]
    box.pbc = True
    box = box.repeat((5, 5, 5))
    box.rattle(0.05, seed=4)
    assert len(box) >= 1000
    data = graph(box)
    out = model(dict(data))
    layer = deq_layer(model)
    x_hat = layer.injection.normalize(out[AtomicDataDict.NODE_FEATURES_KEY].detach())
    z = out["deq_state"].detach().requires_grad_(True)
    fz = layer.f(z, dict(out), x_hat, layer.edge_weights(dict(out)))
    g = torch.autograd.grad(layer.energy(z, dict(out)).sum(), z, retain_graph=True)[0]
    adjoint = g + torch.autograd.grad(fz, z, out["deq_adjoint_state"])[0]
    for new, old in ((fz.detach(), z.detach()), (adjoint, out["deq_adjoint_state"])):
        per_atom = (new - old).norm(dim=-1) / new.square().sum(-1).mean().sqrt()
        assert float(per_atom.max()) <= tol, float(per_atom.max())


def calculator(model, warm_start=True, **kwargs):
    return DEQCalculator(
        model, device="cpu", warm_start=warm_start,
        transforms=[mapper(), NeighborListTransform(r_max=R_MAX)], **kwargs,
    )


def short_trajectory(name="CH3CH2OH", steps=6, seed=0):
    """Consecutive geometries 0.01 Å apart, like MD steps."""
    atoms = rattled(name, seed, 0.05)
    rng = np.random.default_rng(seed)
    velocity = rng.normal(size=(len(atoms), 3))
    velocity *= 0.01 / np.abs(velocity).max()
    frames = []
    for _ in range(steps):
        frames.append(atoms.copy())
        atoms.positions += velocity
    return frames


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


def single_frame(atoms):
    """What pair_style nequip passes: one frame, no batch fields, no state."""
    data = graph(atoms)
    return {k: v for k, v in data.items() if k not in (AtomicDataDict.BATCH_KEY, AtomicDataDict.NUM_NODES_KEY)}


def with_state_cache(model, **kwargs):
    from nequip.model.modify_utils import modify

    return modify(model, [{"modifier": "enable_DEQStateCache", **kwargs}])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_state_cache_warm_starts_callers_that_pass_no_state(dtype):
    """With enable_DEQStateCache the model keeps its last fixed point: consecutive MD steps
    start warm (fewer iterations) and give the cold results within the tolerance; another
    system, permuted atoms or a system over the capacity start cold and give identical
    results."""
    cached = with_state_cache(build(dtype, f_tol=1e-5, b_tol=1e-5))
    assert cached.metadata["deq_state_cache_atoms"] == "10000"
    plain = build(dtype, f_tol=1e-5, b_tol=1e-5)
    iters = lambda out: int(out["deq_iterations"][0] + out["deq_adjoint_iterations"][0])  # noqa: E731
    cold_iters, warm_iters = [], []
    for atoms in short_trajectory(steps=4):
        out, ref = cached(single_frame(atoms)), plain(single_frame(atoms))
        torch.testing.assert_close(out["forces"], ref["forces"], atol=1e-4, rtol=0)
        warm_iters.append(iters(out))
        cold_iters.append(iters(ref))
    # nothing stored at first; then the previous z*; then extrapolated from the last two
    assert warm_iters[0] == cold_iters[0]
    assert warm_iters[1] < 0.8 * cold_iters[1], (cold_iters, warm_iters)
    assert max(warm_iters[2:]) < 0.5 * min(cold_iters[2:]), (cold_iters, warm_iters)

    def cold_start_exact(atoms, model):
        out, ref = model(single_frame(atoms)), plain(single_frame(atoms))
        assert iters(out) == iters(ref)
        torch.testing.assert_close(out["forces"], ref["forces"], atol=0, rtol=0)

    permuted = short_trajectory(steps=4)[-1]
    permuted.positions = permuted.positions[::-1].copy()
    permuted.numbers = permuted.numbers[::-1].copy()  # same structure, atoms renumbered
    cold_start_exact(permuted, cached)
    cold_start_exact(rattled("CH3CHO", 0), cached)
    small = with_state_cache(build(dtype, f_tol=1e-5, b_tol=1e-5), capacity=4)
    for atoms in short_trajectory(steps=2):  # 9 atoms > 4: always cold
        cold_start_exact(atoms, small)


@pytest.mark.parametrize("scheme", ["quadratic", "xlbomd"])
def test_state_cache_starts_as_the_calculator_does(scheme, monkeypatch):
    """Over an MD trajectory long enough for the extended-Lagrangian recurrence to take over,
    the in-model cache (scheme from NEQUIP_DEQ_EXTRAPOLATION, recorded in the metadata) starts
    every call where DEQCalculator with the same extrapolation starts it: the same iteration
    counts and fixed points, call by call; a bad scheme is refused."""
    from nequip_deq.nn.extrapolation import XLBOMD_ORDER

    monkeypatch.setenv("NEQUIP_DEQ_EXTRAPOLATION", scheme)
    model = build("float64", f_tol=1e-4, b_tol=1e-4)
    cached = with_state_cache(build("float64", f_tol=1e-4, b_tol=1e-4))
    assert cached.metadata["deq_state_cache_extrapolation"] == scheme
    calc = calculator(model, extrapolation=scheme)
    for atoms in short_trajectory(steps=XLBOMD_ORDER + 4):
        out = cached(single_frame(atoms))
        calc.get_forces(atoms.copy())
        assert int(out["deq_iterations"][0]) == calc.results["deq_iterations"]
        assert int(out["deq_adjoint_iterations"][0]) == calc.results["deq_adjoint_iterations"]
        torch.testing.assert_close(out["deq_state"], calc._starts.solutions[0][0], atol=1e-12, rtol=0)
    monkeypatch.setenv("NEQUIP_DEQ_EXTRAPOLATION", "cubic")
    with pytest.raises(ValueError, match=r"extrapolation 'cubic' \(from `extrapolation` or NEQUIP_DEQ_EXTRAPOLATION\)"):
        with_state_cache(build("float64"))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_solver_limits_are_recorded_for_compiled_models(dtype):
    """The model's metadata carries its solver tolerances (floored in float32, as the solves
    are) and iteration caps, which calculators and checks read back."""
    model = build(dtype, f_tol=1e-7, b_tol=1e-4, f_max_iter=33, b_max_iter=44)
    limits = solver_limits(deq_layer(model)._get_metadata_contributions())
    f_tol = 2e-6 if dtype == "float32" else 1e-7
    assert limits == {"f_tol": f_tol, "f_max_iter": 33, "b_tol": 1e-4, "b_max_iter": 44}


def test_deploy_time_tolerances(monkeypatch):
    """set_DEQSolverTolerances changes a trained model's solver settings for deployment, from
    arguments or (as nequip-compile's --modifiers passes none) from NEQUIP_DEQ_* variables,
    and the metadata a compiled model records follows; bad or missing values are refused."""
    from nequip.model.modify_utils import modify

    model = modify(build("float64", f_tol=1e-8), [{"modifier": "set_DEQSolverTolerances", "f_tol": 1e-3}])
    assert solver_limits(deq_layer(model)._get_metadata_contributions())["f_tol"] == 1e-3
    monkeypatch.setenv("NEQUIP_DEQ_B_TOL", "2e-4")
    monkeypatch.setenv("NEQUIP_DEQ_F_MAX_ITER", "170")
    model = modify(build("float64"), [{"modifier": "set_DEQSolverTolerances"}])
    limits = solver_limits(deq_layer(model)._get_metadata_contributions())
    assert (limits["b_tol"], limits["f_max_iter"], limits["f_tol"]) == (2e-4, 170, TOL["float64"])
    loose = calculator(model)
    loose.get_forces(rattled("CH3CH2OH", 0))
    assert loose.results["deq_adjoint_residual"] <= 2e-4 and loose.results["deq_residual"] <= TOL["float64"]
    monkeypatch.setenv("NEQUIP_DEQ_F_TOL", "tight")
    with pytest.raises(ValueError, match="NEQUIP_DEQ_F_TOL='tight' is not a float"):
        modify(build("float64"), [{"modifier": "set_DEQSolverTolerances"}])
    for name in ("NEQUIP_DEQ_F_TOL", "NEQUIP_DEQ_B_TOL", "NEQUIP_DEQ_F_MAX_ITER"):
        monkeypatch.delenv(name)
    with pytest.raises(ValueError, match="got no setting.*NEQUIP_DEQ_F_TOL"):
        modify(build("float64"), [{"modifier": "set_DEQSolverTolerances"}])
    with pytest.raises(ValueError, match="b_tol = -1.0 must be > 0"):
        modify(build("float64"), [{"modifier": "set_DEQSolverTolerances", "b_tol": -1.0}])


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


def test_starting_point_extrapolations():
    """Each scheme reproduces the polynomials it is exact for, drops to the order the history
    allows, and an unknown name is refused."""
    from nequip_deq.nn.extrapolation import extrapolate

    t = torch.arange(4.0)
    history = [((2 + 3 * t[i] + t[i] ** 2) * torch.ones(2), -(t[i] ** 2) * torch.ones(2)) for i in (2, 1, 0)]
    target = 2 + 3 * 3.0 + 9.0
    assert torch.allclose(extrapolate(history, "quadratic")[0], torch.full((2,), target))
    assert torch.allclose(extrapolate(history, "quadratic")[1], torch.full((2,), -9.0))
    assert torch.allclose(extrapolate(history, "linear")[0], torch.full((2,), 2 * 12.0 - 6.0))
    assert torch.allclose(extrapolate(history, "previous")[0], torch.full((2,), 12.0))
    aspc = extrapolate(history, "aspc")[0]  # exact to first order: between previous and quadratic
    assert 12.0 < float(aspc[0]) < target
    assert torch.allclose(extrapolate(history[:2], "quadratic")[0], torch.full((2,), 18.0))
    assert torch.allclose(extrapolate(history[:1], "aspc")[0], torch.full((2,), 12.0))
    with pytest.raises(ValueError, match="extrapolation 'cubic'"):
        DEQCalculator(build("float64"), device="cpu", extrapolation="cubic")


def test_extended_lagrangian_start():
    """xlbomd: quadratic starts until K + 1 steps of history exist; then the auxiliary state
    follows a linear trajectory exactly (its dissipation vanishes on linear histories), comes
    back to a constant solution from a disturbed start without blowing up, and tracks a smooth
    oscillation; every other scheme leaves no auxiliary state."""
    from nequip_deq.nn.extrapolation import XLBOMD_ORDER, StartingPoints

    def state(value):
        return value * torch.ones(3), -value * torch.ones(3)

    starts = StartingPoints("xlbomd")
    assert starts.start() is None
    for n in range(XLBOMD_ORDER + 4):
        starts.record(state(1.0 + 0.5 * n))
        if n >= 2:  # quadratic during the warm-up, the recurrence after it: both exact here
            assert torch.allclose(starts.start()[0], torch.full((3,), 1.0 + 0.5 * (n + 1)))
            assert torch.allclose(starts.start()[1], torch.full((3,), -(1.0 + 0.5 * (n + 1))))
    assert len(starts.auxiliary) == XLBOMD_ORDER + 1
    starts._next = state(1.5)  # a solve that started far off ...
    for _ in range(1000):  # ... and a solution that no longer moves
        starts.record(state(1.0))
    assert torch.allclose(starts.start()[0], torch.ones(3), atol=1e-6)
    starts.reset()
    errors = []
    for n in range(400):
        starts.record(state(float(np.sin(0.05 * n))))
        if n > 50:
            errors.append(abs(float(starts.start()[0][0]) - np.sin(0.05 * (n + 1))))
    assert max(errors) < 0.01, max(errors)
    quadratic = StartingPoints("quadratic")
    quadratic.record(state(1.0))
    assert quadratic.auxiliary == [] and torch.allclose(quadratic.start()[0], torch.ones(3))


def test_extended_lagrangian_recurrence_is_time_reversible_without_damping():
    """The auxiliary state's Verlet step without its dissipative term, run backwards from its
    newest states with the same solutions in reverse order, retraces its states to round-off;
    with the dissipation of Niklasson et al. it does not (which is the dissipation's purpose)."""
    from nequip_deq.nn.extrapolation import XLBOMD_ORDER as K, xlbomd_coefficients, xlbomd_start

    kappa, damping = xlbomd_coefficients()
    rng = np.random.default_rng(0)
    for weights, reversible in (([0.0] * (K + 1), True), (damping, False)):
        states = [torch.as_tensor(rng.normal(size=(4, 5))) for _ in range(K + 1)]  # oldest first
        solutions = {}
        for n in range(K, K + 50):  # p_{n+1} from p_n, p_{n-1}, ... and z*_n
            solutions[n] = torch.as_tensor(rng.normal(size=(4, 5)))
            states.append(xlbomd_start(torch.stack(states[::-1][: K + 1]), solutions[n], kappa, weights))
        back = states[::-1][: K + 1]  # time reversed: p_m, ..., p_{m-K}, the newest last
        for n in range(len(states) - 1 - K, K, -1):  # p_{n-1} from p_n, p_{n+1}, ... and z*_n
            back.append(xlbomd_start(torch.stack(back[::-1][: K + 1]), solutions[n], kappa, weights))
        error = float((back[-1] - states[K]).abs().max())
        assert (error < 1e-9) == reversible, (reversible, error)


def test_tf32_raises_the_float32_tolerance_floor():
    """With TF32 matrix products (nequip-compile --tf32, nequip's TF32 scheduler) a float32
    solve cannot reach 1e-4 reliably: the tolerance is floored at 1e-3, in the solves and in
    the limits a compiled model records."""
    from nequip_deq.nn.solvers import tolerance_floor

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


def test_compiled_solves_are_checked_by_the_calculator():
    """A compiled model can neither warn nor raise: DEQCalculator checks each call's results
    against the recorded limits, names the call, and raises on non-finite values."""
    limits = {"f_tol": 1e-4, "f_max_iter": 30, "b_tol": 1e-4, "b_max_iter": 30}
    out = {AtomicDataDict.TOTAL_ENERGY_KEY: torch.zeros(1, 1), AtomicDataDict.FORCE_KEY: torch.zeros(3, 3)}
    results = {"deq_residual": 5e-5, "deq_iterations": 7, "deq_adjoint_residual": 2e-5,
               "deq_adjoint_iterations": 5}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_solves(results, out, limits, call=3)  # converged: silent
    with pytest.warns(UserWarning, match=r"adjoint solve at call 12 ended at relative residual 0.003 .*after 30 iterations \(cap 30\)"):
        check_solves({**results, "deq_adjoint_residual": 3e-3, "deq_adjoint_iterations": 30}, out, limits, call=12)
    with pytest.raises(FixedPointError, match="non-finite values at call 4"):
        check_solves({**results, "deq_residual": float("nan")}, out, limits, call=4)
    bad = {**out, AtomicDataDict.FORCE_KEY: torch.full((3, 3), float("inf"))}
    with pytest.raises(FixedPointError, match="non-finite"):
        check_solves(results, bad, limits, call=5)


def test_compiling_without_state_says_every_call_starts_cold(monkeypatch):
    """Traced for a target that passes no state (nequip's `ase`, `pair_nequip`) and without
    the state cache, the DEQ says at compile time that it will start cold at every call and
    names the warm routes; traced with a state input it says nothing."""
    from nequip_deq.nn import fixed_point

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


def test_state_cache_keeps_no_unconverged_state():
    """A solve that stops at its cap leaves nothing in the cache: the next step starts cold
    (same iterations as the plain model) instead of from an unconverged state."""
    cached = with_state_cache(build("float64", f_max_iter=3))
    plain = build("float64", f_max_iter=3)
    layer = deq_layer(cached)
    for atoms in short_trajectory(steps=2):
        with pytest.warns(UserWarning, match="did not reach the tolerance"):
            out, ref = cached(single_frame(atoms)), plain(single_frame(atoms))
        assert int(layer.state_cache.num_atoms[0]) == -1
        torch.testing.assert_close(out["deq_state"], ref["deq_state"], atol=0, rtol=0)


def test_state_cache_is_off_in_training_and_batches():
    """Training and batched calls never read or write the cache."""
    model = with_state_cache(build("float64"))
    layer = deq_layer(model)
    batch = AtomicDataDict.batched_from_list([graph(rattled("CH3CHO", 0)), graph(rattled("CH3CHO", 1))])
    model(batch)
    assert int(layer.state_cache.num_atoms[0]) == -1
    model.train()
    model(single_frame(rattled("CH3CHO", 0)))
    assert int(layer.state_cache.num_atoms[0]) == -1
    model.eval()
    model(single_frame(rattled("CH3CHO", 0)))
    assert int(layer.state_cache.num_atoms[0]) == 7


def test_partial_forces_are_refused():
    """Per-atom energy gradients need one adjoint per atom: the model says so instead of
    returning inexact numbers."""
    model = build("float64")
    model.model = PartialForceOutput(model.model.func)
    with pytest.raises(PartialForcesNotExact, match="total energy"):
        model(dict(graph(rattled("CH3CHO", 0))))


def test_unconverged_solve_is_reported_and_nonfinite_raises():
    model = build("float64", f_max_iter=3)
    data = graph(rattled("CH3CHO", 0))
    with pytest.warns(UserWarning, match=r"forward solve did not reach the tolerance .*after \[3\]"):
        out = model(dict(data))
    assert float(out["deq_residual"][0]) > TOL["float64"]
    model = build("float64")
    with torch.no_grad():
        deq_layer(model).blocks[0].ffn.parameters().__next__().fill_(float("nan"))
    with pytest.raises(FixedPointError, match="non-finite"):
        model(dict(data))


def loss_gradient_errors(model, data, names, rng, eps=1e-5):
    """Relative errors of d(force loss)/d(theta) in training mode against central differences
    of the converged (evaluation-mode) loss, one random entry of each named parameter."""
    target = torch.randn(data[AtomicDataDict.POSITIONS_KEY].shape, dtype=torch.float64)

    def loss():
        out = model(dict(data))
        return (out[AtomicDataDict.FORCE_KEY] - target).square().mean()

    params = dict(model.named_parameters())
    model.train()
    grads = torch.autograd.grad(loss(), [params[n] for n in names])
    model.eval()
    errors = []
    for name, grad in zip(names, grads):
        flat = params[name].detach().view(-1)
        idx = int(rng.integers(flat.numel()))
        with torch.no_grad():
            flat[idx] += eps
        up = float(loss())
        with torch.no_grad():
            flat[idx] -= 2 * eps
        down = float(loss())
        with torch.no_grad():
            flat[idx] += eps
        numeric = (up - down) / (2 * eps)
        errors.append(abs(float(grad.view(-1)[idx]) - numeric) / max(abs(numeric), 1e-8))
    return errors


# parameters of the encoder, of f (attention, radial MLP, feed-forward, LayerScale) and of
# the readout: the implicit gradient reaches all three
SPREAD = [
    "model.func.type_embed.embed_module.weight",
    "model.func.edge_degree_embed.radial.mlp.0.weight",
    "model.func.deq.blocks.0.branch_scales",
    "model.func.deq.blocks.0.attn.radial.mlp.2.weight",
    "model.func.deq.blocks.0.attn.value.dtp.tp.weight",
    "model.func.deq.blocks.0.ffn.gated.linear.bias",
    "model.func.deq.readout.0.attn.lin_dst.weight",
    "model.func.deq.readout.1.mlp_module.mlp.0.weight",
]


def test_implicit_training_gradient_matches_finite_differences():
    """Training differentiates the forces again (force loss -> parameters). The implicit
    training gradient (the default: one backward fixed-point solve, default grad_tol) agrees
    with central differences of the loss computed by converged solves, for parameters of
    the encoder, of f and of the readout; the unrolled gradient (K=3) does not."""
    data = graph(rattled("CH3CH2OH", 3))
    model = build("float64", f_tol=1e-11, b_tol=1e-11, f_max_iter=300, b_max_iter=300)
    assert deq_layer(model).train_implicit and deq_layer(model).grad_tol == 1e-6
    errors = loss_gradient_errors(model, data, SPREAD, np.random.default_rng(0))
    assert np.median(errors) <= 1e-4 and max(errors) <= 1e-3, errors
    # the backward solve reports its statistics (logged by nequip_deq.train)
    stats = deq_layer(model).last_backward_statistics
    assert int(stats["iterations"][0]) > 1 and float(stats["residual"][0]) <= 1e-6

    unrolled = build(
        "float64", f_tol=1e-11, b_tol=1e-11, f_max_iter=300, b_max_iter=300,
        train_gradient="unroll", train_unroll_steps=3,
    )
    errors = loss_gradient_errors(unrolled, data, SPREAD, np.random.default_rng(0))
    assert np.median(errors) > 1e-3, errors


def test_forces_in_training_are_the_evaluation_forces():
    """The implicit attachment changes gradients w.r.t. parameters only: forces computed in
    training mode equal those of evaluation mode (to the solver tolerance)."""
    model = build("float64")
    data = graph(rattled("CH3CH2OH", 4))
    ref = model(dict(data))[AtomicDataDict.FORCE_KEY]
    model.train()
    out = model(dict(data))[AtomicDataDict.FORCE_KEY]
    torch.testing.assert_close(out.detach(), ref.detach(), atol=1e-8, rtol=0)


def test_warm_started_training_same_results_fewer_iterations():
    """The training store (warm_start_training) starts each frame's solves from its last
    fixed point: the same forces and loss gradient within the tolerances, fewer forward and
    adjoint iterations; frames it has not seen (or that changed size) start cold."""
    model = build("float64", f_tol=1e-8, b_tol=1e-8, grad_tol=1e-8)
    frames = [graph(rattled("CH3CH2OH", 6)), graph(rattled("CH3CHO", 7))]
    for index, frame in enumerate(frames):
        frame[FRAME_INDEX_KEY] = torch.tensor([10 + index])
    batch = AtomicDataDict.batched_from_list(frames)
    store = FixedPointStore()
    model.train()

    def step(b):
        out = model(b)
        param = deq_layer(model).blocks[0].attn.lin_src.weight
        (grad,) = torch.autograd.grad(out[AtomicDataDict.FORCE_KEY].square().sum(), [param])
        return out, grad

    assert store.warm_start(dict(batch)) == 0.0  # has frame keys, nothing stored: cold
    cold, cold_grad = step(dict(batch))
    store.remember(batch, cold)
    assert len(store) == 2
    warm_batch = dict(batch)
    assert store.warm_start(warm_batch) == 1.0
    warm, warm_grad = step(warm_batch)
    torch.testing.assert_close(warm["forces"], cold["forces"], atol=1e-6, rtol=0)
    torch.testing.assert_close(warm_grad, cold_grad, atol=1e-5 * float(cold_grad.abs().max()), rtol=0)
    for key in ("deq_iterations", "deq_adjoint_iterations"):
        assert (warm[key] < cold[key]).all(), (key, warm[key], cold[key])
    # a batch with an unseen frame: that frame starts cold, the known one warm
    other = graph(rattled("CH3CH2OH", 8))
    other[FRAME_INDEX_KEY] = torch.tensor([99])
    mixed = AtomicDataDict.batched_from_list([frames[0], other])
    assert store.warm_start(mixed) == 0.5
    n0 = frames[0][AtomicDataDict.POSITIONS_KEY].shape[0]
    assert mixed["deq_state"][:n0].abs().sum() > 0 and mixed["deq_state"][n0:].abs().sum() == 0
    # without frame keys the store does nothing and says so
    assert store.warm_start(dict(graph(rattled("CH3CH2OH", 9)))) is None


def test_train_time_compile_trains_eagerly_and_says_so():
    """nequip's `compile_mode: compile` would trace away the exact training gradient: the
    DEQ builds its eager model instead (so nequip-package, which builds every compile mode,
    can package it), says so, and trains with the same exact gradient."""
    from nequip.nn.compile import CompileGraphModel

    with pytest.warns(UserWarning, match=r"does not compile at train time .*runs eagerly"):
        model = build("float64", compile_mode="compile")
    assert not isinstance(model, CompileGraphModel)
    reference = build("float64")
    data = graph(rattled("CH3CHO", 0))
    for m in (model, reference):
        m.train()
    grads = [
        torch.autograd.grad(m(dict(data))[AtomicDataDict.FORCE_KEY].square().sum(),
                            [deq_layer(m).blocks[0].attn.lin_src.weight])[0]
        for m in (model, reference)
    ]
    torch.testing.assert_close(grads[0], grads[1], atol=1e-10, rtol=0)


def test_unconverged_backward_solve_warns():
    model = build("float64", grad_max_iter=2)
    data = graph(rattled("CH3CH2OH", 5))
    model.train()
    out = model(dict(data))
    with pytest.warns(UserWarning, match="backward solve did not reach"):
        out[AtomicDataDict.FORCE_KEY].square().sum().backward()


V2_BLOCKS = dict(block_type="v2", l_max=3, irreps_node_features="4x0e+4x1o+4x2e+4x3o", m_max=2)


@pytest.mark.parametrize("blocks", [{}, V2_BLOCKS], ids=["v1", "v2"])
def test_torchscript_matches_eager(blocks):
    """Scripted (nequip's TorchScript build, the deployment path on torch < 2.10), the model
    runs its own solver loops and gives the eager numbers and iteration counts, with
    Equiformer (v1) and EquiformerV2 (v2) blocks; the state cache starts the next call warm."""
    from e3nn.util.jit import script
    from nequip.utils.compile import conditional_torchscript_mode

    set_global_state()
    with conditional_torchscript_mode(True):
        model = build("float64", **blocks)
    data = graph(rattled("CH3CHO", 0))
    ref = model(dict(data))
    scripted = script(model)
    out = scripted(dict(data))
    for key in (AtomicDataDict.TOTAL_ENERGY_KEY, AtomicDataDict.FORCE_KEY):
        torch.testing.assert_close(out[key], ref[key], atol=1e-9, rtol=0)
    assert torch.equal(out["deq_iterations"], ref["deq_iterations"])
    assert torch.equal(out["deq_adjoint_iterations"], ref["deq_adjoint_iterations"])
    # the in-model state cache scripts too: the second call of the same frame starts warm
    with conditional_torchscript_mode(True):
        cached = script(with_state_cache(build("float64", **blocks)))
    first, second = cached(single_frame(rattled("CH3CHO", 0))), cached(single_frame(rattled("CH3CHO", 0)))
    assert int(second["deq_iterations"][0]) < int(first["deq_iterations"][0])
    torch.testing.assert_close(second["forces"], first["forces"], atol=1e-8, rtol=0)


def test_callers_that_check_nothing_get_an_error_not_inexact_forces():
    """Scripted or compiled and called without a state (LAMMPS pair_style nequip), a model
    whose solve ends above its tolerance at the cap, or gives non-finite values, raises with
    the reason and the fix instead of returning the forces; with a state passed (DEQCalculator,
    which checks the results itself) it returns them."""
    from e3nn.util.jit import script
    from nequip.utils.compile import conditional_torchscript_mode

    set_global_state()
    with conditional_torchscript_mode(True):
        capped = script(with_state_cache(build("float64", f_max_iter=3)))
        model = script(build("float64"))
    frame = single_frame(rattled("CH3CHO", 0))
    with pytest.raises(torch.jit.Error, match="ended above its tolerance at its iteration cap.*NEQUIP_DEQ_F_MAX_ITER"):
        capped(dict(frame))
    broken = dict(frame)
    broken[AtomicDataDict.POSITIONS_KEY] = broken[AtomicDataDict.POSITIONS_KEY].clone()
    broken[AtomicDataDict.POSITIONS_KEY][0, 0] = float("nan")
    with pytest.raises(torch.jit.Error, match="non-finite values"):
        model(broken)
    width = deq_layer(build("float64")).injection.norm.irreps.dim
    broken["deq_state"] = torch.zeros(7, width, dtype=torch.float64)
    assert not torch.isfinite(model(broken)[AtomicDataDict.FORCE_KEY]).all()


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_torchdeq_training_solvers(solver):
    """In training the forward solve may use torchdeq's solvers (per frame, packed); they
    reach the fixed point of the evaluation iteration."""
    model = build("float64", solver=solver, f_tol=1e-9)
    frames = [graph(rattled("CH3CHO", 1)), graph(rattled("CH3CH2OH", 2))]
    batch = AtomicDataDict.batched_from_list(frames)
    ref = model(dict(batch))
    model.train()
    out = model(dict(batch))
    torch.testing.assert_close(out["deq_state"], ref["deq_state"], atol=1e-6, rtol=0)
    assert (out["deq_residual"] < 1e-8).all()


@pytest.mark.parametrize(
    "override, words",
    [
        ({"f_tol": 0.0}, ["f_tol=0.0"]),
        ({"b_max_iter": 1}, ["b_max_iter=1"]),
        ({"damping": 1.5}, ["damping=1.5", "(0, 1]"]),
        ({"injection": "multiply"}, ["injection='multiply'", "add", "concat"]),
        ({"solver": "newton"}, ["solver='newton'", "anderson"]),
        ({"gradient": "one-step"}, ["gradient='one-step'", "implicit", "phantom"]),
        ({"train_gradient": "exact"}, ["train_gradient='exact'", "implicit", "unroll"]),
        ({"grad_tol": 2.0}, ["grad_tol=2.0"]),
        ({"grad_max_iter": 0}, ["grad_max_iter=0"]),
        ({"num_layers": 3}, ["num_layers", "num_deq_layers"]),
        ({"num_deq_layers": 0}, ["num_deq_layers=0"]),
        ({"norm_eps": 0.0}, ["norm_eps=0.0"]),
        ({"branch_scale": -1.0}, ["branch_scale=-1.0"]),
        ({"num_heads": 3}, ["num_heads=3", "does not divide"]),
    ],
)
def test_bad_settings_are_refused(override, words):
    with pytest.raises(InvalidModelConfig) as err:
        build("float32", **override)
    for word in words:
        assert word in str(err.value), str(err.value)
