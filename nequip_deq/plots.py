"""Figures a user would rather look at than read: learning curves, force and energy parity,
total energy over an MD run and DEQ solver iterations per MD step (PNG, matplotlib's
non-interactive backend)."""

import csv
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_epoch_metrics(metrics_csv: Path) -> Dict[str, List[float]]:
    """Per-epoch curves of a nequip ``metrics.csv`` (Lightning's CSV logger), in meV/Å and
    meV: validation force MAE and RMSE, training force RMSE (square root of the epoch's force
    MSE loss term) and validation energy MAE; ``<name>_epoch`` holds the epochs of each."""
    rows = list(csv.DictReader(open(metrics_csv)))
    wanted = {
        "val_forces_mae": ("val0_epoch/forces_mae", 1.0),
        "val_forces_rmse": ("val0_epoch/forces_rmse", 1.0),
        "train_forces_rmse": ("train_loss_epoch/forces_mse", 0.5),
        "val_energy_mae": ("val0_epoch/total_energy_mae", 1.0),
    }
    out: Dict[str, List[float]] = {}
    for name, (key, power) in wanted.items():
        values = [(int(r["epoch"]), float(r[key]) ** power) for r in rows if r.get(key)]
        out[f"{name}_epoch"] = [e for e, _ in values]
        out[name] = [1000 * v for _, v in values]
    return out


def learning_curve(metrics_csv: Path, path: Path) -> Path:
    """Force errors (validation MAE and RMSE, training RMSE) and validation energy MAE per
    epoch."""
    m = read_epoch_metrics(metrics_csv)
    if not m["val_forces_mae"]:
        raise ValueError(f"{metrics_csv} has no validation force MAE (`val0_epoch/forces_mae`).")
    plt = _pyplot()
    fig, (ax_f, ax_e) = plt.subplots(1, 2, figsize=(10, 4))
    for name, label in (
        ("val_forces_mae", "validation MAE"),
        ("val_forces_rmse", "validation RMSE"),
        ("train_forces_rmse", "training RMSE (mean over the epoch)"),
    ):
        if m[name]:
            ax_f.plot(m[f"{name}_epoch"], m[name], marker=".", label=label)
    ax_f.set_ylabel("force error (meV/Å)")
    ax_e.plot(m["val_energy_mae_epoch"], m["val_energy_mae"], marker=".", label="validation MAE")
    ax_e.set_ylabel("energy error (meV)")
    for ax in (ax_f, ax_e):
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle("learning curve")
    return _save(fig, path)


def parity(
    reference_forces: np.ndarray,
    predicted_forces: np.ndarray,
    reference_energies: np.ndarray,
    predicted_energies: np.ndarray,
    path: Path,
) -> Path:
    """Predicted against reference force components (eV/Å) and energies (eV, each shifted by
    the reference mean), with the MAE in the titles."""
    plt = _pyplot()
    fig, (ax_f, ax_e) = plt.subplots(1, 2, figsize=(10, 4.5))
    shift = reference_energies.mean()
    for ax, ref, pred, unit, scale, name in (
        (ax_f, reference_forces.ravel(), predicted_forces.ravel(), "eV/Å", "meV/Å", "force components"),
        (ax_e, reference_energies - shift, predicted_energies - shift, "eV", "meV", "energies"),
    ):
        lo, hi = min(ref.min(), pred.min()), max(ref.max(), pred.max())
        ax.plot([lo, hi], [lo, hi], color="grey", lw=1)
        ax.scatter(ref, pred, s=3, alpha=0.5)
        ax.set_xlabel(f"reference ({unit})")
        ax.set_ylabel(f"predicted ({unit})")
        ax.set_title(f"{name}: MAE {1000 * np.abs(pred - ref).mean():.1f} {scale}")
        ax.grid(alpha=0.3)
    fig.suptitle(f"parity on {len(reference_energies)} test frames")
    return _save(fig, path)


def md_energies(
    time_fs: Sequence[float],
    total: Sequence[float],
    potential: Sequence[float],
    num_atoms: int,
    path: Path,
) -> Path:
    """Total and potential energy per atom (meV, relative to the first step) over an MD run:
    in NVE the total energy must stay flat."""
    curves = {
        label: 1000 * (np.asarray(values) - values[0]) / num_atoms
        for values, label in ((total, "total"), (potential, "potential"))
    }
    return line_plot(time_fs, curves, "time (fs)", "energy − energy at t = 0 (meV/atom)", "MD energies", path)


def solver_iterations(
    steps: Sequence[int], forward: Sequence[float], adjoint: Sequence[float], path: Path
) -> Path:
    """DEQ forward and adjoint solver iterations per MD step (the first step starts cold)."""
    curves = {"forward": forward, "adjoint": adjoint}
    return line_plot(steps, curves, "MD step", "iterations", "DEQ solver iterations per MD step", path)


def line_plot(x, curves: Dict[str, Sequence[float]], xlabel: str, ylabel: str, title: str, path: Path,
              log_y: bool = False, log_x: bool = False, marker: str = "") -> Path:
    """One line per entry of ``curves`` (label -> values) against ``x`` (``None``: each
    against its own index)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for label, values in curves.items():
        ax.plot(np.arange(len(values)) if x is None else x, values, marker, label=label, lw=1)
    if log_y:
        ax.set_yscale("log")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
