"""Cost of one DEQ training step against the explicit 6-block Equiformer of the same width.

One training step = energy + forces of a batch of 5 rMD17 aspirin frames, a force loss,
backward to the parameters (what ``nequip-train`` does per batch). For each model: peak CPU
memory allocated during the step (torch's allocator profiler), median wall time over a few
steps, and the DEQ's solver iterations per frame (forward, adjoint, and the implicit
gradient's backward solve). Also the time of one application of the DEQ function f with
its geometry-only part (the blocks' radial weights) computed once per call, as the model
does, against recomputing it in every application.

    python benchmarks/deq_training_step.py [--deq-checkpoint A.ckpt --explicit-checkpoint B.ckpt]
        [--irreps 32x0e+16x1o+8x2e] [--steps 5]

Without checkpoints both models are fresh at ``--irreps`` (quickstart width by default); the
explicit model is then the quickstart config's model with 6 blocks. Iteration counts of
trained models are what users see, so docs/deq.md records the command with checkpoints.
"""

import argparse
import gc
import time
import warnings

import numpy as np
import torch

from nequip.data import AtomicDataDict
from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform
from nequip.integrations.ase import NequIPCalculator
from nequip.utils.global_state import set_global_state

from nequip_deq._resolvers import bundled_data_path
from nequip_deq.data.molecule_npz import read_molecule_npz
from nequip_deq.model import DEQEquiformerModel, EquiformerModel
from nequip_deq.nn.fixed_point.layer import DEQEquiformerLayer
from nequip_deq.integrations.ase import load_calculator

TYPES = ["H", "C", "O"]
R_MAX = 5.0
QUICKSTART = dict(
    l_max=2, num_heads=4, num_output_features=64, num_basis=16, radial_mlp_width=32,
    avg_num_neighbors=14.0,
)


def models(args):
    """Eager DEQ and 6-block models: from checkpoints, or fresh at ``--irreps``."""
    if args.deq_checkpoint and args.explicit_checkpoint:
        return (
            load_calculator(args.deq_checkpoint, "cpu").model,
            load_calculator(args.explicit_checkpoint, "cpu").model,
        )
    set_global_state()
    common = dict(
        seed=0, model_dtype="float32", type_names=TYPES, r_max=R_MAX,
        irreps_node_features=args.irreps, **QUICKSTART,
    )
    return DEQEquiformerModel(**common), EquiformerModel(num_layers=6, **common)


def aspirin_batch(model, frames: int = 5):
    calc = NequIPCalculator(
        model,
        device="cpu",
        transforms=[
            ChemicalSpeciesToAtomTypeMapper(
                model_type_names=TYPES, chemical_species_to_atom_type_map={t: t for t in TYPES}
            ),
            NeighborListTransform(r_max=R_MAX),
        ],
    )
    atoms = read_molecule_npz(
        bundled_data_path("rmd17_aspirin_train_01_first250.npz"), frames=range(frames)
    )
    return AtomicDataDict.batched_from_list([calc.atoms_to_data(a) for a in atoms])


def step(model, data):
    """One training step; returns the model output (detached statistics). A DEQ layer that
    computed a Jacobian penalty (``jacobian_penalty: true``) adds it to the loss, as
    ``DEQLightningModule`` does."""
    out = model(dict(data))
    loss = out[AtomicDataDict.FORCE_KEY].square().mean()
    for m in model.modules():
        if isinstance(m, DEQEquiformerLayer) and m.last_jacobian_penalty is not None:
            loss = loss + m.last_jacobian_penalty
            m.last_jacobian_penalty = None
    loss.backward()
    return out


def peak_memory(model, data) -> float:
    """Peak MiB allocated during one step (running total of allocations and frees, in event
    order, from torch's CPU profiler)."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(model, data)
    model.zero_grad(set_to_none=True)
    events = sorted(
        (e for e in prof.events() if e.self_cpu_memory_usage != 0),
        key=lambda e: e.time_range.start,
    )
    current = peak = 0
    for e in events:
        current += e.self_cpu_memory_usage
        peak = max(peak, current)
    return peak / 2**20


def training_step_cost(model, data, steps: int):
    """(peak MiB, median s per step, mean forward / adjoint / backward iterations per frame)."""
    model.train()
    layer = next((m for m in model.modules() if isinstance(m, DEQEquiformerLayer)), None)
    times, its = [], []
    for _ in range(steps + 1):
        start = time.perf_counter()
        out = step(model, data)
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
        if layer is not None:
            backward = layer.last_backward_statistics
            its.append(
                (
                    float(out["deq_iterations"].float().mean()),
                    float(out["deq_adjoint_iterations"].float().mean()),
                    float(backward["iterations"].float().mean()) if backward else 0.0,
                )
            )
            layer.last_backward_statistics = None
    mib = peak_memory(model, data)
    model.eval()
    iterations = tuple(np.mean(its[1:], axis=0)) if its else (np.nan,) * 3
    return mib, float(np.median(times[1:])), iterations


def f_application_time(model, data, repeats: int = 20):
    """ms per application of f: radial weights computed once (as the model does) vs in every
    application (as before the geometry-only part was hoisted out of the solver loop)."""
    layer = next(m for m in model.modules() if isinstance(m, DEQEquiformerLayer))
    model.eval()
    out = model(dict(data))
    d = dict(out)
    x_hat = layer.injection.normalize(out[AtomicDataDict.NODE_FEATURES_KEY].detach())
    z = out["deq_state"].detach()
    result = {}
    with torch.no_grad():
        weights = layer.edge_weights(d)
        for name, call in (
            ("hoisted", lambda: layer.f(z, d, x_hat, weights)),
            ("recomputed", lambda: layer.f(z, d, x_hat, layer.edge_weights(d))),
        ):
            call()
            start = time.perf_counter()
            for _ in range(repeats):
                call()
            result[name] = 1e3 * (time.perf_counter() - start) / repeats
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--irreps", default="32x0e+16x1o+8x2e", help="width of fresh models")
    parser.add_argument("--deq-checkpoint", default=None, help="trained DEQ model (.ckpt)")
    parser.add_argument("--explicit-checkpoint", default=None, help="trained 6-block model (.ckpt)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)

    deq, explicit = models(args)
    data = aspirin_batch(explicit.eval())
    layer = next(m for m in deq.modules() if isinstance(m, DEQEquiformerLayer))
    print(
        f"one training step: energy + forces of 5 rMD17 aspirin frames, force loss, backward; "
        f"float32, {torch.get_num_threads()} CPU threads; DEQ f_tol {layer.f_tol:g}, "
        f"b_tol {layer.b_tol:g}, grad_tol {layer.grad_tol:g}",
        flush=True,
    )
    rows = {"Equiformer, 6 blocks": training_step_cost(explicit, data, args.steps)}
    tols = (layer.f_tol, layer.b_tol, layer.grad_tol)
    for name, implicit, unroll_steps, tol, penalty in (
        ("DEQ, train_gradient implicit", True, 0, None, False),
        ("DEQ, train_gradient implicit, train_tol 1e-3", True, 0, 1e-3, False),
        ("DEQ, implicit, train_tol 1e-3, Jacobian penalty (deq_quickstart)", True, 0, 1e-3, True),
        ("DEQ, train_gradient unroll, K=0 (gradient wrong)", False, 0, None, False),
        ("DEQ, train_gradient unroll, K=1", False, 1, None, False),
        ("DEQ, train_gradient unroll, K=3", False, 3, None, False),
    ):
        layer.train_implicit, layer.train_unroll_steps = implicit, unroll_steps
        layer.f_tol, layer.b_tol, layer.grad_tol = tols if tol is None else (tol,) * 3
        layer.jacobian_penalty = penalty
        rows[name] = training_step_cost(deq, data, args.steps)
        print(f"  measured {name}", flush=True)
    layer.f_tol, layer.b_tol, layer.grad_tol = tols
    layer.jacobian_penalty = False
    n_deq = sum(p.numel() for p in deq.parameters())
    n_exp = sum(p.numel() for p in explicit.parameters())
    print(f"parameters: DEQ {n_deq}, Equiformer 6 blocks {n_exp}")
    print()
    print("| model | peak MiB | / 6-block | s / step | / 6-block | iterations fwd + adj + bwd |")
    print("|---|---|---|---|---|---|")
    mib0, s0 = rows["Equiformer, 6 blocks"][:2]
    for name, (mib, sec, its) in rows.items():
        it = "—" if np.isnan(its[0]) else f"{its[0]:.1f} + {its[1]:.1f} + {its[2]:.1f}"
        print(f"| {name} | {mib:.0f} | {mib / mib0:.2f} | {sec:.2f} | {sec / s0:.2f} | {it} |")
    cost = f_application_time(deq, data)
    print()
    print(
        f"one application of f (5 aspirin frames, no grad): {cost['hoisted']:.2f} ms with the "
        f"radial weights computed once per call, {cost['recomputed']:.2f} ms recomputing them "
        f"(x{cost['recomputed'] / cost['hoisted']:.2f})"
    )


if __name__ == "__main__":
    main()
