"""Fixed-point reuse on a real trajectory: solver iterations and time per energy+forces call
of DEQEquiformerModel, cold start vs warm start (previous frame's fixed point and adjoint, or
their linear extrapolation), with the explicit 6-block EquiformerModel of the same width timed
alongside. (The cost of a training step: ``benchmarks/deq_training_step.py``.)

The trajectory is the bundled MD17 ethanol subset: 300 consecutive frames of an ab-initio
MD run (0.5 fs apart). Eager float32 models on this machine's CPU threads.

    python benchmarks/deq_warm_start.py [--frames 100] [--deq-checkpoint A.ckpt
        --explicit-checkpoint B.ckpt] [--deq-compiled A.nequip.pt2 --explicit-compiled B.nequip.pt2]

Without checkpoints the models are freshly initialised at ``--irreps``; iteration counts of
trained models are what matter, so pass checkpoints (and their compiled versions) when you
have them: docs/deq.md records the command used.
"""

import argparse
import time
import warnings

import numpy as np
import torch

from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform
from nequip.integrations.ase import NequIPCalculator
from nequip.utils.global_state import set_global_state

from nequip_deq.data.molecule_npz import read_molecule_npz
from nequip_deq.integrations.ase import DEQCalculator
from nequip_deq.model import DEQEquiformerModel, EquiformerModel
from nequip_deq.nn.fixed_point import DEQEquiformerLayer
from nequip_deq.scripts.md import load_calculator
from nequip_deq._resolvers import bundled_data_path

TYPES = ["H", "C", "O"]
R_MAX = 5.0


def transforms():
    return [
        ChemicalSpeciesToAtomTypeMapper(
            model_type_names=TYPES, chemical_species_to_atom_type_map={t: t for t in TYPES}
        ),
        NeighborListTransform(r_max=R_MAX),
    ]


def models(args):
    """Eager DEQ and 6-block models: from checkpoints, or fresh at ``--irreps``."""
    if args.deq_checkpoint and args.explicit_checkpoint:
        return (
            load_calculator(args.deq_checkpoint, "cpu").model.eval(),
            load_calculator(args.explicit_checkpoint, "cpu").model.eval(),
        )
    set_global_state()
    common = dict(
        seed=0, model_dtype="float32", type_names=TYPES, r_max=R_MAX, avg_num_neighbors=8.0,
        irreps_node_features=args.irreps,
    )
    return DEQEquiformerModel(**common).eval(), EquiformerModel(num_layers=6, **common).eval()


def time_calls(calc, frames, skip=2):
    """Median ms per energy+forces call and mean solver iterations (after ``skip`` calls)."""
    times, iters, adj = [], [], []
    for atoms in frames:
        atoms = atoms.copy()
        atoms.center(vacuum=10.0)  # finite dummy box (compiled models check stress)
        atoms.calc = calc
        t = time.perf_counter()
        atoms.get_forces()
        times.append(time.perf_counter() - t)
        iters.append(calc.results.get("deq_iterations", np.nan))
        adj.append(calc.results.get("deq_adjoint_iterations", np.nan))
    return np.mean(iters[skip:]), np.mean(adj[skip:]), 1e3 * np.median(times[skip:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--irreps", default="128x0e+64x1o+32x2e", help="width of fresh models")
    parser.add_argument("--deq-checkpoint", default=None, help="trained DEQ model (.ckpt)")
    parser.add_argument("--explicit-checkpoint", default=None, help="trained 6-block model (.ckpt)")
    parser.add_argument("--deq-compiled", default=None, help="the DEQ model compiled with --target ase_deq")
    parser.add_argument("--explicit-compiled", default=None, help="the 6-block model compiled with --target ase")
    parser.add_argument("--tol", type=float, nargs="+", default=[1e-4, 1e-3],
                        help="DEQ solver tolerances (forward and adjoint) to compare")
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    frames = read_molecule_npz(bundled_data_path("md17_ethanol_first300.npz"))[: args.frames]
    deq, explicit = models(args)
    layer = next(m for m in deq.modules() if isinstance(m, DEQEquiformerLayer))
    trained_tol = layer.f_tol
    rows = {}
    for tol in args.tol:
        layer.f_tol = layer.b_tol = tol
        for name, options in (
            ("cold", dict(warm_start=False)),
            ("warm (previous z*)", dict(extrapolate=False)),
            ("warm (extrapolated)", dict()),
        ):
            calc = DEQCalculator(deq, device="cpu", transforms=transforms(), **options)
            rows[f"DEQ eager, {name}, tol {tol:g}"] = time_calls(calc, frames)
    rows["Equiformer 6 blocks, eager"] = time_calls(
        NequIPCalculator(explicit, device="cpu", transforms=transforms()), frames
    )
    if args.deq_compiled:
        for name, options in (("cold", dict(warm_start=False)), ("warm (extrapolated)", dict())):
            calc = DEQCalculator.from_compiled_model(
                args.deq_compiled, device="cpu", chemical_species_to_atom_type_map=True, **options
            )
            rows[f"DEQ compiled, {name}, tol {trained_tol:g}"] = time_calls(calc, frames)
    if args.explicit_compiled:
        calc = NequIPCalculator.from_compiled_model(
            args.explicit_compiled, device="cpu", chemical_species_to_atom_type_map=True
        )
        rows["Equiformer 6 blocks, compiled"] = time_calls(calc, frames)

    n_deq = sum(p.numel() for p in deq.parameters())
    n_exp = sum(p.numel() for p in explicit.parameters())
    print(f"MD17 ethanol, {len(frames)} consecutive frames (0.5 fs), float32, "
          f"{torch.get_num_threads()} CPU threads; DEQ {n_deq} params, Equiformer {n_exp}")
    base = rows["Equiformer 6 blocks, eager"][2]
    print("| model | forward iterations / step | adjoint iterations / step | ms / call | time / 6-block eager |")
    print("|---|---|---|---|---|")
    for name, (it, ad, ms) in rows.items():
        print(f"| {name} | {it:.1f} | {ad:.1f} | {ms:.1f} | {ms / base:.2f} |")
    for tol in args.tol:
        cold = sum(rows[f"DEQ eager, cold, tol {tol:g}"][:2])
        warm = sum(rows[f"DEQ eager, warm (previous z*), tol {tol:g}"][:2])
        extra = sum(rows[f"DEQ eager, warm (extrapolated), tol {tol:g}"][:2])
        print(f"tol {tol:g}: warm/cold iterations {warm / cold:.2f} (previous z*), "
              f"{extra / cold:.2f} (extrapolated)")
    if "Equiformer 6 blocks, compiled" in rows:
        warm = rows[f"DEQ compiled, warm (extrapolated), tol {trained_tol:g}"][2]
        print(f"compiled: warm DEQ / 6-block time {warm / rows['Equiformer 6 blocks, compiled'][2]:.2f}")


if __name__ == "__main__":
    main()
