"""The models the MD benchmarks compare, as checkpoints and compiled files in a work directory
(made once, reused by later runs; compiling takes minutes and says so).

- ``deq``: the trained DEQ checkpoint given on the command line;
- ``explicit6`` (any ``explicit<N>``): EquiformerModel with 6 (N) blocks of the DEQ's width
  (every architecture argument of the DEQ: block type, ``irreps_node_features`` ...), and ``nequip``: nequip's NequIPGNNModel with the same
  irreps (4 layers, ``l_max`` 2, ``parity: false``, ``num_features`` per degree). Both are
  trained for one epoch on 10 frames: their *cost* per call is what the speed benchmarks use
  (it does not depend on the weights); the drift benchmark uses trained models instead.

Used by ``md_speed.py``, ``shadow_speed.py``, ``size_scaling.py`` and ``nve_drift.py``.
"""

import inspect
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from e3nn.o3 import Irreps

from nequip_deq.model.architecture import BLOCK_TYPE_ARGS, EquiformerArchitecture

REPO = Path(__file__).resolve().parent.parent


def model_config(checkpoint: Path) -> dict:
    """The (resolved) model config stored in a nequip checkpoint."""
    return dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["hyper_parameters"]["model"])


def _timing_config(deq_checkpoint: Path, kind: str) -> dict:
    """The quickstart config with the model ``kind`` (``explicit<N>``: N blocks, or ``nequip``)
    at the DEQ's width, one epoch on 10 frames."""
    deq = model_config(deq_checkpoint)
    cfg = yaml.safe_load(open(REPO / "configs" / "quickstart.yaml"))
    cfg["data"].update(train=10, val=5)
    cfg["trainer"].update(max_epochs=1)
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if "ModelCheckpoint" in c["_target_"]]
    model = cfg["training_module"]["model"]
    if kind.startswith("explicit"):
        # every architecture argument of the DEQ (block type, irreps, ...), none of its own
        architecture = inspect.signature(EquiformerArchitecture.__init__).parameters
        shared = {k: v for k, v in deq.items() if k in architecture and k != "self"}
        model.update(shared, num_layers=int(kind[len("explicit"):]))
        other = "v1" if model.get("block_type", "v1") == "v2" else "v2"
        for name in BLOCK_TYPE_ARGS[other]:  # the quickstart's settings of the other block type
            model.pop(name, None)
    else:
        irreps = Irreps(deq["irreps_node_features"])
        keep = ("seed", "model_dtype", "type_names", "r_max", "avg_num_neighbors",
                "per_type_energy_shifts", "per_type_energy_scales")
        model = {k: model[k] for k in keep}
        model.update(
            _target_="nequip.model.NequIPGNNModel", num_layers=4, l_max=irreps.lmax, parity=False,
            num_features=[mul for mul, _ in irreps],
        )
        cfg["training_module"]["model"] = model
    return cfg


def checkpoint(kind: str, work: Path, deq_checkpoint: Path) -> Path:
    """``work/<kind>/best.ckpt`` for ``explicit<N>`` / ``nequip`` (trained once, then reused)."""
    run = (work / kind).resolve()
    ckpt = run / "best.ckpt"
    if ckpt.exists():
        return ckpt
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "config.yaml", "w") as f:
        yaml.safe_dump(_timing_config(deq_checkpoint, kind), f, sort_keys=False)
    print(f"== making the {kind} model for timing (one short epoch) -> {run}", flush=True)
    _run(["nequip-train", "-cp", str(run), "-cn", "config", f"hydra.run.dir={run}"], run / "train.log")
    return ckpt


def compiled(source: Path, out: Path, target: str) -> Path:
    """``nequip-compile --mode aotinductor`` of ``source`` for ``target`` into ``out`` (reused
    when it exists)."""
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"== compiling {source.name} for {target} (takes a few minutes) -> {out}", flush=True)
    command = ["nequip-compile", str(source), str(out), "--mode", "aotinductor", "--device", "cpu",
               "--target", target]
    _run(command, out.with_suffix(".log"))
    return out


def modified_package(checkpoint: Path, out: Path, modifiers) -> Path:
    """The checkpoint packaged (``nequip-package build``, reused) and given ``modifiers``
    (``[(name, {argument: value})]``) with ``nequip-package modify`` into ``out``."""
    package = checkpoint.with_suffix(".nequip.zip")
    if not package.exists():
        _run(["nequip-package", "build", str(checkpoint), str(package)], package.with_suffix(".log"))
    if not out.exists():
        command = ["nequip-package", "modify", str(package), str(out)]
        for name, arguments in modifiers:
            command += ["--modifier", name, *(f"{k}={v}" for k, v in arguments.items())]
        _run(command, out.with_suffix(".log"))
    return out


def deq_models(checkpoint: Path, work: Path, tolerance=None, extrapolation: str = "xlbomd"):
    """The DEQ compiled for ASE (``ase_deq``: takes its tolerance with each call) and for the
    pair-style call (``pair_nequip_deq`` with the state cache and its ``extrapolation``; its
    tolerance compiled in with ``set_DEQSolverTolerances`` when ``tolerance`` is given, else
    the model's)."""
    deq_ase = compiled(checkpoint, work / "deq_ase.nequip.pt2", "ase_deq")
    name, modifiers = f"deq_pair_{extrapolation}", [("enable_DEQStateCache", {"extrapolation": extrapolation})]
    if tolerance is not None:
        name += f"_tol{tolerance:g}"
        modifiers.append(("set_DEQSolverTolerances", {"f_tol": tolerance, "b_tol": tolerance}))
    package = modified_package(checkpoint, work / f"{name}.nequip.zip", modifiers)
    return deq_ase, compiled(package, work / f"{name}.nequip.pt2", "pair_nequip_deq")


def timing_models(deq_checkpoint: Path, work: Path):
    """The explicit 6-block model and NequIP, compiled for ``ase``, and the explicit model's
    checkpoint."""
    explicit_ckpt = checkpoint("explicit6", work, deq_checkpoint)
    explicit = compiled(explicit_ckpt, work / "explicit6.nequip.pt2", "ase")
    nequip = compiled(checkpoint("nequip", work, deq_checkpoint), work / "nequip.nequip.pt2", "ase")
    return explicit, nequip, explicit_ckpt


def _run(command, log: Path) -> None:
    with open(log, "w") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"{command[0]} failed: see {log}")
