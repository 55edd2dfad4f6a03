"""nequip's model test harness (equivariance, finite-difference forces, batching, cutoff
behaviour, nequip-train/nequip-package round trips, nequip-compile + ASE) on
EquiformerModel, for both attention types, with and without non-linear messages, and for
the three radial bases.

AOTInductor compilation costs about 2-3 minutes per model on a 2-core CPU, so the compile
test runs for the default model in float64 and for the variant whose code paths differ most
from it (dot-product attention + linear messages) in float32; tests/test_deploy.py compiles the
default architecture in float32 (ase and pair_nequip targets). All other harness tests run for
both dtypes everywhere."""

import pathlib

import pytest

from nequip.utils.unittests.model_tests import BaseEnergyModelTests
from nequip.utils.unittests.utils import resolve_saved_model_path, run_nequip_compile

TRAIN_CONFIG = str(pathlib.Path(__file__).parent / "configs" / "minimal_aspirin.yaml")

from small_models import SMALL


class _EquiformerHarness(BaseEnergyModelTests):
    @pytest.fixture
    def strict_locality(self):
        return False

    @pytest.fixture(scope="class", params=[TRAIN_CONFIG])
    def conffile(self, request):
        # nequip's default training configs download data; ours uses the bundled rMD17 subset
        return request.param


class TestEquiformerDefault(_EquiformerHarness):
    """The paper's default: MLP attention, non-linear messages (Gaussian basis)."""

    @pytest.fixture(scope="class")
    def config(self):
        return dict(SMALL)

    @pytest.fixture(scope="class", params=["aotinductor"])
    def ase_compiled_model(self, request, fake_model_training_session, device):
        _, tmpdir, env, model_dtype, model_source, structures = fake_model_training_session
        if model_dtype != "float64" or model_source != "fresh":
            pytest.skip(
                "compile (about 3 min per model on a 2-core CPU) tested here for float64; float32 "
                "compiles of this architecture: tests/test_deploy.py (ase, pair_nequip) and the "
                "dot-product variant below"
            )
        model_path = resolve_saved_model_path(tmpdir, model_source)
        output_path = run_nequip_compile(
            model_path=model_path, tmpdir=tmpdir, env=env, mode=request.param,
            device=device, target="ase", output_prefix="ase_model",
        )
        return model_path, output_path, structures


class TestEquiformerVariants(_EquiformerHarness):
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

    @pytest.fixture(scope="class", params=["aotinductor"])
    def ase_compiled_model(self, request, config, fake_model_training_session, device):
        _, tmpdir, env, model_dtype, model_source, structures = fake_model_training_session
        if model_dtype != "float32" or config["attention_type"] != "dot_product" or config["nonlinear_messages"]:
            pytest.skip(
                "compile (about 3 min per model) tested for the default model and, among the "
                "variants, for dot-product attention + linear messages in float32"
            )
        model_path = resolve_saved_model_path(tmpdir, model_source)
        output_path = run_nequip_compile(
            model_path=model_path, tmpdir=tmpdir, env=env, mode=request.param,
            device=device, target="ase", output_prefix="ase_model",
        )
        return model_path, output_path, structures
