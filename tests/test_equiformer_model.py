"""nequip's model test harness (equivariance, finite-difference forces, batching, cutoff
behaviour, nequip-train/nequip-package round trips, nequip-compile + ASE) on
EquiformerModel, for both attention types, with and without non-linear messages, and for
the three radial bases.

AOTInductor compilation costs about 3-5 minutes per model on a 2-core CPU, so the harness'
compile test runs for the variant whose code paths differ most from the default (dot-product
attention + linear messages) in float32; tests/test_deploy.py compiles the default architecture
in float32 (ase and pair_nequip targets). All other harness tests run for both dtypes
everywhere."""

import pytest

from harness import EquiformerHarness, compile_for_ase
from small_models import SMALL


class TestEquiformerDefault(EquiformerHarness):
    """The paper's default: MLP attention, non-linear messages (Gaussian basis)."""

    @pytest.fixture(scope="class")
    def config(self):
        return dict(SMALL)

    @pytest.fixture(scope="class")
    def ase_compiled_model(self):
        pytest.skip(
            "this architecture is compiled in tests/test_deploy.py (float32; ase and pair_nequip "
            "targets, compared with eager and run in MD and in a real LAMMPS); the harness "
            "compiles the dot-product/linear variant below and EquiformerV2 blocks "
            "(tests/test_equiformer_v2.py)"
        )


class TestEquiformerVariants(EquiformerHarness):
    """The other attention/message combinations and radial bases."""

    @pytest.fixture(
        scope="class",
        params=[
            ("mlp", False, "exp_normal"),
            ("dot_product", True, "bessel"),
            ("dot_product", False, "gaussian"),
        ],
        ids=["mlp-linear-expnormal", "dot-nonlinear-bessel", "dot-linear-gaussian"],
    )
    def config(self, request):
        attention_type, nonlinear, basis = request.param
        return dict(SMALL, attention_type=attention_type, nonlinear_messages=nonlinear, radial_basis=basis)

    @pytest.fixture(scope="class", params=["fresh"])
    def model_source(self, request):
        return request.param

    @pytest.fixture(scope="class")
    def ase_compiled_model(self, config, fake_model_training_session, device):
        model_dtype = fake_model_training_session[3]
        if model_dtype != "float32" or config["attention_type"] != "dot_product" or config["nonlinear_messages"]:
            pytest.skip(
                "compile (minutes per model) tested, among the v1 variants, for dot-product "
                "attention + linear messages in float32"
            )
        return compile_for_ase(fake_model_training_session, device)
