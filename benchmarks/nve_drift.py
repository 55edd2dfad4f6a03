"""NVE energy conservation of compiled models: total-energy drift of the warm-started DEQ at
several solver tolerances and starting points (nequip_deq.nn.fixed_point.extrapolation), of the
DEQ with the phantom gradient (not −dE/dx) and of the explicit model, all from the same start.

    python benchmarks/nve_drift.py --deq-checkpoint outputs/qs_deq/train/best.ckpt \\
        --explicit-compiled outputs/qs_explicit/quickstart.nequip.pt2 \\
        [--steps 4000] [--tolerances 1e-3 1e-4] [--work outputs/md_speed] [--png docs/nve_drift.png]

rMD17 aspirin (first test frame), velocity Verlet at 0.5 fs, velocities drawn at 300 K (seed 0),
ASE with compiled models (``--target ase_deq`` for the DEQ, made in ``--work`` if missing, the
same file as ``md_speed.py``'s; the explicit model compiled with ``--target ase``). One
compiled DEQ serves every tolerance: ``DEQCalculator(tolerance=...)`` passes it with each
call (forward and adjoint alike). The phantom-gradient DEQ (same weights, forces not −dE/dx)
runs eager for ``--phantom-steps``. Drift: slope of a straight-line fit of the total energy
against time, in meV/atom/ps; also the RMS fluctuation about that line. Each run's energies
are kept in ``--work``/nve_drift and reused when the script runs again (to add a tolerance or
redraw the plot); delete that directory to measure anew.
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
from ase.md.verlet import VelocityVerlet

from nequip.integrations.ase import NequIPCalculator

from nequip_deq.integrations.ase import DEQCalculator, load_calculator
from nequip_deq.nn.fixed_point.extrapolation import SCHEMES
from nequip_deq.scripts.md import give_molecule_a_cell, load_structure

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comparison_models  # noqa: E402


def phantom_checkpoint(checkpoint: Path, out: Path) -> Path:
    """The DEQ checkpoint with ``gradient: phantom`` (same weights; forces not −dE/dx)."""
    if not out.exists():
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
        ckpt["hyper_parameters"]["model"]["gradient"] = "phantom"
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ckpt, out)
    return out


def run(calc, steps: int, dt_fs: float, label: str):
    """NVE from the shared start; returns time (ps), total energy per atom (eV), forward +
    adjoint iterations per step and ms per step."""
    atoms = load_structure("rmd17_aspirin_test_01_first200.npz")
    give_molecule_a_cell(atoms)
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    Stationary(atoms)
    atoms.calc = calc
    dyn = VelocityVerlet(atoms, timestep=dt_fs * units.fs)
    totals, iterations = [], []

    def record():
        totals.append(atoms.get_total_energy() / len(atoms))
        iterations.append(calc.results.get("deq_iterations", 0) + calc.results.get("deq_adjoint_iterations", 0))
        if len(totals) % 1000 == 1 and len(totals) > 1:
            print(f"   {label}: step {len(totals) - 1}, total energy {1e3 * (totals[-1] - totals[0]):+.3f} meV/atom "
                  f"from the start, {np.mean(iterations[1:]):.1f} iterations/step", flush=True)

    dyn.attach(record, interval=1)
    start = time.perf_counter()
    dyn.run(steps)
    ms = 1e3 * (time.perf_counter() - start) / steps
    return np.arange(len(totals)) * dt_fs / 1000, np.array(totals), np.array(iterations, dtype=float), ms


def drift(t_ps, total):
    """Slope (meV/atom/ps) of a straight line through the total energy, and the RMS
    fluctuation about it (meV/atom)."""
    slope, offset = np.polyfit(t_ps, total, 1)
    return 1e3 * slope, 1e3 * np.std(total - (slope * t_ps + offset))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deq-checkpoint", type=Path, required=True)
    parser.add_argument("--explicit-compiled", type=Path, required=True,
                        help="trained explicit model compiled with --target ase")
    parser.add_argument("--phantom-steps", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--timestep", type=float, default=0.5, help="fs")
    parser.add_argument("--tolerances", type=float, nargs="+", default=[1e-3, 1e-4])
    parser.add_argument("--schemes", nargs="+", default=["quadratic", "xlbomd"], choices=SCHEMES,
                        help="starting points run at every tolerance")
    parser.add_argument("--extra-schemes", nargs="*", default=["previous", "linear", "aspc"], choices=SCHEMES,
                        help="starting points run at the first tolerance only")
    parser.add_argument("--work", type=Path, default=Path("outputs/md_speed"))
    parser.add_argument("--png", type=Path, default=None)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    options = dict(device="cpu", chemical_species_to_atom_type_map=True)

    def kept(label, make_calc, steps):
        """``run`` once: its energies are saved in ``--work``/nve_drift and reused by later
        invocations (delete the directory to measure again)."""
        slug = "".join(c if c.isalnum() or c in ".-" else "_" for c in label)
        path = args.work / "nve_drift" / f"{slug}_{steps}x{args.timestep:g}fs.npz"
        if path.exists():
            print(f"   {label}: reusing {path}", flush=True)
            saved = np.load(path)
            return saved["t"], saved["total"], saved["iterations"], float(saved["ms"])
        t, total, its, ms = run(make_calc(), steps, args.timestep, label)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, t=t, total=total, iterations=its, ms=ms)
        return t, total, its, ms

    runs = {}
    deq = comparison_models.compiled(args.deq_checkpoint, args.work / "deq_ase.nequip.pt2", "ase_deq")
    for tol in args.tolerances:
        for scheme in args.schemes + (args.extra_schemes if tol == args.tolerances[0] else []):
            label = f"DEQ, tol {tol:g}, {scheme} start"
            runs[label] = kept(label, lambda: DEQCalculator.from_compiled_model(
                deq, extrapolation=scheme, tolerance=tol, **options), args.steps)
    runs["explicit Equiformer"] = kept(
        "explicit Equiformer", lambda: NequIPCalculator.from_compiled_model(args.explicit_compiled, **options), args.steps
    )
    phantom = phantom_checkpoint(args.deq_checkpoint, args.work / "phantom.ckpt")
    runs["DEQ, phantom gradient (eager)"] = kept(
        "DEQ, phantom gradient (eager)", lambda: load_calculator(str(phantom), "cpu"), args.phantom_steps
    )

    base = drift(*runs["explicit Equiformer"][:2])[0]
    print(f"\naspirin, NVE {args.steps} x {args.timestep} fs from 300 K, compiled models, "
          f"{torch.get_num_threads()} CPU threads\n")
    print("| model | iterations / step | ms / step | drift (meV/atom/ps) | |drift| / explicit | RMS fluctuation (meV/atom) |")
    print("|---|---|---|---|---|---|")
    for label, (t, total, its, ms) in runs.items():
        slope, rms = drift(t, total)
        it = f"{its[1:].mean():.1f}" if "DEQ" in label else "—"
        print(f"| {label} | {it} | {ms:.1f} | {slope:+.3f} | {abs(slope) / abs(base):.2f} | {rms:.3f} |")
    if args.png:
        from nequip_deq.plots import line_plot

        t = runs["explicit Equiformer"][0]
        curves = {label: 1e3 * (total - total[0]) for label, (_, total, _, _) in runs.items()
                  if "start" not in label or any(f"{s} start" in label for s in args.schemes)}
        curves = {label: np.pad(c, (0, len(t) - len(c)), constant_values=np.nan) for label, c in curves.items()}
        line_plot(t, curves, "time (ps)", "total energy − start (meV/atom)",
                  f"aspirin NVE, {args.timestep} fs, 300 K", args.png)
        print(f"\nwrote {args.png}")


if __name__ == "__main__":
    main()
