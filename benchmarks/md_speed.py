"""Time per MD step of compiled models, side by side in one run: the warm-started DEQ (through
ASE with ``--target ase_deq`` and called as LAMMPS' ``pair_style nequip`` calls it, with
``--target pair_nequip_deq --modifiers enable_DEQStateCache``), the same DEQ started cold, the
explicit 6-block EquiformerModel of the DEQ's width and nequip's NequIP with the same irreps.

    python benchmarks/md_speed.py --deq-checkpoint outputs/qs_deq/train/best.ckpt \\
        [--tolerance 1e-3] [--extrapolation xlbomd] [--work outputs/md_speed] [--steps 200] [--box-grid 3] [--box-steps 40]

Systems: rMD17 aspirin (21 atoms) and a periodic box of ``box-grid``³ aspirin molecules
(567 atoms at the default 3). The trajectory is NVE velocity Verlet at 0.5 fs from 300 K run
by the warm DEQ through ASE; every other model and route is timed on the same frames (the cost
of a call does not depend on the weights, so the comparison models only need the DEQ's
architecture: see ``comparison_models.py``). ms per step = one energy + forces call. The DEQ
solves run at ``--tolerance`` (default: the model's), passed with each call through ASE and
compiled in with ``set_DEQSolverTolerances`` for the pair-style call, from the starting points
``--extrapolation`` (``quadratic`` or ``xlbomd``; ASE and the state cache alike).

The floor: with eager timings of the DEQ's parts, in block-equivalents (one application of
``f`` without graph = 1), the solves and the Lagrangian of a step cost at least ``n_f``
applications of ``f``, one recording of ``f(z*)`` (the adjoint's products and the Lagrangian
share it), ``n_b`` products ``Jᵀv`` and the Lagrangian's backward to the geometry, against 6
blocks forward and backward for the explicit model (the encoder and readout, common to both,
left out). The ratio of that floor to the explicit model's eager call is what a perfectly
compiled DEQ would reach at the measured iteration counts; the table says how close the
compiled ratio comes. A compiled DEQ records ``f(z*)`` anew for each adjoint product (a
``torch.while_loop`` body cannot reuse a recording) and once more for the Lagrangian: its own
floor (printed too) is ``n_b + 1`` recordings higher.
"""

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from ase import units
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

from nequip.data import AtomicDataDict
from nequip.integrations.ase import NequIPCalculator
from nequip.model.inference_models import load_compiled_model
from nequip.scripts._compile_utils import LMP_OUTPUTS, PAIR_NEQUIP_INPUTS

from nequip_deq._keys import SOLVER_STATISTICS
from nequip_deq.integrations.ase import DEQCalculator, load_calculator
from nequip_deq.integrations.lammps import lammps_frame, pair_nequip_inputs
from nequip_deq.nn.fixed_point.layer import DEQEquiformerLayer
from nequip_deq.nn.fixed_point.extrapolation import DEFAULT_SCHEME, XLBOMD_ORDER
from nequip_deq.nn.fixed_point.state_cache import CACHE_SCHEMES

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "lammps"))
import comparison_models  # noqa: E402
from make_data import molecule_in_box, periodic_box  # noqa: E402


def systems(grid: int):
    """``{name: atoms}``: aspirin in a 30 Å box (not periodic) and the periodic box of
    ``grid``³ molecules (none for ``grid`` 0)."""
    found = {"aspirin": molecule_in_box()}
    if grid > 0:
        found[f"box of {grid ** 3} aspirin"] = periodic_box(grid=grid)
    return found


def ase_caller(calc):
    """``atoms -> (seconds, forward + adjoint iterations)`` of one energy + forces call."""
    def call(atoms):
        atoms = atoms.copy()
        calc.reset()  # ASE would return the stored results for the same positions
        atoms.calc = calc
        start = time.perf_counter()
        atoms.get_potential_energy()
        atoms.get_forces()
        seconds = time.perf_counter() - start
        its = calc.results.get("deq_iterations", 0) + calc.results.get("deq_adjoint_iterations", 0)
        return seconds, float(its), atoms.get_forces()
    return call


def pair_caller(path):
    """The same for a model compiled for LAMMPS, called with pair_style nequip's inputs."""
    model, metadata = load_compiled_model(str(path), "cpu", PAIR_NEQUIP_INPUTS, LMP_OUTPUTS + list(SOLVER_STATISTICS))
    r_max, names = float(metadata["r_max"]), metadata["type_names"]

    def call(atoms):
        inputs = pair_nequip_inputs(lammps_frame(atoms), r_max, names)
        start = time.perf_counter()
        out = model(inputs)
        seconds = time.perf_counter() - start
        return seconds, float(out["deq_iterations"] + out["deq_adjoint_iterations"]), None
    return call


def trajectory(calc, atoms, steps: int, dt_fs: float = 0.5):
    """NVE velocity Verlet with ``calc`` from 300 K: the frames, and per call seconds and
    iterations (progress every 50 steps)."""
    atoms = atoms.copy()
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    Stationary(atoms)
    call = ase_caller(calc)
    masses = atoms.get_masses()[:, None]
    dt = dt_fs * units.fs
    seconds, its, forces = call(atoms)
    frames, times, iterations = [atoms.copy()], [seconds], [its]
    velocities = atoms.get_velocities()
    for step in range(1, steps + 1):
        velocities += 0.5 * dt * forces / masses
        atoms.positions += dt * velocities
        seconds, its, forces = call(atoms)
        velocities += 0.5 * dt * forces / masses
        frames.append(atoms.copy())
        times.append(seconds)
        iterations.append(its)
        if step % 50 == 0:
            print(f"   step {step}: {1e3 * np.median(times[1:]):.1f} ms/step, {np.mean(iterations[1:]):.1f} iterations/step", flush=True)
    return frames, np.array(times), np.array(iterations)


def replay(call, frames):
    """Seconds and iterations of ``call`` on each frame, in order."""
    out = [call(frame)[:2] for frame in frames]
    return np.array([o[0] for o in out]), np.array([o[1] for o in out])


def floor(deq_checkpoint: Path, atoms, n_f: float, n_b: float, tolerance=None) -> dict:
    """Eager timings of the DEQ's parts in block-equivalents (one ``f`` without graph = 1);
    the cost of the solves and the Lagrangian of a step at ``n_f`` forward and ``n_b`` adjoint
    iterations, against 6 blocks forward and backward (a block's forward costs about a
    recording of ``f``, its backward about the Lagrangian's)."""
    deq = load_calculator(str(deq_checkpoint), "cpu")
    deq.tolerances = None if tolerance is None else (tolerance, tolerance)
    layer = next(m for m in deq.model.modules() if isinstance(m, DEQEquiformerLayer))
    captured = {}
    handle = layer.register_forward_pre_hook(lambda module, args: captured.setdefault("data", dict(args[0])))
    atoms = atoms.copy()
    atoms.calc = deq
    atoms.get_forces()
    handle.remove()
    data = captured["data"]

    def timed(fn, n=10):
        fn()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - start) / n

    with torch.no_grad():
        x_hat = layer.injection.normalize(data[AtomicDataDict.NODE_FEATURES_KEY])
        weights = layer.edge_weights(data)
        batch = torch.zeros(len(x_hat), dtype=torch.long)
        z = layer._iterate(data, x_hat, weights, torch.zeros_like(x_hat), batch, 1, layer.f_tol)[0]
    detached = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in data.items()}
    inputs = [x_hat.detach().requires_grad_(True)] + [w.detach().requires_grad_(True) for w in weights]
    detached[AtomicDataDict.EDGE_ATTRS_KEY] = detached[AtomicDataDict.EDGE_ATTRS_KEY].requires_grad_(True)
    zz = z.detach().requires_grad_(True)
    v = torch.randn_like(z)
    t_f = timed(lambda: torch.no_grad()(layer.f)(z, data, x_hat, weights))
    fz = layer.f(zz, detached, inputs[0], inputs[1:])
    parts = {
        "f (no graph)": t_f,
        "recording f(z*)": timed(lambda: layer.f(zz, detached, inputs[0], inputs[1:])),
        "product J^T v": timed(lambda: torch.autograd.grad(fz, zz, v, retain_graph=True)),
        "Lagrangian backward": timed(lambda: torch.autograd.grad(
            fz, inputs + [detached[AtomicDataDict.EDGE_ATTRS_KEY]], v, retain_graph=True)),
    }
    deq.reset_state()
    whole = timed(lambda: (deq.reset_state(), deq.calculate(atoms, ["energy", "forces"])), n=3)
    cold_f, cold_b = float(deq.results["deq_iterations"]), float(deq.results["deq_adjoint_iterations"])
    solves = cold_f * t_f + parts["recording f(z*)"] + cold_b * parts["product J^T v"] + parts["Lagrangian backward"]
    parts["encoder, readout, rest"] = max(whole - solves, 0.0)
    # the explicit model's blocks: 6 x (one block forward + its backward), in the same units
    t_explicit = 6 * (parts["recording f(z*)"] + parts["Lagrangian backward"])
    blocks = {k: v / t_f for k, v in parts.items()}
    # the solves and the Lagrangian; the encoder, readout and eager overhead ("rest") are
    # left out: compiled, most of the overhead goes, and the explicit model has them too
    step = n_f + blocks["recording f(z*)"] + n_b * blocks["product J^T v"] + blocks["Lagrangian backward"]
    compiled_design = step + (n_b + 1) * blocks["recording f(z*)"]
    return {"parts": blocks, "step": step, "compiled_design": compiled_design, "explicit": t_explicit / t_f}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deq-checkpoint", type=Path, required=True, help="trained DEQ (.ckpt)")
    parser.add_argument("--work", type=Path, default=Path("outputs/md_speed"), help="models are made/reused here")
    parser.add_argument("--steps", type=int, default=200, help="MD steps on aspirin")
    parser.add_argument("--box-grid", type=int, default=3, help="molecules per box edge (3: 567 atoms)")
    parser.add_argument("--box-steps", type=int, default=40, help="MD steps on the box")
    parser.add_argument("--png", type=Path, default=None, help="iterations per step over the runs")
    parser.add_argument("--tolerance", type=float, default=None, help="DEQ solver tolerance (default: the model's)")
    parser.add_argument("--extrapolation", default=DEFAULT_SCHEME, choices=CACHE_SCHEMES,
                        help="DEQ starting points, through ASE and in the state cache of the pair-style call")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(torch.get_num_threads())

    work = args.work
    deq_ase, deq_pair = comparison_models.deq_models(args.deq_checkpoint, work, args.tolerance, args.extrapolation)
    explicit, nequip, _ = comparison_models.timing_models(args.deq_checkpoint, work)

    compiled_ase = dict(device="cpu", chemical_species_to_atom_type_map=True)
    deq_options = dict(compiled_ase, tolerance=args.tolerance, extrapolation=args.extrapolation)
    report, curves = [], {}
    for name, atoms in systems(args.box_grid).items():
        steps = args.steps if name == "aspirin" else args.box_steps
        if not atoms.pbc.any():
            atoms.pbc = False
        print(f"== {name} ({len(atoms)} atoms): {steps} NVE steps with the warm DEQ (ASE)", flush=True)
        frames, warm_s, warm_it = trajectory(DEQCalculator.from_compiled_model(deq_ase, **deq_options), atoms, steps)
        rows = {"DEQ warm, ASE (ase_deq)": (warm_s[1:], warm_it[1:])}
        print("   replaying the frames with the other models and routes", flush=True)
        pair_s, pair_it = replay(pair_caller(deq_pair), frames)
        rows["DEQ warm, pair-style call (state cache)"] = (pair_s[1:], pair_it[1:])
        cold = ase_caller(DEQCalculator.from_compiled_model(deq_ase, warm_start=False, **deq_options))
        rows["DEQ cold, ASE"] = replay(cold, frames[1:])
        rows["Equiformer 6 blocks"] = replay(ase_caller(NequIPCalculator.from_compiled_model(explicit, **compiled_ase)), frames[1:])
        rows["NequIP, same irreps"] = replay(ase_caller(NequIPCalculator.from_compiled_model(nequip, **compiled_ase)), frames[1:])
        curves[name] = {"ASE": warm_it, "pair-style call": pair_it}
        print("   eager timings of the DEQ's parts (the floor)", flush=True)
        deq_calc = DEQCalculator.from_compiled_model(deq_ase, **deq_options)
        split = []
        # the first calls start cold or extrapolate less (xlbomd: quadratic for K + 1 calls)
        for frame in frames[-(XLBOMD_ORDER + 5):]:
            frame = frame.copy()
            frame.calc = deq_calc
            frame.get_forces()
            split.append((deq_calc.results["deq_iterations"], deq_calc.results["deq_adjoint_iterations"]))
        n_f, n_b = np.mean(split[XLBOMD_ORDER + 2:], axis=0)
        report.append((name, len(atoms), rows, floor(args.deq_checkpoint, frames[-1], n_f, n_b, args.tolerance), (n_f, n_b)))

    tol = args.tolerance or DEQCalculator.from_compiled_model(deq_ase, **compiled_ase).tolerances[0]
    print(f"\nDEQ tolerance {tol:g}, {args.extrapolation} starting points; {torch.get_num_threads()} CPU threads, float32, compiled with AOTInductor; "
          "ms per energy+forces call (median), iterations = forward + adjoint per step")
    for name, n, rows, fl, (n_f, n_b) in report:
        base = np.median(rows["Equiformer 6 blocks"][0])
        print(f"\n{name}, {n} atoms\n")
        print("| model | ms / step | steps / s | iterations / step | time / Equiformer 6 blocks |")
        print("|---|---|---|---|---|")
        for label, (secs, its) in rows.items():
            ms = 1e3 * np.median(secs)
            it = f"{np.mean(its):.1f}" if "DEQ" in label else "—"
            print(f"| {label} | {ms:.1f} | {1e3 / ms:.1f} | {it} | {ms / 1e3 / base:.2f} |")
        parts = ", ".join(f"{k} {v:.2f}" for k, v in fl["parts"].items())
        warm = np.median(rows["DEQ warm, ASE (ase_deq)"][0]) / base
        print(f"\nfloor (eager parts in block-equivalents: {parts}): the solves and Lagrangian of a warm step "
              f"at {n_f:.1f} + {n_b:.1f} iterations = {fl['step']:.1f} blocks; 6 blocks forward and backward "
              f"= {fl['explicit']:.1f} blocks, so the "
              f"floor ratio is {fl['step'] / fl['explicit']:.2f} ({fl['compiled_design']:.1f} blocks = "
              f"{fl['compiled_design'] / fl['explicit']:.2f} with a recording per adjoint product, as compiled); "
              f"compiled warm DEQ (ASE) {warm:.2f} = {warm / (fl['step'] / fl['explicit']):.2f}x the floor, "
              f"{warm / (fl['compiled_design'] / fl['explicit']):.2f}x the compiled design's")
    if args.png:
        from nequip_deq.plots import line_plot

        lines = {f"{system}, {route}": its for system, routes in curves.items() for route, its in routes.items()}
        line_plot(None, lines, "MD step", "forward + adjoint iterations",
                  "warm-started DEQ: solver iterations per MD step (step 0 starts cold)", args.png, log_y=True)
        print(f"\nwrote {args.png}")


if __name__ == "__main__":
    main()
