"""Model settings small enough for the CPU test harness, shared by the harness test modules."""

# every part of EquiformerModel is exercised at this width
SMALL = {
    "_target_": "nequip_deq.model.EquiformerModel",
    "seed": 123,
    "type_names": ["H", "C", "O"],
    "r_max": 4.0,
    "num_layers": 2,
    "l_max": 2,
    "irreps_node_features": "8x0e+4x1o+4x2e",
    "num_heads": 2,
    "num_basis": 8,
    "radial_mlp_width": 16,
    "num_output_features": 16,
    "avg_num_neighbors": 5.0,
}


def small_v2(l_max: int, parity: bool = True, **overrides) -> dict:
    """SMALL with EquiformerV2 blocks: 4 channels for every degree up to ``l_max``."""
    p = "eo" if parity else "ee"
    irreps = "+".join(f"4x{l}{p[l % 2]}" for l in range(l_max + 1))
    return {
        **SMALL, "block_type": "v2", "l_max": l_max, "parity": parity,
        "irreps_node_features": irreps, "m_max": min(2, l_max), **overrides,
    }
