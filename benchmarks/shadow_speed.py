"""Time per MD step of a variational DEQ with shadow dynamics against the same DEQ solving
every step, the Lagrangian DEQ, and explicit models of 1, 2, 3 and 6 blocks of the DEQ's
width, side by side in one run, all **eager** (variational models do not compile yet).

    python benchmarks/shadow_speed.py --variational outputs/var/train/best.ckpt \\
        --lagrangian outputs/bench/deq_quickstart/best.ckpt [--steps 100] [--tolerance 1e-3]

Each model runs NVE velocity Verlet of rMD17 aspirin (21 atoms) at 0.5 fs from 300 K through
ASE; ms/step is the wall time of ``--steps`` steps after a warm-up of 10 (the extended
Lagrangian's history: shadow steps start after 8 solved ones). DEQs start every solve from the
``xlbomd`` recurrence at ``--tolerance``. The explicit models are EquiformerModel with the
variational checkpoint's architecture arguments and random weights (the cost of a call does
not depend on the weights). Threads: ``--threads`` (default 2).
"""

import argparse
import sys
import time

import numpy as np
import torch
from ase import units
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation
from ase.md.verlet import VelocityVerlet

from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform
from nequip.integrations.ase import NequIPCalculator
from nequip.utils.global_state import set_global_state

from nequip_deq.integrations.ase import load_calculator
from nequip_deq.model import EquiformerModel
from nequip_deq.scripts.md import give_molecule_a_cell, load_structure

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from comparison_models import model_config  # noqa: E402

# the DEQ builder's own arguments: everything else is the shared architecture
DEQ_ARGS = {
    "_target_", "fixed_point", "stiffness", "num_deq_layers", "injection", "branch_scale",
    "norm_eps", "damping", "solver", "f_tol", "f_max_iter", "b_tol", "b_max_iter", "gradient",
    "train_gradient", "train_unroll_steps", "grad_tol", "grad_max_iter", "jacobian_penalty",
}


def explicit_calculator(config: dict, blocks: int) -> NequIPCalculator:
    """An eager EquiformerModel with ``blocks`` blocks and the DEQ's architecture arguments."""
    kwargs = {k: v for k, v in config.items() if k not in DEQ_ARGS}
    set_global_state()
    model = EquiformerModel(**kwargs, num_layers=blocks).eval()
    types = config["type_names"]
    transforms = [
        ChemicalSpeciesToAtomTypeMapper(model_type_names=types, chemical_species_to_atom_type_map={t: t for t in types}),
        NeighborListTransform(r_max=config["r_max"]),
    ]
    return NequIPCalculator(model, device="cpu", transforms=transforms)


def ms_per_step(calc, steps: int) -> tuple:
    """ms per MD step after 10 warm-up steps, and the mean solver iterations per step."""
    atoms = load_structure("rmd17_aspirin_test_01_first200.npz")
    give_molecule_a_cell(atoms)
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    Stationary(atoms)
    ZeroRotation(atoms)
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    dyn.run(10)
    iterations = []
    dyn.attach(lambda: iterations.append(calc.results.get("deq_iterations", 0)), interval=1)
    start = time.perf_counter()
    dyn.run(steps)
    return 1000 * (time.perf_counter() - start) / steps, float(np.mean(iterations))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variational", required=True, help="checkpoint of a fixed_point: variational DEQ")
    parser.add_argument("--lagrangian", default=None, help="checkpoint of a Lagrangian DEQ (optional)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    config = model_config(args.variational)
    rows = [(f"explicit, {n} block{'s' if n > 1 else ''}", explicit_calculator(config, n)) for n in (1, 2, 3, 6)]
    rows.append(("variational DEQ, solved (xlbomd)", load_calculator(args.variational, "cpu", tolerance=args.tolerance)))
    rows.append(("variational DEQ, shadow", load_calculator(args.variational, "cpu", tolerance=args.tolerance, shadow=True)))
    if args.lagrangian:
        rows.append(("Lagrangian DEQ (xlbomd)", load_calculator(args.lagrangian, "cpu", tolerance=args.tolerance)))
    results = []
    for name, calc in rows:
        ms, its = ms_per_step(calc, args.steps)
        results.append((name, ms, its))
        print(f"measured {name}: {ms:.1f} ms/step", flush=True)
    one, six = results[0][1], results[3][1]
    print(f"\naspirin, eager, {args.threads} threads, {args.steps} NVE steps after 10, tolerance {args.tolerance:g}\n")
    print("| model | ms/step | / explicit 1 block | / explicit 6 blocks | solver iterations / step |")
    print("|---|---|---|---|---|")
    for name, ms, its in results:
        print(f"| {name} | {ms:.1f} | {ms / one:.2f} | {ms / six:.2f} | {its:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
