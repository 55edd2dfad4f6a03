"""``nequip-deq-md``: molecular dynamics with a compiled or saved nequip model through ASE.

Examples::

    nequip-deq-md model.nequip.pt2                       # NVE, aspirin from the bundled data
    nequip-deq-md model.nequip.pt2 --structure mol.xyz --ensemble nvt --temperature 500

Prints a line every ``--print-every`` steps (time, temperature, total energy, ms per step and,
for DEQ models, solver iterations); writes ``<out>/md.traj`` (ASE trajectory, every
``--write-every`` steps), ``<out>/md.log`` (ASE's MD log), ``<out>/steps.csv`` (every step),
``<out>/md_energies.png`` (total and potential energy against time) and, for DEQ models,
``<out>/deq_iterations.png``; at the end it prints the total-energy drift.
"""

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.io import read
from ase.io.trajectory import Trajectory
from ase.md import MDLogger
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation
from ase.md.verlet import VelocityVerlet

from nequip_deq._resolvers import BUNDLED_DATA_DIR, bundled_data_path
from nequip_deq.data import read_molecule_npz
from nequip_deq.integrations.ase import check_elements, load_calculator
from nequip_deq.nn.fixed_point.extrapolation import DEFAULT_SCHEME, SCHEMES

DEFAULT_STRUCTURE = "rmd17_aspirin_test_01_first200.npz"


def load_structure(spec: str) -> Atoms:
    """``spec``: an ASE-readable file, an rMD17/sGDML npz file (first frame), or the name of a
    bundled npz file."""
    path = Path(spec)
    if not path.is_file():
        if path.parent != Path(".") or not (BUNDLED_DATA_DIR / spec).is_file():
            available = sorted(p.name for p in BUNDLED_DATA_DIR.glob("*.npz"))
            raise FileNotFoundError(
                f"structure {spec!r}: no such file, and not the name of a bundled structure "
                f"(those are {available})."
            )
        path = Path(bundled_data_path(spec))
    if path.suffix == ".npz":
        atoms = read_molecule_npz(path, frames=[0])[0]
    else:
        atoms = read(path)
    atoms.calc = None
    return atoms


def give_molecule_a_cell(atoms: Atoms) -> None:
    """Non-periodic structures without a cell get a finite box (pbc stays off, so the box does
    not change any interaction): the model's stress is then finite instead of ``virial / 0``
    (nequip issue #608)."""
    if not atoms.pbc.any() and atoms.cell.volume < 1e-8:
        atoms.center(vacuum=10.0)


def run_md(
    atoms: Atoms,
    calculator,
    steps: int,
    timestep_fs: float,
    temperature: float,
    ensemble: str,
    out_dir: Path,
    write_every: int = 10,
    seed: int = 0,
    print_every: int = 50,
) -> dict:
    """Run MD, print a line every ``print_every`` steps, write ``steps.csv`` (one row per
    step), ``md_energies.png`` and, for DEQ models, ``deq_iterations.png``; return a summary
    (energy drift in eV/atom, wall time per step)."""
    from nequip_deq import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    atoms.calc = calculator
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=np.random.default_rng(seed))
    Stationary(atoms)
    ZeroRotation(atoms)
    if ensemble == "nve":
        dyn = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    else:
        dyn = Langevin(
            atoms,
            timestep=timestep_fs * units.fs,
            temperature_K=temperature,
            friction=0.01 / units.fs,
            rng=np.random.default_rng(seed),
        )
    traj = Trajectory(str(out_dir / "md.traj"), "w", atoms)
    dyn.attach(traj.write, interval=write_every)
    dyn.attach(MDLogger(dyn, atoms, str(out_dir / "md.log"), header=True, peratom=True), interval=write_every)
    rows = []
    clock = [time.perf_counter()]

    def record():
        now = time.perf_counter()
        row = {
            "step": dyn.nsteps,
            "time_fs": dyn.nsteps * timestep_fs,
            "temperature_K": atoms.get_temperature(),
            "total_energy_eV": atoms.get_total_energy(),
            "potential_energy_eV": atoms.get_potential_energy(),
            "ms_per_step": 1000 * (now - clock[0]),
        }
        clock[0] = now
        if "deq_iterations" in calculator.results:  # DEQ models: solver iterations per step
            row["deq_iterations"] = int(calculator.results["deq_iterations"])
            row["deq_adjoint_iterations"] = int(calculator.results["deq_adjoint_iterations"])
        rows.append(row)
        if print_every and (dyn.nsteps % print_every == 0):
            recent = rows[-print_every:] if dyn.nsteps > 0 else rows
            line = (
                f"step {dyn.nsteps:6d} | {row['time_fs']:8.1f} fs | T {row['temperature_K']:6.1f} K | "
                f"E_total {row['total_energy_eV']:.4f} eV | "
                f"{np.mean([r['ms_per_step'] for r in recent]):.1f} ms/step"
            )
            if "deq_iterations" in row:
                line += (
                    f" | DEQ iterations {np.mean([r['deq_iterations'] for r in recent]):.1f} + "
                    f"{np.mean([r['deq_adjoint_iterations'] for r in recent]):.1f}"
                )
            print(line, flush=True)

    dyn.attach(record, interval=1)
    start = time.perf_counter()
    dyn.run(steps)
    elapsed = time.perf_counter() - start
    traj.close()
    with open(out_dir / "steps.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    energies = np.array([r["total_energy_eV"] for r in rows])
    if not np.all(np.isfinite(energies)):
        raise RuntimeError("MD produced non-finite energies; check the model and the time step")
    plots.md_energies(
        [r["time_fs"] for r in rows], energies, [r["potential_energy_eV"] for r in rows],
        len(atoms), out_dir / "md_energies.png",
    )
    summary = {
        "steps": steps,
        "seconds_per_step": elapsed / steps,
        "energy_drift_eV_per_atom": float(energies[-1] - energies[0]) / len(atoms),
        # slope of a straight line through the total energy (eV/atom/ps)
        "energy_drift_eV_per_atom_ps": float(np.polyfit(np.arange(len(energies)) * timestep_fs / 1000, energies, 1)[0]) / len(atoms),
        "energy_fluctuation_eV_per_atom": float(energies.std()) / len(atoms),
        "trajectory": str(out_dir / "md.traj"),
        "log": str(out_dir / "md.log"),
        "steps_csv": str(out_dir / "steps.csv"),
    }
    if "deq_iterations" in rows[0]:
        later = rows[1:]  # the first call starts cold
        summary["deq_iterations_per_step"] = float(np.mean([r["deq_iterations"] for r in later]))
        summary["deq_adjoint_iterations_per_step"] = float(np.mean([r["deq_adjoint_iterations"] for r in later]))
        plots.solver_iterations(
            [r["step"] for r in rows], [r["deq_iterations"] for r in rows],
            [r["deq_adjoint_iterations"] for r in rows], out_dir / "deq_iterations.png",
        )
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(prog="nequip-deq-md", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="compiled (.nequip.pt2/.pth), packaged (.nequip.zip) or checkpoint (.ckpt) model")
    parser.add_argument("--structure", default=DEFAULT_STRUCTURE, help="start structure: ASE-readable file, rMD17/sGDML npz, or a bundled npz name (default: aspirin)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--timestep", type=float, default=0.5, help="fs")
    parser.add_argument("--temperature", type=float, default=300.0, help="K, initial velocities (and NVT bath)")
    parser.add_argument("--ensemble", choices=["nve", "nvt"], default="nve")
    parser.add_argument("--out", default="md_output", help="output directory")
    parser.add_argument("--write-every", type=int, default=10, help="trajectory and log interval (steps)")
    parser.add_argument("--print-every", type=int, default=50, help="progress line interval (steps; 0: none)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extrapolation", default=DEFAULT_SCHEME, choices=SCHEMES,
                        help="DEQ models: starting point of each step's solves from the previous ones")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="DEQ models: solver tolerance of every step (default: the model's; "
                        "docs/deq.md tabulates drift and cost against it)")
    parser.add_argument("--shadow", action="store_true",
                        help="variational DEQs: shadow dynamics, no solve after the first steps "
                        "(DEQCalculator; docs/deq.md)")
    args = parser.parse_args(argv)
    for name, value, least in (("steps", args.steps, 1), ("write-every", args.write_every, 1),
                               ("print-every", args.print_every, 0)):
        if value < least:
            parser.error(f"--{name} {value}: must be at least {least}")
    if not Path(args.model).exists():
        parser.error(f"model {args.model}: no such file")
    try:  # before the model: a mistyped path fails at once
        atoms = load_structure(args.structure)
    except FileNotFoundError as e:
        parser.error(str(e))

    calc = load_calculator(args.model, args.device, args.extrapolation, args.tolerance, args.shadow)
    limits = getattr(calc, "solver_limits", None)
    if limits is not None:
        print(f"DEQ solver: forward tolerance {limits['f_tol']:g} (cap {limits['f_max_iter']} "
              f"iterations), adjoint {limits['b_tol']:g} (cap {limits['b_max_iter']}); a solve "
              "that ends above its tolerance is reported with its step")
    check_elements(atoms, calc)
    give_molecule_a_cell(atoms)
    summary = run_md(
        atoms, calc, args.steps, args.timestep, args.temperature, args.ensemble,
        Path(args.out), args.write_every, args.seed, args.print_every,
    )
    print(f"MD ({args.ensemble}, {len(atoms)} atoms, {summary['steps']} steps of {args.timestep} fs): "
          f"{1000 * summary['seconds_per_step']:.1f} ms/step, "
          f"total-energy drift {1000 * summary['energy_drift_eV_per_atom']:.3f} meV/atom "
          f"(fit: {1000 * summary['energy_drift_eV_per_atom_ps']:+.3f} meV/atom/ps), "
          f"fluctuation {1000 * summary['energy_fluctuation_eV_per_atom']:.3f} meV/atom")
    if "deq_iterations_per_step" in summary:
        print(f"DEQ solver (warm-started): {summary['deq_iterations_per_step']:.1f} forward + "
              f"{summary['deq_adjoint_iterations_per_step']:.1f} adjoint iterations per step")
    print(f"trajectory: {summary['trajectory']}")
    print(f"log:        {summary['log']}, every step: {summary['steps_csv']}")
    figures = ["md_energies.png"] + (["deq_iterations.png"] if "deq_iterations_per_step" in summary else [])
    print(f"figures:    {', '.join(str(Path(args.out) / f) for f in figures)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
