"""Accuracy at equal training budget: the shipped quickstart configs, trained one after the
other on this machine for the same wall-clock time on the standard rMD17 protocol (950 train /
50 validation frames of ``rmd17_<molecule>_train_01.npz``, tested on the 1000 frames of
``rmd17_<molecule>_test_01.npz``).

Models (``--models``, in this order by default):

- ``equiformer``: ``configs/quickstart.yaml`` (EquiformerModel, 3 blocks);
- ``deq``: ``configs/deq_quickstart.yaml`` (DEQEquiformerModel, its shipped settings);
- ``nequip_s``: nequip's NequIP, ``PresetNequIPGNNModel`` preset S, with the quickstart
  config's training settings (loss, optimiser, batch size, schedule);
- ``deq_unroll0`` / ``deq_unroll1`` / ``deq_unroll3``: the DEQ with
  ``train_gradient: unroll`` and K = 0 (inexact), 1, 3 instead of the implicit gradient;
- ``deq_cold``: the DEQ without warm-started training;
- ``deq_tight``: the DEQ with ``train_tol: null`` (training solves at the model's own
  tolerances instead of the shipped 1e-3);
- ``deq_penalty4`` / ``deq_no_penalty``: the DEQ with the Jacobian penalty on every fourth
  training step (``jacobian_penalty_every: 4``) / without it (weight 0);
- ``equiformer_v2`` / ``deq_v2``: the quickstart models with EquiformerV2 blocks
  (:data:`V2_BLOCKS`: 16 channels of every degree up to l_max 3, m_max 2, separable layer norm;
  docs/equiformer_v2.md); ``equiformer_v2_1`` / ``equiformer_v2_2``: the explicit one with 1 / 2
  blocks instead of 3;
- ``deq_v2_variational``: ``deq_v2`` with ``fixed_point: variational`` (docs/deq.md);
  ``deq_v2_linear`` / ``deq_v2_variational_linear``: the two DEQs with ``readout_block:
  false`` (the energy from a linear map of the state's scalars, no output block);
- ``deq_v2_implicit`` / ``deq_v2_jfb`` / ``deq_v2_jfb_loose`` / ``deq_v2_2layers`` /
  ``deq_v2_jfb_2layers`` / ``deq_v2_anderson``: ``deq_v2`` with its training gradient and
  ``train_tol`` fixed: the implicit gradient at 1e-3 (the DEQ config until issue 20) / the
  Jacobian-free gradient (``unroll`` at K = 0: no backward solve; forces stay exact) at 1e-3 /
  at 1e-2 (the shipped config) / the implicit one with two blocks inside ``f`` / the
  Jacobian-free one at 1e-2 with two blocks / with Anderson acceleration for the forward solve
  (:data:`V2_DEQ_LEVERS`).

Every run prints a line per epoch; at the end the script prints a table of test energy and
force MAE, epochs and seconds per epoch, the validation force MAE after each epoch (what an
epoch teaches, whatever it costs), and writes validation force MAE against training time (one
line per model) as a PNG.

    python benchmarks/same_budget.py --data-dir ../shared/data/rmd17 --molecule ethanol \\
        --minutes 10 [--models equiformer deq nequip_s] [--out outputs/same_budget]
"""

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEQ_VARIANTS = {
    "deq_unroll0": {"train_gradient": "unroll", "train_unroll_steps": 0},
    "deq_unroll1": {"train_gradient": "unroll", "train_unroll_steps": 1},
    "deq_unroll3": {"train_gradient": "unroll", "train_unroll_steps": 3},
}
# the quickstart models' blocks as EquiformerV2 blocks (DEQuify's shape at CPU width)
V2_BLOCKS = {
    "block_type": "v2", "l_max": 3, "m_max": 2, "irreps_node_features": "16x0e+16x1o+16x2e+16x3o",
    "separable_layer_norm": True,
}
LABELS = {
    "equiformer": "EquiformerModel, configs/quickstart.yaml",
    "deq": "DEQEquiformerModel, configs/deq_quickstart.yaml",
    "nequip_s": "nequip NequIP, preset S",
    "deq_unroll0": "DEQ, train_gradient unroll K=0 (inexact)",
    "deq_unroll1": "DEQ, train_gradient unroll K=1",
    "deq_unroll3": "DEQ, train_gradient unroll K=3",
    "deq_cold": "DEQ, without warm-started training",
    "deq_tight": "DEQ, train_tol null (model tolerances)",
    "deq_penalty4": "DEQ, Jacobian penalty every 4th step",
    "deq_no_penalty": "DEQ, no Jacobian penalty",
    "equiformer_v2": "EquiformerModel, 3 EquiformerV2 blocks (l_max 3)",
    "deq_v2": "DEQ, one EquiformerV2 block (l_max 3)",
    "equiformer_v2_1": "EquiformerModel, 1 EquiformerV2 block",
    "equiformer_v2_2": "EquiformerModel, 2 EquiformerV2 blocks",
    "deq_v2_variational": "variational DEQ, one EquiformerV2 block",
    "deq_v2_linear": "DEQ, one EquiformerV2 block, linear readout",
    "deq_v2_variational_linear": "variational DEQ, one EquiformerV2 block, linear readout",
    "deq_v2_implicit": "DEQ v2, implicit gradient, train_tol 1e-3",
    "deq_v2_jfb": "DEQ v2, Jacobian-free gradient (unroll K=0), train_tol 1e-3",
    "deq_v2_jfb_loose": "DEQ v2, Jacobian-free gradient, train_tol 1e-2",
    "deq_v2_2layers": "DEQ v2, implicit, two blocks inside f",
    "deq_v2_jfb_2layers": "DEQ v2, Jacobian-free, train_tol 1e-2, two blocks inside f",
    "deq_v2_anderson": "DEQ v2, Jacobian-free, train_tol 1e-2, Anderson forward solver",
    "deq_v2_jfb_looser": "DEQ v2, Jacobian-free gradient, train_tol 3e-2",
    "deq_v2_jfb_lr": "DEQ v2, Jacobian-free, train_tol 1e-2, learning rate 0.01",
    "deq_v2_jfb_penalty": "DEQ v2, Jacobian-free, train_tol 1e-2, Jacobian penalty 1.0 every 4th step",
    "deq_v2_jfb_branch03": "DEQ v2, Jacobian-free, train_tol 1e-2, branch_scale 0.3 (less contractive f)",
}
# issue 20's levers on the v2 DEQ: (model changes, training-module changes), each with the
# training gradient and tolerance spelled out, so that the rows stay what they were when the
# shipped config changes
IMPLICIT = {"train_gradient": "implicit"}
JACOBIAN_FREE = {"train_gradient": "unroll", "train_unroll_steps": 0}
V2_DEQ_LEVERS = {
    "deq_v2_implicit": (IMPLICIT, {"train_tol": 1.0e-3}),
    "deq_v2_jfb": (JACOBIAN_FREE, {"train_tol": 1.0e-3}),
    "deq_v2_jfb_loose": (JACOBIAN_FREE, {"train_tol": 1.0e-2}),
    "deq_v2_2layers": ({**IMPLICIT, "num_deq_layers": 2}, {"train_tol": 1.0e-3}),
    "deq_v2_jfb_2layers": ({**JACOBIAN_FREE, "num_deq_layers": 2}, {"train_tol": 1.0e-2}),
    "deq_v2_anderson": ({**JACOBIAN_FREE, "solver": "anderson"}, {"train_tol": 1.0e-2}),
    "deq_v2_jfb_looser": (JACOBIAN_FREE, {"train_tol": 3.0e-2}),
    "deq_v2_jfb_lr": (
        JACOBIAN_FREE,
        {"train_tol": 1.0e-2, "optimizer": {"_target_": "torch.optim.Adam", "lr": 0.01}},
    ),
    "deq_v2_jfb_penalty": (
        {**JACOBIAN_FREE, "jacobian_penalty": True},
        {"train_tol": 1.0e-2, "jacobian_penalty_weight": 1.0, "jacobian_penalty_every": 4},
    ),
    "deq_v2_jfb_branch03": ({**JACOBIAN_FREE, "branch_scale": 0.3}, {"train_tol": 1.0e-2}),
}
EXPLICIT = ("equiformer", "nequip_s", "equiformer_v2", "equiformer_v2_1", "equiformer_v2_2")


def config(name: str, args) -> dict:
    """The shipped config of ``name`` with the data switched to the rMD17 protocol and the
    wall-clock budget set."""
    base = "quickstart" if name in EXPLICIT else "deq_quickstart"
    cfg = yaml.safe_load(open(REPO / "configs" / f"{base}.yaml"))
    data_dir = Path(args.data_dir).resolve()
    cfg["data"].update(
        train_file=str(data_dir / f"rmd17_{args.molecule}_train_01.npz"),
        test_file=str(data_dir / f"rmd17_{args.molecule}_test_01.npz"),
        train=950,
        val=50,
    )
    cfg["data"].pop("test_max_frames", None)
    cfg["trainer"].update(max_time=f"00:00:{args.minutes:02d}:00", max_epochs=100000)
    model = cfg["training_module"]["model"]
    if name == "nequip_s":
        keep = ("seed", "model_dtype", "type_names", "r_max", "avg_num_neighbors",
                "per_type_energy_shifts", "per_type_energy_scales")
        model = {k: model[k] for k in keep}
        model.update({"_target_": "nequip.model.PresetNequIPGNNModel", "preset": "S"})
    elif name in DEQ_VARIANTS:
        model.update(DEQ_VARIANTS[name])
    elif "_v2" in name:
        model.update(V2_BLOCKS)
        for v1_only in ("attention_type", "nonlinear_messages"):
            model.pop(v1_only, None)
        if name.startswith("equiformer_v2_"):
            model["num_layers"] = int(name.rsplit("_", 1)[1])
        if name.startswith("deq_v2_variational"):
            # the variational DEQ trains with its Hessian solve only, at the tolerance of its rows
            model.update(fixed_point="variational", train_gradient="implicit")
            cfg["training_module"]["train_tol"] = 1.0e-3
        if name.endswith("_linear"):
            model["readout_block"] = False
        model_changes, training_changes = V2_DEQ_LEVERS.get(name, ({}, {}))
        model.update(model_changes)
        cfg["training_module"].update(training_changes)
    elif name == "deq_cold":
        cfg["training_module"]["warm_start_training"] = False
    elif name == "deq_tight":
        cfg["training_module"]["train_tol"] = None
    elif name == "deq_penalty4":
        cfg["training_module"]["jacobian_penalty_every"] = 4
    elif name == "deq_no_penalty":
        cfg["training_module"]["jacobian_penalty_weight"] = 0.0
    cfg["training_module"]["model"] = model
    for override in args.override:
        key, value = override.split("=", 1)
        *parents, last = key.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        node[last] = yaml.safe_load(value)
    return cfg


def train(name: str, args, out: Path) -> Path:
    """Run nequip-train on the config of ``name``; returns its run directory."""
    run = out / name
    if args.reuse and finished(run / "train"):
        print(f"== {name}: reusing the finished run in {run}", flush=True)
        return run / "train"
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "config.yaml", "w") as f:
        yaml.safe_dump(config(name, args), f, sort_keys=False)
    print(f"== {name}: {LABELS[name]}, {args.minutes} min on {args.molecule}", flush=True)
    with open(run / "nequip-train.log", "w") as log:
        proc = subprocess.Popen(
            ["nequip-train", "-cp", str(run), "-cn", "config", f"hydra.run.dir={run / 'train'}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=run,
        )
        for line in proc.stdout:
            log.write(line)
            if line.startswith("epoch "):
                print("   " + line.rstrip(), flush=True)
        if proc.wait() != 0:
            sys.exit(f"nequip-train failed for {name}: see {run / 'nequip-train.log'}")
    return run / "train"


def finished(run: Path) -> bool:
    """Has the run in ``run`` trained and been tested?"""
    metrics = run / "metrics" / "version_0" / "metrics.csv"
    return metrics.exists() and "test0_epoch/forces_mae" in metrics.read_text()


def summarise(name: str, run: Path) -> dict:
    """Epochs, seconds per epoch, parameters, the learning curve and test MAEs of a run."""
    rows = list(csv.DictReader(open(run / "metrics" / "version_0" / "metrics.csv")))
    curve = [
        (float(r["time/elapsed_s"]), 1000 * float(r["val0_epoch/forces_mae"]))
        for r in rows
        if r.get("time/elapsed_s") and r.get("val0_epoch/forces_mae")
    ]
    test = [r for r in rows if r.get("test0_epoch/forces_mae")][-1]
    from nequip.model.saved_models.checkpoint import ModelFromCheckpoint
    from nequip.utils.global_state import set_global_state

    set_global_state()
    model = ModelFromCheckpoint(str(run / "best.ckpt"))
    # training steps done (the last one may be cut by the time limit) per epoch of 950 frames
    cfg = yaml.safe_load(open(run.parent / "config.yaml"))
    steps_per_epoch = -(-cfg["data"]["train"] // cfg["data"]["train_dataloader"]["batch_size"])
    steps = 1 + max(int(r["step"]) for r in rows if r.get("train_loss_epoch/weighted_sum"))
    epochs = steps / steps_per_epoch
    return {
        "name": name,
        "params": sum(p.numel() for p in model.parameters()),
        "epochs": epochs,
        "s_per_epoch": curve[-1][0] / epochs,
        "curve": curve,
        "test_forces": 1000 * float(test["test0_epoch/forces_mae"]),
        "test_energy": 1000 * float(test["test0_epoch/total_energy_mae"]),
        "iterations": deq_iterations(rows),
    }


def deq_iterations(rows):
    """Mean forward / adjoint / backward solver iterations of the training steps, per epoch."""
    keys = ("train_deq/deq_iterations", "train_deq/deq_adjoint_iterations",
            "train_deq/deq_backward_iterations")
    per_epoch = {}
    for r in rows:
        if r.get(keys[0]):
            per_epoch.setdefault(int(r["epoch"]), []).append(
                [float(r[k]) if r.get(k) else 0.0 for k in keys]
            )
    return {e: [sum(c) / len(c) for c in zip(*v)] for e, v in sorted(per_epoch.items())}


def per_epoch_cell(result, epoch: int) -> str:
    """The validation force MAE after ``epoch`` (0-based) of a run, marked ``*`` when that
    validation followed a partial epoch (the time limit stops training mid-epoch)."""
    if epoch >= len(result["curve"]):
        return ""
    partial = epoch + 1 > result["epochs"] + 1e-6
    return f"{result['curve'][epoch][1]:.1f}" + ("*" if partial else "")


def table(results, args) -> str:
    lines = [
        f"rMD17 {args.molecule}, 950 train / 50 val frames (split 01), test on the 1000 frames "
        f"of `rmd17_{args.molecule}_test_01.npz`, {args.minutes} minutes of training each, "
        "2 CPU threads, one model after the other "
        f"(`python benchmarks/same_budget.py --molecule {args.molecule} --minutes {args.minutes}`)",
        "",
        "| model | params | epochs | s / epoch | test force MAE (meV/Å) | test energy MAE (meV) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {LABELS[r['name']]} | {r['params'] / 1000:.0f} k | {r['epochs']:.1f} | "
            f"{r['s_per_epoch']:.0f} | {r['test_forces']:.1f} | {r['test_energy']:.1f} |"
        )
    lines += ["", "Validation force MAE (meV/Å) after each epoch (*: after the partial epoch the "
              "time limit cut):", ""]
    most = max(len(r["curve"]) for r in results)
    lines += ["| after epoch | " + " | ".join(LABELS[r["name"]] for r in results) + " |",
              "|---" * (len(results) + 1) + "|"]
    for epoch in range(most):
        cells = [per_epoch_cell(r, epoch) for r in results]
        lines.append(f"| {epoch + 1} | " + " | ".join(cells) + " |")
    deq = [r for r in results if r["iterations"]]
    if deq:
        lines += ["", "DEQ solver iterations per training step (forward + adjoint + backward), "
                  "mean of the logged steps of each epoch:", ""]
        for r in deq:
            epochs = ", ".join(
                f"epoch {e}: {f:.1f} + {a:.1f} + {b:.1f}" for e, (f, a, b) in r["iterations"].items()
            )
            lines.append(f"- {LABELS[r['name']]}: {epochs}")
    return "\n".join(lines)


def plot(results, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for r in results:
        t, f = zip(*r["curve"])
        ax.plot([s / 60 for s in t], f, marker=".", label=f"{LABELS[r['name']]}")
    ax.set_yscale("log")
    ax.set_xlabel("training time (min, 2 CPU threads)")
    ax.set_ylabel("validation force MAE (meV/Å)")
    ax.set_title(f"rMD17 {args.molecule}: accuracy against training time")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="directory with the rMD17 npz files")
    parser.add_argument("--molecule", default="ethanol")
    parser.add_argument("--minutes", type=int, default=10, help="training budget per model")
    parser.add_argument("--models", nargs="+", default=["equiformer", "deq", "nequip_s"],
                        choices=list(LABELS))
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config changes for every model, e.g. training_module.optimizer.lr=0.005")
    parser.add_argument("--out", default="outputs/same_budget", help="run directories")
    parser.add_argument("--png", default=None, help="learning curves (default: in --out)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the finished runs found in --out; train only the missing ones")
    args = parser.parse_args()
    out = Path(args.out).resolve() / f"{args.molecule}_{args.minutes}min"
    start = time.time()
    results = [summarise(name, train(name, args, out)) for name in args.models]
    print()
    print(table(results, args))
    png = Path(args.png or out / f"learning_curves_{args.molecule}_{args.minutes}min.png")
    plot(results, args, png)
    print(f"\nlearning curves: {png}; all runs: {out}; {(time.time() - start) / 60:.0f} min")


if __name__ == "__main__":
    main()
