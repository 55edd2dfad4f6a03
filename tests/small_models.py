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
