"""What a DEQ model costs per MD step under LAMMPS' pair_style nequip, with and without the
in-model state cache, measured without LAMMPS: the compiled model is called exactly as the
pair style calls it (nequip_deq.integrations.lammps.pair_nequip_inputs), inside a velocity
Verlet NVE loop (LAMMPS' `fix nve`).

    python benchmarks/lammps_deq_cache.py --deq-compiled deq_lmp.nequip.pt2 \\
        [--explicit-compiled equiformer_lmp.nequip.pt2] [--steps 200] [--structure box]

``--deq-compiled``: ``nequip-compile ... --target pair_nequip_deq --modifiers
enable_DEQStateCache``; ``--explicit-compiled`` (optional): an EquiformerModel compiled with
``--target pair_nequip``, timed on the same trajectory.

Warm: the trajectory as LAMMPS runs it (the cache matches every step). Cold: the same frames
replayed with the atoms presented in a different order at every other call, so the cache never
matches (the model is permutation-equivariant: the forces agree). Reported: model-call time per
step (the pair style adds its neighbour-list work), forward + adjoint iterations per step, NVE
total-energy drift. Times are wall-clock on whatever machine runs it, so compare the ratios.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from ase import units

from nequip.model.inference_models import load_compiled_model
from nequip.scripts._compile_utils import LMP_OUTPUTS, PAIR_NEQUIP_INPUTS

from nequip_deq._keys import SOLVER_STATISTICS
from nequip_deq.integrations.lammps import lammps_frame, pair_nequip_inputs

sys.path.insert(0, str(Path(__file__).parent.parent / "lammps"))
from make_data import molecule_in_box, periodic_box  # noqa: E402


def load(path, outputs):
    model, metadata = load_compiled_model(path, "cpu", PAIR_NEQUIP_INPUTS, outputs)
    return model, float(metadata["r_max"]), metadata["type_names"]


def call(model, atoms, r_max, type_names, order=None):
    """One pair-style call; ``order`` presents the atoms permuted. Returns energy, forces
    (in the original order), iterations, seconds."""
    if order is not None:
        atoms = atoms[order]
    inputs = pair_nequip_inputs(atoms, r_max, type_names)
    start = time.perf_counter()
    out = model(inputs)
    seconds = time.perf_counter() - start
    forces = out["forces"].double().numpy()
    if order is not None:
        forces = forces[np.argsort(order)]
    iterations = int(out["deq_iterations"]) + int(out["deq_adjoint_iterations"]) if "deq_iterations" in out else 0
    return float(out["atomic_energy"].double().sum()), forces, iterations, seconds


def nve(model, atoms, r_max, type_names, steps, dt_fs):
    """Velocity Verlet; returns the frames, total energies, iterations and call times."""
    masses = atoms.get_masses()[:, None]
    rng = np.random.default_rng(0)
    velocities = rng.normal(size=(len(atoms), 3)) * np.sqrt(300 * units.kB / masses)
    velocities -= (masses * velocities).sum(0) / masses.sum()
    dt = dt_fs * units.fs
    energy, forces, its, secs = call(model, atoms, r_max, type_names)
    frames, totals, iterations, seconds = [atoms.copy()], [], [its], [secs]
    for _ in range(steps):
        totals.append(energy + 0.5 * (masses * velocities**2).sum())
        velocities += 0.5 * dt * forces / masses
        atoms.positions += dt * velocities
        atoms.wrap()
        energy, forces, its, secs = call(model, atoms, r_max, type_names)
        velocities += 0.5 * dt * forces / masses
        frames.append(atoms.copy())
        iterations.append(its)
        seconds.append(secs)
    totals.append(energy + 0.5 * (masses * velocities**2).sum())
    return frames, np.array(totals), np.array(iterations), np.array(seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deq-compiled", required=True)
    parser.add_argument("--explicit-compiled")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--timestep", type=float, default=0.5, help="fs")
    parser.add_argument("--structure", choices=["molecule", "box"], default="molecule")
    args = parser.parse_args()

    atoms = lammps_frame(molecule_in_box() if args.structure == "molecule" else periodic_box())
    deq, r_max, type_names = load(args.deq_compiled, LMP_OUTPUTS + list(SOLVER_STATISTICS))
    frames, totals, warm_its, warm_s = nve(deq, atoms.copy(), r_max, type_names, args.steps, args.timestep)
    drift = (totals[-1] - totals[0]) / len(atoms)

    rng = np.random.default_rng(1)
    shuffles = [rng.permutation(len(atoms)), rng.permutation(len(atoms))]
    cold_its, cold_s, max_dforce = [], [], 0.0
    for frame in frames[1:]:
        # two orders, alternately stored: the cache never sees the order it is called with
        _, forces, its, secs = call(deq, frame, r_max, type_names, order=shuffles[0])
        _, reference, _, _ = call(deq, frame, r_max, type_names, order=shuffles[1])
        cold_its.append(its)
        cold_s.append(secs)
        max_dforce = max(max_dforce, float(np.abs(forces - reference).max()))
    cold_its, cold_s = np.array(cold_its), np.array(cold_s)

    print(f"{args.structure}: {len(atoms)} atoms, NVE {args.steps} x {args.timestep} fs, model calls as pair_style nequip makes them")
    print(f"DEQ, state cache (warm): {1e3 * np.median(warm_s[1:]):.1f} ms/call, {warm_its[1:].mean():.1f} iterations/step "
          f"(first call {warm_its[0]}), NVE drift {1e3 * drift:.3f} meV/atom")
    print(f"DEQ, cache never matching (cold): {1e3 * np.median(cold_s):.1f} ms/call, {cold_its.mean():.1f} iterations/step "
          f"(cold-vs-cold force spread {max_dforce:.1e} eV/A)")
    print(f"warm/cold: iterations {warm_its[1:].mean() / cold_its.mean():.2f}, time {np.median(warm_s[1:]) / np.median(cold_s):.2f}")
    if args.explicit_compiled:
        explicit, r_exp, names = load(args.explicit_compiled, LMP_OUTPUTS)
        times = [call(explicit, f, r_exp, names)[3] for f in frames[1:]]
        print(f"explicit Equiformer: {1e3 * np.median(times):.1f} ms/call; warm DEQ / explicit = "
              f"{np.median(warm_s[1:]) / np.median(times):.2f}")


if __name__ == "__main__":
    main()
