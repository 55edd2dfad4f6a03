"""Time per MD step of compiled models, side by side in one run: variational DEQs with shadow
dynamics, the same DEQs solving every step, the Lagrangian DEQ, and explicit models of 1, 2, 3
and 6 blocks of the DEQ's width and block type.

    python benchmarks/shadow_speed.py --variational outputs/var/train/best.ckpt \\
        [more variational checkpoints, e.g. one with readout_block: false] \\
        --lagrangian outputs/bench/deq_quickstart/best.ckpt [--work outputs/shadow_speed] \\
        [--steps 200] [--box-grid 3] [--box-steps 40] [--tolerance 1e-3] [--sweeps 3]

Every model is compiled with ``nequip-compile --mode aotinductor`` (float32, CPU; DEQs for
``--target ase_deq``, explicit models for ``ase``) into ``--work`` once and reused; the
explicit models are EquiformerModel with the (first) variational checkpoint's architecture, trained for
one short epoch (the cost of a call does not depend on the weights; see
``comparison_models.py``). Systems: rMD17 aspirin (21 atoms) and a periodic box of
``box-grid``³ aspirin molecules (567 atoms at the default 3).

Shadow dynamics of the first variational DEQ drives an NVE run (velocity Verlet, 0.5 fs, 300 K; its first eight calls
solve, for the recurrence's history). Then each model, with a fresh calculator, replays those
frames, one model after the other as in MD (a fresh shadow calculator makes the same calls:
its state depends on the positions only), in ``--sweeps`` sweeps of alternating order so that
the machine's slow phases do not fall on one model; the DEQs warm-start (``xlbomd`` at
``--tolerance``). ms per step = one energy + forces call through ASE, the median over the
sweeps of the calls after the first 9. Threads: as torch sets them (``OMP_NUM_THREADS``).

The floor in block-equivalents: a shadow step is one forward and one backward pass of the
block and of the output block inside the potential (the backward pass gives its gradients in
the state, the positions and the cell at once), against one forward and one backward pass for
the one-block explicit model (the encoder and its output block); with ``readout_block: false``
the potential holds the block alone, and the floor is one block-equivalent. The table gives
each model's time over the one-block model's.
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
import comparison_models  # noqa: E402
from md_speed import ase_caller, replay, systems, trajectory  # noqa: E402

SKIP = 9  # the shadow run's solved calls (and the cold first one) are not timed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variational", type=Path, nargs="+", required=True,
                        help="checkpoints of fixed_point: variational DEQs (the first drives the MD)")
    parser.add_argument("--lagrangian", type=Path, default=None, help="checkpoint of a Lagrangian DEQ (optional)")
    parser.add_argument("--work", type=Path, default=Path("outputs/shadow_speed"), help="compiled models are made/reused here")
    parser.add_argument("--steps", type=int, default=200, help="MD steps on aspirin")
    parser.add_argument("--box-grid", type=int, default=3, help="molecules per box edge (3: 567 atoms; 0: aspirin only)")
    parser.add_argument("--box-steps", type=int, default=40, help="MD steps on the box")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="DEQ solver tolerance")
    parser.add_argument("--sweeps", type=int, default=3, help="times every model replays the frames")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")

    cm, work = comparison_models, args.work
    models = {
        f"explicit, {n} block{'s' if n > 1 else ''}": cm.compiled(
            cm.checkpoint(f"explicit{n}", work, args.variational[0]), work / f"explicit{n}.nequip.pt2", "ase"
        )
        for n in (1, 2, 3, 6)
    }
    lagrangian = args.lagrangian and cm.compiled(args.lagrangian, work / "lagrangian.nequip.pt2", "ase_deq")
    options = dict(device="cpu", chemical_species_to_atom_type_map=True)
    deq = dict(options, tolerance=args.tolerance)

    makers = {}
    for checkpoint in args.variational:
        linear = cm.model_config(checkpoint).get("readout_block", True) is False
        suffix = "_linear" if linear else ""
        path = cm.compiled(checkpoint, work / f"variational{suffix}.nequip.pt2", "ase_deq")
        label = "variational DEQ" + (" (linear readout)" if linear else "")
        makers[f"{label}, shadow"] = lambda path=path: DEQCalculator.from_compiled_model(path, shadow=True, **deq)
        makers[f"{label}, solved (xlbomd)"] = lambda path=path: DEQCalculator.from_compiled_model(path, **deq)
    if lagrangian:
        makers["Lagrangian DEQ (xlbomd)"] = lambda: DEQCalculator.from_compiled_model(lagrangian, **deq)
    for label, path in models.items():
        makers[label] = lambda path=path: NequIPCalculator.from_compiled_model(path, **options)
    report = []
    for name, atoms in systems(args.box_grid).items():
        steps = args.steps if name == "aspirin" else args.box_steps
        if not atoms.pbc.any():
            atoms.pbc = False
        print(f"== {name} ({len(atoms)} atoms): {steps} NVE steps with shadow dynamics", flush=True)
        frames = trajectory(next(iter(makers.values()))(), atoms, steps)[0]
        seconds = {label: [] for label in makers}
        iterations = {}
        for sweep in range(args.sweeps):
            print(f"   sweep {sweep + 1} of {args.sweeps}: every model on the frames", flush=True)
            order = list(makers) if sweep % 2 == 0 else list(makers)[::-1]
            for label in order:  # a fresh calculator replays the same calls, shadow steps too
                secs, its = replay(ase_caller(makers[label]()), frames)
                seconds[label].extend(secs[SKIP:])
                iterations[label] = its[SKIP:]
        report.append((name, len(atoms), seconds, iterations))

    print(f"\ncompiled (AOTInductor, float32, CPU), {torch.get_num_threads()} threads; DEQ tolerance "
          f"{args.tolerance:g}; ms per energy + forces call through ASE (median)")
    for name, n, rows, iterations in report:
        one, three, six = (np.median(rows[f"explicit, {k}"]) for k in ("1 block", "3 blocks", "6 blocks"))
        print(f"\n{name}, {n} atoms\n")
        print("| model | ms / step | / 1 block | / 3 blocks | / 6 blocks | iterations / step |")
        print("|---|---|---|---|---|---|")
        for label, secs in rows.items():
            ms = np.median(secs)
            its = f"{np.mean(iterations[label]):.1f}" if "DEQ" in label else "—"
            print(f"| {label} | {1e3 * ms:.1f} | {ms / one:.2f} | {ms / three:.2f} | {ms / six:.2f} | {its} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
