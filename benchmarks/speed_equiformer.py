"""Time per energy+forces call on aspirin (21 atoms): the default 6-block EquiformerModel vs
nequip's NequIP model with the same feature irreps and depth, eager and AOTInductor-compiled,
measured side by side in one run.

    python benchmarks/speed_equiformer.py [--repeats 20] [--out docs/benchmark_equiformer.md]

Models are freshly initialised (timing does not depend on training), float32, CPU threads as
torch sets them. Compilation uses nequip's own export path (the one ``nequip-compile
--mode aotinductor --target ase`` uses).
"""

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from nequip.data import AtomicDataDict, compute_neighborlist_, from_ase
from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper
from nequip.model import NequIPGNNModel
from nequip.nn.compile import DictInputOutputWrapper
from nequip.scripts._compile_utils import COMPILE_TARGET_DICT
from nequip.utils.aot import aot_export_model
from nequip.utils.global_state import set_global_state

from nequip_deq.model import EquiformerModel
from nequip_deq.scripts.md import give_molecule_a_cell, load_structure

TYPES = ["C", "H", "O"]
R_MAX = 5.0
COMMON = dict(
    seed=0,
    model_dtype="float32",
    type_names=TYPES,
    r_max=R_MAX,
    avg_num_neighbors=14.4,
    per_type_energy_shifts={t: 0.0 for t in TYPES},
    per_type_energy_scales={t: 1.0 for t in TYPES},
)


def models():
    yield "EquiformerModel (6 blocks, 128x0e+64x1o+32x2e, l_max 2, MLP attn, non-linear msgs)", EquiformerModel(**COMMON)
    yield "NequIPGNNModel (6 layers, 128x0e+64x1o+32x2e, l_max 2)", NequIPGNNModel(
        **COMMON, num_layers=6, l_max=2, parity=False, num_features=[128, 64, 32], type_embed_num_features=16
    )


def aspirin_data():
    atoms = load_structure("rmd17_aspirin_test_01_first200.npz")
    give_molecule_a_cell(atoms)
    mapper = ChemicalSpeciesToAtomTypeMapper(
        model_type_names=TYPES, chemical_species_to_atom_type_map={t: t for t in TYPES}
    )
    return mapper(compute_neighborlist_(from_ase(atoms), r_max=R_MAX))


def time_calls(fn, data, repeats):
    for _ in range(3):
        fn(dict(data))
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(dict(data))
        out[AtomicDataDict.FORCE_KEY].sum().item()
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="docs/benchmark_equiformer.md")
    args = parser.parse_args()

    set_global_state()
    data = aspirin_data()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, model) in enumerate(models()):
            model.eval()
            params = sum(p.numel() for p in model.parameters())
            eager = time_calls(model, data, args.repeats)
            t0 = time.perf_counter()
            compiled_fn = compile_ase(model, data, Path(tmp) / f"m{i}.nequip.pt2")
            compile_s = time.perf_counter() - t0
            compiled = time_calls(compiled_fn, data, args.repeats)
            rows.append((name, params, eager, compiled, compile_s))
            print(f"{name}: {params} params, eager {1e3 * eager:.1f} ms, compiled {1e3 * compiled:.1f} ms, compile {compile_s:.0f} s", flush=True)

    ref = rows[1]
    lines = [
        f"Aspirin (21 atoms, {int(data[AtomicDataDict.EDGE_INDEX_KEY].shape[1])} edges at r_max = {R_MAX} Å), "
        f"energy + forces per call, float32, {torch.get_num_threads()} CPU threads "
        f"({platform.processor() or platform.machine()}), torch {torch.__version__}, mean of {args.repeats} calls.",
        "",
        "| model | parameters | eager (ms) | compiled (ms) | eager / NequIP eager | compiled / NequIP compiled | compile time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, params, eager, compiled, compile_s in rows:
        lines.append(
            f"| {name} | {params / 1e6:.2f} M | {1e3 * eager:.1f} | {1e3 * compiled:.1f} | "
            f"{eager / ref[2]:.2f} | {compiled / ref[3]:.2f} | {compile_s:.0f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        "# Speed: EquiformerModel vs NequIP\n\nCommand: `python benchmarks/speed_equiformer.py`\n\n" + text
    )


if __name__ == "__main__":
    main()
