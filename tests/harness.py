"""nequip's model test harness set up for this package's models (bundled training data,
attention is not strictly local), shared by the harness test modules."""

import pathlib

import pytest

from nequip.utils.unittests.model_tests import BaseEnergyModelTests
from nequip.utils.unittests.utils import resolve_saved_model_path, run_nequip_compile

CONFIGS = pathlib.Path(__file__).parent / "configs"


class EquiformerHarness(BaseEnergyModelTests):
    """``train_config``: the training config of the harness' train/package round trips
    (nequip's defaults download data; ours use the bundled rMD17 subset)."""

    train_config = str(CONFIGS / "minimal_aspirin.yaml")

    @pytest.fixture
    def strict_locality(self):
        return False

    @pytest.fixture(scope="class")
    def conffile(self):
        return self.train_config


def compile_for_ase(fake_model_training_session, device):
    """nequip-compile (AOTInductor, ``--target ase``) of the harness' trained model."""
    _, tmpdir, env, _, model_source, structures = fake_model_training_session
    model_path = resolve_saved_model_path(tmpdir, model_source)
    output_path = run_nequip_compile(
        model_path=model_path, tmpdir=tmpdir, env=env, mode="aotinductor",
        device=device, target="ase", output_prefix="ase_model",
    )
    return model_path, output_path, structures
