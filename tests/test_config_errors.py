"""Invalid model configurations fail at build time, naming the argument and the fix."""

import pytest

from nequip.utils.global_state import set_global_state

from nequip_deq.model import DEQEquiformerModel, EquiformerModel, InvalidModelConfig

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

V2 = dict(block_type="v2", irreps_node_features="8x0e+8x1o")  # with BASE's l_max 1


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
        ({"m_max": 1}, ["m_max=1", "v2 blocks only", "block_type: v2"]),
        ({"s2_activation": True}, ["s2_activation=True", "v2 blocks only"]),
        (dict(V2, attention_type="dot_product"), ["attention_type='dot_product'", "v1 blocks only"]),
        (dict(V2, nonlinear_messages=False), ["nonlinear_messages=False", "v1 blocks only"]),
        ({"num_deq_layers": 1}, ["unknown arguments ['num_deq_layers']", "['num_layers']", "l_max"]),
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


def test_v2_blocks_build_at_every_l_max_and_warn_about_v1_settings_at_their_defaults():
    """``m_max`` defaults to ``min(2, l_max)``, so v2 builds at ``l_max`` 1; a v1-only
    argument at its default value changes nothing but is still said."""
    set_global_state()
    with pytest.warns(UserWarning, match="`attention_type` applies to v1 blocks only"):
        EquiformerModel(**dict(BASE, **V2, attention_type="mlp"))


def test_misspelt_deq_argument_lists_the_deq_arguments():
    set_global_state()
    with pytest.raises(InvalidModelConfig) as err:
        DEQEquiformerModel(**{k: v for k, v in BASE.items() if k != "num_layers"}, f_tolerance=1e-4)
    for word in ("unknown arguments ['f_tolerance']", "'f_tol'", "'fixed_point'", "'l_max'"):
        assert word in str(err.value), str(err.value)


def test_builders_show_every_argument():
    """help() and inspect.signature show a builder's own arguments and every shared
    architecture argument with its default."""
    import inspect

    for builder, own in ((EquiformerModel, "num_layers"), (DEQEquiformerModel, "f_tol")):
        parameters = inspect.signature(builder).parameters
        assert own in parameters and parameters["l_max"].default == 2 and "block_type" in parameters
        assert not any(p.kind == p.VAR_KEYWORD for p in parameters.values())
