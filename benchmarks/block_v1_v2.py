"""Time per energy+forces call of one Equiformer block (v1: depth-wise tensor products) against
one EquiformerV2 block (v2: SO(2) convolutions in edge frames), side by side in one run, at
l_max 2, 3, 4 and 6, on aspirin (21 atoms) and a periodic box of 24 aspirin molecules (504
atoms), r_max 5 Å, float32, eager, fresh weights.

Both block types get the same features, ``C`` channels of every degree up to l_max
(``--channels``, default 16), 4 heads, m_max 2 for v2. The cost of one block is the
difference between models of 4 and 2 blocks, halved (the encoder and readout cancel; each v2
block computes its edge frames, so they are included).

    python benchmarks/block_v1_v2.py [--repeats 3] [--channels 16] [--out table.md]

Prints a line per measurement and writes a markdown table: ms per block and call, v2/v1, and
the growth with l_max (exponent of a power law in l_max + 1 from 2 to 6); recorded in
docs/equiformer_v2.md.
"""

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from nequip.utils.global_state import set_global_state

from nequip_deq.model import EquiformerModel

from speed_equiformer import COMMON, box, graph, molecule, time_calls

L_MAX = (2, 3, 4, 6)


def model(block_type: str, l_max: int, channels: int, num_layers: int):
    irreps = "+".join(f"{channels}x{l}{'eo'[l % 2]}" for l in range(l_max + 1))
    return EquiformerModel(
        num_layers=num_layers, block_type=block_type, l_max=l_max, irreps_node_features=irreps,
        num_heads=4, num_output_features=64, num_basis=16,  # v2: m_max min(2, l_max), the default
        radial_mlp_width=32, **COMMON,
    ).eval()


def per_block_ms(block_type, l_max, channels, data, repeats) -> float:
    times = {}
    for num_layers in (2, 4):
        torch.manual_seed(0)
        times[num_layers] = time_calls(model(block_type, l_max, channels, num_layers), data, repeats)
    return 1000.0 * (times[4] - times[2]) / 2


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None, help="markdown table to write")
    args = parser.parse_args()
    set_global_state()
    systems = {"aspirin (21 atoms)": graph(molecule()), "box (504 atoms)": graph(box())}
    rows = []
    for name, data in systems.items():
        num_edges = data["edge_index"].shape[1]
        for l_max in L_MAX:
            start = time.perf_counter()
            ms = {kind: per_block_ms(kind, l_max, args.channels, data, args.repeats) for kind in ("v1", "v2")}
            rows.append((name, num_edges, l_max, ms["v1"], ms["v2"]))
            print(
                f"{name}, {num_edges} edges, l_max {l_max}: v1 {ms['v1']:.1f} ms/block, v2 "
                f"{ms['v2']:.1f} ms/block, v2/v1 {ms['v2'] / ms['v1']:.2f} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    lines = [
        f"Measured with `python benchmarks/block_v1_v2.py --channels {args.channels} --repeats "
        f"{args.repeats}` on {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, float32, eager.",
        "",
        "| system | l_max | v1 ms / block | v2 ms / block | v2 / v1 |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {s} | {l} | {a:.1f} | {b:.1f} | {b / a:.2f} |" for s, _, l, a, b in rows]
    lines += ["", "Growth from l_max 2 to 6, power law in l_max + 1:", ""]
    for name in systems:
        sel = [r for r in rows if r[0] == name]
        x = np.log([r[2] + 1 for r in sel])
        for kind, col in (("v1", 3), ("v2", 4)):
            slope = np.polyfit(x, np.log([max(r[col], 1e-3) for r in sel]), 1)[0]
            lines.append(f"- {name}, {kind}: exponent {slope:.2f}, l_max 6 / l_max 2 = {sel[-1][col] / sel[0][col]:.1f}x")
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
