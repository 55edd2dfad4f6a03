"""Time per energy+forces call of Equiformer models against nequip's NequIP, side by side in one
run, on aspirin (21 atoms) and a periodic box of 24 aspirin molecules (504 atoms), r_max 5 Å:

- nequip's NequIP, preset M (4 layers, l_max 2, 128x0e+64x1o+32x2e; ``PresetNequIPGNNModel``);
- EquiformerModel with the paper's defaults (6 blocks, the same irreps);
- EquiformerModel and DEQEquiformerModel of the quickstart size (32x0e+16x1o+8x2e; the DEQ
  solves cold, fresh weights).

    python benchmarks/speed_equiformer.py [--repeats 5] [--compile] [--out docs/benchmark_equiformer.md]

Models are freshly initialised (timing does not depend on training, except the DEQ's iteration
count), float32, eager, CPU threads as torch sets them. ``--compile`` adds AOTInductor-compiled
times of the first two models on aspirin (nequip's export path, as ``nequip-compile --mode
aotinductor --target ase``; about 10 minutes of compilation on 2 CPU cores).
"""

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ase import Atoms

from nequip.data import AtomicDataDict, compute_neighborlist_, from_ase
from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper
from nequip.model import PresetNequIPGNNModel
from nequip.nn.compile import DictInputOutputWrapper
from nequip.scripts._compile_utils import COMPILE_TARGET_DICT
from nequip.utils.aot import aot_export_model
from nequip.utils.global_state import set_global_state

from nequip_deq._resolvers import bundled_data_path
from nequip_deq.data import read_molecule_npz
from nequip_deq.model import DEQEquiformerModel, EquiformerModel

TYPES = ["C", "H", "O"]
R_MAX = 5.0
COMMON = dict(
    seed=0,
    model_dtype="float32",
    type_names=TYPES,
    r_max=R_MAX,
    avg_num_neighbors=14.0,
    per_type_energy_shifts={t: 0.0 for t in TYPES},
    per_type_energy_scales={t: 1.0 for t in TYPES},
)
QUICKSTART = dict(
    irreps_node_features="32x0e+16x1o+8x2e", num_output_features=64, num_basis=16,
    radial_mlp_width=32,
)


def models():
    yield "nequip NequIP, preset M (4 layers, l_max 2, 128x0e+64x1o+32x2e)", PresetNequIPGNNModel(
        preset="M", **COMMON
    )
    yield "EquiformerModel, paper defaults (6 blocks, same irreps)", EquiformerModel(**COMMON)
    yield "EquiformerModel, quickstart size (3 blocks)", EquiformerModel(
        num_layers=3, **QUICKSTART, **COMMON
    )
    yield "DEQEquiformerModel, quickstart size, cold", DEQEquiformerModel(**QUICKSTART, **COMMON)


def aspirin() -> Atoms:
    atoms = read_molecule_npz(bundled_data_path("rmd17_aspirin_test_01_first200.npz"), frames=[0])[0]
    atoms.calc = None
    atoms.positions -= atoms.get_center_of_mass()
    return atoms


def molecule() -> Atoms:
    atoms = aspirin()
    atoms.cell = [30.0] * 3  # finite dummy cell (pbc off): compiled models check stress
    atoms.positions += 15.0
    return atoms


def box(shape=(2, 3, 4), spacing: float = 8.5, seed: int = 0) -> Atoms:
    """24 randomly oriented aspirin molecules on a grid, periodic (504 atoms)."""
    rng = np.random.default_rng(seed)
    atoms = Atoms(cell=[s * spacing for s in shape], pbc=True)
    for index in np.ndindex(*shape):
        mol = aspirin()
        mol.rotate(float(rng.uniform(0, 360)), rng.normal(size=3), center=(0, 0, 0))
        mol.positions += (np.array(index) + 0.5) * spacing
        atoms += mol
    return atoms


def graph(atoms: Atoms) -> AtomicDataDict.Type:
    mapper = ChemicalSpeciesToAtomTypeMapper(
        model_type_names=TYPES, chemical_species_to_atom_type_map={t: t for t in TYPES}
    )
    return mapper(compute_neighborlist_(from_ase(atoms), r_max=R_MAX))


def time_calls(fn, data, repeats: int) -> float:
    """Mean seconds per energy+forces call, after 2 warm-up calls."""
    for _ in range(2):
        fn(dict(data))[AtomicDataDict.FORCE_KEY].sum().item()
    start = time.perf_counter()
    for _ in range(repeats):
        fn(dict(data))[AtomicDataDict.FORCE_KEY].sum().item()
    return (time.perf_counter() - start) / repeats


def compile_ase(model, data, path):
    target = COMPILE_TARGET_DICT["ase"]
    batch_map = target["batch_map_settings"](
        {
            "graph": torch.export.Dim.STATIC,
            "node": torch.export.Dim("num_nodes", min=2),
            "edge": torch.export.Dim("num_edges", min=2),
        }
    )
    compile_data = target["data_settings"](AtomicDataDict.with_batch_(dict(data)))
    aot_export_model(
        model=model,
        device="cpu",
        input_fields=target["input"],
        output_fields=target["output"],
        data=compile_data,
        batch_map=batch_map,
        output_path=str(path),
    )
    loaded = torch._inductor.aoti_load_package(str(path))
    wrapped = DictInputOutputWrapper(loaded, target["input"], target["output"])
    return lambda d: wrapped(target["data_settings"](AtomicDataDict.with_batch_(d)))


def attention_breakdown(data, repeats: int):
    """Forward + backward ms of the parts of one attention block of the paper-default model
    on the edges of ``data`` (what an Equiformer block computes per edge)."""
    from e3nn.o3._irreps import Irreps

    from nequip_deq.nn.attention.graph_attention import EquivariantGraphAttention

    torch.manual_seed(0)
    X = Irreps("128x0e+64x1o+32x2e")
    sh = Irreps.spherical_harmonics(2, p=-1)
    num_edges, num_nodes = data[AtomicDataDict.EDGE_INDEX_KEY].shape[1], 504
    attn = EquivariantGraphAttention(X, sh, 32, 4)
    from e3nn.o3 import spherical_harmonics

    y = spherical_harmonics(sh, torch.randn(num_edges, 3), True, normalization="component")
    emb = torch.randn(num_edges, 32)
    w = attn.radial(emb).detach().requires_grad_()
    m = torch.randn(num_edges, X.dim, requires_grad=True)
    f = attn.dtp(m, y, w).detach().requires_grad_()
    g = attn.value.gate(f).detach().requires_grad_()
    h = attn.value.dtp(g, y).detach().requires_grad_()
    x = torch.randn(num_nodes, X.dim, requires_grad=True)
    center = torch.randint(0, num_nodes, (num_edges,))
    neighbor = torch.randint(0, num_nodes, (num_edges,))
    cutoff = torch.rand(num_edges, 1)
    parts = {
        "radial MLP (per-edge weights)": lambda: attn.radial(emb),
        "depth-wise tensor product x ⊗ Y": lambda: attn.dtp(m, y, w),
        "attention logits": lambda: attn.logits(x, f, center),
        "value: gated linear map of the edge features": lambda: attn.value.gate(f),
        "value: second tensor product": lambda: attn.value.dtp(g, y),
        "value: linear map to X": lambda: attn.value.lin(h),
        "whole attention": lambda: attn(x, y, attn.radial(emb), cutoff, center, neighbor),
    }
    out = {}
    for name, fn in parts.items():
        for _ in range(2):
            fn().square().sum().backward()
        start = time.perf_counter()
        for _ in range(repeats):
            fn().square().sum().backward()
        out[name] = 1e3 * (time.perf_counter() - start) / repeats
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time compiled models")
    parser.add_argument("--out", default="docs/benchmark_equiformer.md")
    args = parser.parse_args()

    set_global_state()
    systems = {"aspirin": graph(molecule()), "box": graph(box())}
    sizes = {
        name: (d[AtomicDataDict.POSITIONS_KEY].shape[0], d[AtomicDataDict.EDGE_INDEX_KEY].shape[1])
        for name, d in systems.items()
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, model) in enumerate(models()):
            model.eval()
            params = sum(p.numel() for p in model.parameters())
            times = {s: time_calls(model, d, args.repeats) for s, d in systems.items()}
            compiled = None
            if args.compile and i < 2:
                print(f"compiling {name} (minutes) ...", flush=True)
                fn = compile_ase(model, systems["aspirin"], Path(tmp) / f"m{i}.nequip.pt2")
                compiled = time_calls(fn, systems["aspirin"], args.repeats)
            rows.append((name, params, times, compiled))
            print(f"{name}: {params} params, " + ", ".join(
                f"{s} {1e3 * t:.1f} ms" for s, t in times.items()), flush=True)

    ref = rows[0][2]
    (na, ea), (nb, eb) = sizes["aspirin"], sizes["box"]
    lines = [
        f"Energy + forces per call, eager float32, {torch.get_num_threads()} CPU threads "
        f"({platform.processor() or platform.machine()}), torch {torch.__version__}, mean of "
        f"{args.repeats} calls after 2 warm-up calls; aspirin: {na} atoms, {ea} edges; box: "
        f"{nb} atoms (24 aspirin molecules, periodic), {eb} edges; r_max {R_MAX} Å.",
        "",
        "| model | params | aspirin (ms) | / NequIP-M | box (ms) | / NequIP-M |",
        "|---|---|---|---|---|---|",
    ]
    for name, params, times, _ in rows:
        lines.append(
            f"| {name} | {params / 1e6:.2f} M | {1e3 * times['aspirin']:.1f} | "
            f"{times['aspirin'] / ref['aspirin']:.2f} | {1e3 * times['box']:.0f} | "
            f"{times['box'] / ref['box']:.2f} |"
        )
    if args.compile:
        lines += ["", "AOTInductor-compiled, aspirin:", ""]
        base = rows[0][3]
        for name, _, _, compiled in rows[:2]:
            lines.append(f"- {name}: {1e3 * compiled:.1f} ms ({compiled / base:.2f} x NequIP-M)")
    breakdown = attention_breakdown(systems["box"], args.repeats)
    lines += [
        "",
        f"One attention block of the paper-default model on the box's {eb} edges, forward + "
        "backward (ms):",
        "",
    ] + [f"- {name}: {ms:.0f}" for name, ms in breakdown.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        "# Speed: Equiformer models vs NequIP\n\nCommand: `python benchmarks/speed_equiformer.py`"
        "\n\n" + text
    )


if __name__ == "__main__":
    main()
