"""Invalid model configurations fail at build time, naming the argument and the fix."""

import pytest

from nequip.utils.global_state import set_global_state

from nequip_deq.model import EquiformerModel, InvalidModelConfig

BASE = dict(
    seed=0,
    model_dtype="float32",
    type_names=["H", "C"],
    r_max=4.0,
    num_layers=1,
    irreps_node_features="8x0e+4x1o",
    num_heads=2,
    num_basis=4,
    l_max=1,
    num_output_features=8,
)


@pytest.mark.parametrize(
    "override, words",
    [
        ({"irreps_node_features": "8x0e+4x1q"}, ["irreps_node_features", "128x0e+64x1o+32x2e"]),
        ({"irreps_node_features": "banana"}, ["irreps_node_features", "not a valid irreps"]),
        ({"num_heads": 3}, ["num_heads=3", "does not divide", "8x0e"]),
        ({"attention_type": "linear"}, ["attention_type='linear'", "mlp", "dot_product"]),
        ({"l_max": 0}, ["l_max=0", "l_max >= 1"]),
        ({"num_layers": 0}, ["num_layers=0"]),
        ({"radial_basis": "chebyshev"}, ["radial_basis", "gaussian", "bessel"]),
        ({"irreps_node_features": "4x1o"}, ["no 0e scalars"]),
        ({"parity": False}, ["parity=False", "odd irreps"]),
        ({"avg_num_neighbors": {"H": 1.0, "C": 2.0}}, ["avg_num_neighbors", "one number"]),
        ({"num_output_features": 0}, ["num_output_features=0"]),
    ],
)
def test_bad_config_is_refused(override, words):
    set_global_state()
    with pytest.raises(InvalidModelConfig) as err:
        EquiformerModel(**dict(BASE, **override))
    for word in words:
        assert word in str(err.value), str(err.value)


def test_valid_config_builds():
    set_global_state()
    EquiformerModel(**BASE)
