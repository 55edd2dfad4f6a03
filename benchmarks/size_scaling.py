"""Cost of one energy + forces call against system size: periodic boxes of aspirin molecules
from 21 to 7203 atoms, compiled models (the DEQ warm-started in MD through ASE and through the
pair-style call with its state cache, the DEQ cold, the explicit 6-block EquiformerModel of the
DEQ's width, nequip's NequIP with the same irreps), with the exponent of a power-law fit and a
log-log plot.

    python benchmarks/size_scaling.py --deq-checkpoint outputs/qs_deq/train/best.ckpt \\
        [--tolerance 1e-3] [--work outputs/md_speed] [--grids 1 2 3 4 5 7] [--png docs/size_scaling.png]

The models are those of ``md_speed.py`` (same ``--work`` directory: made once, reused). A warm
DEQ call is the fourth step of a short NVE run from 300 K (0.5 fs), started (through ASE and in
the state cache) from the quadratic extrapolation of the three previous fixed points: the
extended-Lagrangian start needs eight steps of history, too many to run at every size. Systems larger than the state cache's
capacity (the ``enable_DEQStateCache`` modifier's ``capacity``, default 10000) start every
pair-style call cold: the output says so when a box is that large.
"""

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from nequip.integrations.ase import NequIPCalculator

from nequip_deq.integrations.ase import DEQCalculator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "lammps"))
import comparison_models  # noqa: E402
from make_data import periodic_box  # noqa: E402
from md_speed import ase_caller, pair_caller, trajectory  # noqa: E402

WARM_STEPS = 3


def power_law(sizes, times):
    """Exponent ``b`` of ``time = a * size^b`` fitted in log-log space."""
    return np.polyfit(np.log(sizes), np.log(times), 1)[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deq-checkpoint", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("outputs/md_speed"))
    parser.add_argument("--grids", type=int, nargs="+", default=[1, 2, 3, 4, 5, 7],
                        help="molecules per box edge (21 g^3 atoms)")
    parser.add_argument("--png", type=Path, default=None)
    parser.add_argument("--tolerance", type=float, default=None, help="DEQ solver tolerance (default: the model's)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    deq_ase, deq_pair = comparison_models.deq_models(args.deq_checkpoint, args.work, args.tolerance, "quadratic")
    explicit, nequip, _ = comparison_models.timing_models(args.deq_checkpoint, args.work)
    options = dict(device="cpu", chemical_species_to_atom_type_map=True)
    capacity = int(torch._inductor.aoti_load_package(str(deq_pair)).get_metadata().get("deq_state_cache_atoms", 0))

    labels = ["DEQ warm, ASE", "DEQ warm, pair-style call", "DEQ cold", "Equiformer 6 blocks", "NequIP, same irreps"]
    sizes, table = [], {label: [] for label in labels}
    iterations = {"DEQ warm, ASE": [], "DEQ warm, pair-style call": [], "DEQ cold": []}
    for grid in args.grids:
        atoms = periodic_box(grid=grid)
        n = len(atoms)
        print(f"== {n} atoms ({grid}^3 aspirin)", flush=True)
        frames, _, _ = trajectory(
            DEQCalculator.from_compiled_model(deq_ase, tolerance=args.tolerance, extrapolation="quadratic", **options), atoms, WARM_STEPS
        )
        warm = ase_caller(DEQCalculator.from_compiled_model(deq_ase, tolerance=args.tolerance, extrapolation="quadratic", **options))
        for frame in frames:  # the last call is the timed one, extrapolated from three
            seconds, its, _ = warm(frame)
        results = {"DEQ warm, ASE": (seconds, its)}
        pair = pair_caller(deq_pair)
        for frame in frames:
            seconds, its, _ = pair(frame)
        results["DEQ warm, pair-style call"] = (seconds, its)
        if n > capacity:
            print(f"   {n} atoms > the state cache's capacity {capacity}: the pair-style call starts cold "
                  "(recompile with a larger capacity: enable_DEQStateCache capacity=<atoms>)", flush=True)
        cold = DEQCalculator.from_compiled_model(deq_ase, warm_start=False, tolerance=args.tolerance, **options)
        results["DEQ cold"] = ase_caller(cold)(frames[-1])[:2]
        for label, path in (("Equiformer 6 blocks", explicit), ("NequIP, same irreps", nequip)):
            call = ase_caller(NequIPCalculator.from_compiled_model(path, **options))
            results[label] = (min(call(frames[-1])[0] for _ in range(2)), 0)
        sizes.append(n)
        for label in labels:
            table[label].append(results[label][0])
            if label in iterations:
                iterations[label].append(results[label][1])
        print("   " + ", ".join(f"{label} {1e3 * results[label][0]:.0f} ms" for label in labels), flush=True)

    print(f"\nenergy + forces per call (ms), periodic boxes of aspirin, compiled models, float32, "
          f"{torch.get_num_threads()} CPU threads\n")
    print("| atoms | " + " | ".join(labels) + " | warm DEQ (ASE) / Equiformer | iterations warm ASE, pair, cold |")
    print("|---" * (len(labels) + 3) + "|")
    for i, n in enumerate(sizes):
        ratio = table["DEQ warm, ASE"][i] / table["Equiformer 6 blocks"][i]
        its = ", ".join(f"{iterations[k][i]:.0f}" for k in iterations)
        print(f"| {n} | " + " | ".join(f"{1e3 * table[label][i]:.1f}" for label in labels) + f" | {ratio:.2f} | {its} |")
    big = [i for i, n in enumerate(sizes) if n >= 500]
    print("\npower-law exponent b of time ∝ atoms^b " + (f"(fitted over {len(big)} sizes ≥ 500 atoms): " if len(big) >= 2 else ": ")
          + ", ".join(f"{label} {power_law(np.array(sizes)[big or slice(None)], np.array(table[label])[big or slice(None)]):.2f}"
                      for label in labels))
    if args.png:
        from nequip_deq.plots import line_plot

        curves = {label: 1e3 * np.array(table[label]) for label in labels}
        line_plot(sizes, curves, "atoms", "ms per energy + forces call",
                  "cost against size (periodic boxes of aspirin)", args.png, log_y=True, log_x=True, marker="o-")
        print(f"\nwrote {args.png}")


if __name__ == "__main__":
    main()
