"""NVE energy conservation and fidelity of shadow dynamics, compiled: a variational DEQ with
shadow dynamics, the same DEQ solving every step (``xlbomd``) and an explicit model, from the
same start; every ``--every`` steps of the shadow run, the converged model at the same
positions.

    python benchmarks/shadow_nve.py --variational outputs/var/train/best.ckpt \\
        --explicit-compiled outputs/bench/quickstart.nequip.pt2 [--steps 20000] \\
        [--timestep 0.5] [--temperature 300] [--every 100] [--png docs/shadow_nve.png]

rMD17 aspirin (first test frame), velocity Verlet, velocities drawn at ``--temperature``
(seed 0), ASE with compiled models: the variational DEQ compiled for ``--target ase_deq`` into
``--work`` (``shadow_speed.py``'s file), the explicit model as given (``--target ase``). The
DEQ runs solve to ``--tolerance``. Drift: slope of a straight line through the total
(kinetic + potential; for shadow dynamics the shadow potential) energy against time, in
meV/atom/ps, and the RMS fluctuation about it; heating: the mean temperature of the last
fifth of the run minus that of the second fifth (the first equilibrates). Fidelity: energy difference per atom and force
RMS / max difference between the shadow step and a cold solve to ``--check-tolerance`` at the
same positions. Each run's energies are kept in ``--work``/shadow_nve and reused when the
script runs again with the same settings (delete them to measure anew).
"""

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from ase import units
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation
from ase.md.verlet import VelocityVerlet

from nequip.integrations.ase import NequIPCalculator

from nequip_deq.integrations.ase import DEQCalculator
from nequip_deq.scripts.md import give_molecule_a_cell, load_structure

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import comparison_models  # noqa: E402
from nve_drift import drift  # noqa: E402


def run(calc, args, label: str, reference=None):
    """NVE from the shared start: time (ps), total energy per atom (eV), temperature (K),
    iterations per step, ms per step, and the fidelity rows ``(ΔE meV/atom, force RMS Δ,
    force max Δ meV/Å)`` against ``reference`` (a converged calculator) every ``--every``
    steps."""
    atoms = load_structure("rmd17_aspirin_test_01_first200.npz")
    give_molecule_a_cell(atoms)
    MaxwellBoltzmannDistribution(atoms, temperature_K=args.temperature, rng=np.random.default_rng(0))
    Stationary(atoms)
    ZeroRotation(atoms)
    atoms.calc = calc
    dyn = VelocityVerlet(atoms, timestep=args.timestep * units.fs)
    totals, temperatures, iterations, fidelity, seconds = [], [], [], [], [0.0]

    def record():
        step = len(totals)
        totals.append(atoms.get_total_energy() / len(atoms))
        temperatures.append(atoms.get_temperature())
        iterations.append(calc.results.get("deq_iterations", 0) + calc.results.get("deq_adjoint_iterations", 0))
        if reference is not None and step % args.every == 0 and step > 0:
            start = time.perf_counter()  # not counted in the run's time
            frame = atoms.copy()
            frame.calc = reference
            delta_f = 1e3 * (atoms.get_forces() - frame.get_forces())
            fidelity.append((1e3 * (atoms.get_potential_energy() - frame.get_potential_energy()) / len(atoms),
                             float(np.sqrt((delta_f**2).mean())), float(np.abs(delta_f).max())))
            seconds[0] += time.perf_counter() - start
        if step % 1000 == 0 and step > 0:
            print(f"   {label}: step {step}, total energy {1e3 * (totals[-1] - totals[0]):+.3f} meV/atom from the "
                  f"start, {np.mean(temperatures):.0f} K mean, {np.mean(iterations[1:]):.2f} iterations/step", flush=True)

    dyn.attach(record, interval=1)
    start = time.perf_counter()
    dyn.run(args.steps)
    ms = 1e3 * (time.perf_counter() - start - seconds[0]) / args.steps
    t = np.arange(len(totals)) * args.timestep / 1000
    return dict(t=t, total=np.array(totals), temperature=np.array(temperatures),
                iterations=np.array(iterations, dtype=float), ms=ms, fidelity=np.array(fidelity).reshape(-1, 3))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variational", type=Path, required=True, help="checkpoint of a fixed_point: variational DEQ")
    parser.add_argument("--explicit-compiled", type=Path, required=True, help="explicit model compiled with --target ase")
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--timestep", type=float, default=0.5, help="fs")
    parser.add_argument("--temperature", type=float, default=300.0, help="K, of the initial velocities")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="of the DEQ's solved steps")
    parser.add_argument("--every", type=int, default=100, help="MD steps between fidelity checks")
    parser.add_argument("--check-tolerance", type=float, default=2e-6, help="of the converged model in the checks")
    parser.add_argument("--work", type=Path, default=Path("outputs/shadow_speed"))
    parser.add_argument("--png", type=Path, default=None, help="total energy against time")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    options = dict(device="cpu", chemical_species_to_atom_type_map=True)
    variational = comparison_models.compiled(args.variational, args.work / "variational.nequip.pt2", "ase_deq")
    setting = f"{args.steps}x{args.timestep:g}fs_{args.temperature:g}K"

    def kept(label, make_calc, reference=None):
        path = args.work / "shadow_nve" / f"{label.split(',')[0].replace(' ', '_')}_{setting}.npz"
        if path.exists():
            print(f"   {label}: reusing {path}", flush=True)
            return dict(np.load(path))
        result = run(make_calc(), args, label, reference)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **result)
        return result

    converged = DEQCalculator.from_compiled_model(variational, warm_start=False, tolerance=args.check_tolerance, **options)
    runs = {
        "shadow, variational DEQ": kept("shadow, variational DEQ", lambda: DEQCalculator.from_compiled_model(
            variational, shadow=True, tolerance=args.tolerance, **options), converged),
        f"xlbomd, variational DEQ solved to {args.tolerance:g}": kept("xlbomd", lambda: DEQCalculator.from_compiled_model(
            variational, tolerance=args.tolerance, **options)),
        "explicit model": kept("explicit", lambda: NequIPCalculator.from_compiled_model(args.explicit_compiled, **options)),
    }

    base_slope, base_rms = drift(runs["explicit model"]["t"], runs["explicit model"]["total"])
    print(f"\naspirin, NVE {args.steps} x {args.timestep:g} fs from {args.temperature:g} K, compiled (float32), "
          f"{torch.get_num_threads()} CPU threads\n")
    print("| run | iterations / step | ms / step | drift (meV/atom/ps) | / explicit | RMS fluctuation (meV/atom) "
          "| / explicit | heating (K) |")
    print("|---|---|---|---|---|---|---|---|")
    for label, r in runs.items():
        slope, rms = drift(r["t"], r["total"])
        fifth = max(len(r["temperature"]) // 5, 1)  # the first fifth equilibrates
        heating = r["temperature"][-fifth:].mean() - r["temperature"][fifth:2 * fifth].mean()
        its = f"{r['iterations'][1:].mean():.2f}" if "DEQ" in label else "—"
        print(f"| {label} | {its} | {float(r['ms']):.1f} | {slope:+.4f} | {abs(slope) / abs(base_slope):.2f} | "
              f"{rms:.4f} | {rms / base_rms:.2f} | {heating:+.1f} |")
    rows = runs["shadow, variational DEQ"]["fidelity"]
    if len(rows):
        print(f"\nfidelity, every {args.every} steps of the shadow run ({len(rows)} checks) against a cold solve to "
              f"{args.check_tolerance:g}: |ΔE| mean {np.abs(rows[:, 0]).mean():.4f}, max {np.abs(rows[:, 0]).max():.4f} "
              f"meV/atom; force RMS Δ mean {rows[:, 1].mean():.3f}, max {rows[:, 1].max():.3f} meV/Å; force max Δ "
              f"max {rows[:, 2].max():.3f} meV/Å")
    if args.png:
        from nequip_deq.plots import line_plot

        curves = {label: 1e3 * (r["total"] - r["total"][0]) for label, r in runs.items()}
        line_plot(runs["explicit model"]["t"], curves, "time (ps)", "total energy − start (meV/atom)",
                  f"aspirin NVE, {args.timestep:g} fs, {args.temperature:g} K, compiled", args.png)
        print(f"\nwrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
