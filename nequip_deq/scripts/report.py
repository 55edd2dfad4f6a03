"""``nequip-deq-report``: the figures of a training run — learning curve from its
``metrics.csv`` and force / energy parity of a model on test frames.

Examples::

    nequip-deq-report outputs/quickstart/train --model outputs/quickstart/quickstart.nequip.pt2
    nequip-deq-report RUN/train --model RUN/train/best.ckpt --test-data test.npz --frames 500

Writes ``<out>/learning_curve.png`` and ``<out>/parity.png`` (``--out``: default the training
directory) and prints the test MAEs.
"""

import argparse
from pathlib import Path

import numpy as np

from nequip_deq import plots
from nequip_deq._resolvers import bundled_data_path
from nequip_deq.integrations.ase import load_calculator
from nequip_deq.scripts.md import DEFAULT_STRUCTURE, give_molecule_a_cell


def predict(calculator, frames):
    """Energies ``(F,)`` and forces ``(F, N, 3)`` of ``calculator`` on ``frames``, and the
    frames' reference values. Test frames are not a trajectory: a DEQ solves every frame from
    a cold start (a warm start from an unrelated frame would make the result depend on the
    frames' order, within the solver tolerance, and cost iterations)."""
    ref_e, ref_f, pred_e, pred_f = [], [], [], []
    cold_start = getattr(calculator, "reset_state", lambda: None)
    for atoms in frames:
        cold_start()
        ref_e.append(atoms.get_potential_energy())
        ref_f.append(atoms.get_forces())
        atoms = atoms.copy()
        give_molecule_a_cell(atoms)
        atoms.calc = calculator
        pred_e.append(atoms.get_potential_energy())
        pred_f.append(atoms.get_forces())
    return np.array(ref_e), np.array(ref_f), np.array(pred_e), np.array(pred_f)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="nequip-deq-report", description=__doc__.split("\n")[0])
    parser.add_argument("train_dir", help="nequip-train run directory (its CSV logger's metrics.csv is found below it)")
    parser.add_argument("--model", required=True, help="compiled (.nequip.pt2), packaged or checkpoint model")
    parser.add_argument("--test-data", default=DEFAULT_STRUCTURE,
                        help="rMD17/sGDML npz file (or bundled npz name) with the test frames (default: bundled aspirin test frames)")
    parser.add_argument("--frames", type=int, default=200, help="test frames to evaluate (from the start)")
    parser.add_argument("--out", default=None, help="output directory (default: the training directory)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    from nequip_deq.data import num_frames, read_molecule_npz

    train_dir = Path(args.train_dir)
    out = Path(args.out or train_dir)
    found = sorted(train_dir.rglob("metrics.csv"), key=lambda f: f.stat().st_mtime)
    if not found:
        parser.error(
            f"no metrics.csv under {train_dir}: give the directory nequip-train ran in "
            "(hydra.run.dir) with a CSVLogger, as the shipped configs set up"
        )
    metrics = found[-1]  # the newest run's
    curve = plots.learning_curve(metrics, out / "learning_curve.png")

    path = Path(args.test_data)
    if not path.is_file():
        path = Path(bundled_data_path(args.test_data))
    frames = read_molecule_npz(path, frames=range(min(args.frames, num_frames(path))))
    print(f"evaluating {len(frames)} test frames of {path.name} ...", flush=True)
    ref_e, ref_f, pred_e, pred_f = predict(load_calculator(args.model, args.device), frames)
    figure = plots.parity(ref_f, pred_f, ref_e, pred_e, out / "parity.png")
    print(f"test force MAE {1000 * np.abs(pred_f - ref_f).mean():.1f} meV/Å, "
          f"energy MAE {1000 * np.abs(pred_e - ref_e).mean():.1f} meV ({len(frames)} frames)")
    print(f"figures: {curve}, {figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
