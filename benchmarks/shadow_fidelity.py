"""Fidelity of shadow dynamics: along an MD trajectory written by ``nequip-deq-md --shadow``,
the shadow energy and forces stored in the trajectory against the converged model at the same
positions (a cold solve to ``--tolerance``), every ``--every`` MD steps.

    nequip-deq-md outputs/var/train/best.ckpt --shadow --steps 2000 --out outputs/var/md_shadow
    python benchmarks/shadow_fidelity.py outputs/var/train/best.ckpt outputs/var/md_shadow/md.traj

Prints, per checked frame and over all of them, the energy difference per atom (meV) and the
force difference RMS and maximum (meV/Å).
"""

import argparse
import sys

import numpy as np
from ase.io import read

from nequip_deq.integrations.ase import load_calculator


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="the checkpoint or package the trajectory was run with")
    parser.add_argument("trajectory", help="md.traj of nequip-deq-md --shadow")
    parser.add_argument("--every", type=int, default=100, help="MD steps between checked frames")
    parser.add_argument("--write-every", type=int, default=10, help="MD steps between trajectory frames")
    parser.add_argument("--tolerance", type=float, default=1e-6, help="tolerance of the converged solves")
    args = parser.parse_args(argv)

    converged = load_calculator(args.model, "cpu", tolerance=args.tolerance)
    converged.warm_start = False
    frames = read(args.trajectory, index=f"::{args.every // args.write_every}")
    rows = []
    print("| step | ΔE (meV/atom) | force RMS Δ (meV/Å) | force max Δ (meV/Å) |")
    print("|---|---|---|---|")
    for k, frame in enumerate(frames):
        energy, forces = frame.get_potential_energy(), frame.get_forces()
        ref = frame.copy()
        ref.calc = converged
        delta_f = 1000 * (forces - ref.get_forces())
        row = (1000 * (energy - ref.get_potential_energy()) / len(frame),
               float(np.sqrt((delta_f**2).mean())), float(np.abs(delta_f).max()))
        rows.append(row)
        print(f"| {k * args.every} | {row[0]:+.4f} | {row[1]:.3f} | {row[2]:.3f} |", flush=True)
    rows = np.array(rows)
    print(f"over {len(rows)} frames: |ΔE| max {np.abs(rows[:, 0]).max():.4f} meV/atom, force RMS Δ "
          f"mean {rows[:, 1].mean():.3f} meV/Å, force max Δ {rows[:, 2].max():.3f} meV/Å")
    return 0


if __name__ == "__main__":
    sys.exit(main())
