"""The shipped configs compose, their data modules load and their models build."""

import pathlib
import shutil

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_method, instantiate
from omegaconf import OmegaConf

from nequip.utils.global_state import set_global_state

from nequip_deq._resolvers import bundled_data_path

CONFIGS = pathlib.Path(__file__).parents[1] / "configs"
STATS = {"avg_num_neighbors": 14.4, "per_type_energy_shifts": -100.0, "per_type_energy_scales": 1.0}


def load(name, overrides=()):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose(config_name=name, overrides=list(overrides), return_hydra_config=True)
    return cfg


def build_model(cfg):
    model_cfg = OmegaConf.to_container(cfg.training_module.model, resolve=False)
    model_cfg.update(STATS)
    model_cfg = OmegaConf.to_container(OmegaConf.create({"m": model_cfg, "seed": cfg.seed, "model_type_names": cfg.model_type_names, "cutoff_radius": cfg.cutoff_radius}), resolve=True)["m"]
    set_global_state()
    return get_method(model_cfg.pop("_target_"))(**model_cfg)


def setup_data(cfg):
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    dm = instantiate(data_cfg, _recursive_=False)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("name", ["quickstart", "deq_quickstart"])
def test_bundled_config(name):
    cfg = load(name)
    dm = setup_data(cfg)
    assert len(dm.train_dataset[0]) == cfg.data.train
    build_model(cfg)


def test_rmd17_config(tmp_path):
    """molecule and split are overrides; the paper-size model builds (about 3.2 M params)."""
    for kind, bundled in [("train", "rmd17_aspirin_train_01_first250.npz"), ("test", "rmd17_aspirin_test_01_first200.npz")]:
        shutil.copy(bundled_data_path(bundled), tmp_path / f"rmd17_aspirin_{kind}_03.npz")
    cfg = load("rmd17", [f"data_dir={tmp_path}", "molecule=aspirin", "split='03'", "data.train=200", "data.val=50"])
    assert cfg.data.train_file.endswith("rmd17_aspirin_train_03.npz")
    dm = setup_data(cfg)
    assert len(dm.val_dataset[0]) == 50
    model = build_model(cfg)
    assert 3.0e6 < sum(p.numel() for p in model.parameters()) < 3.6e6


def test_deq_rmd17_config(tmp_path):
    """The DEQ rMD17 config composes and builds a DEQ model of the paper's width with fewer
    parameters than the 6-block model (one block inside f + the output block)."""
    for kind, bundled in [("train", "rmd17_aspirin_train_01_first250.npz"), ("test", "rmd17_aspirin_test_01_first200.npz")]:
        shutil.copy(bundled_data_path(bundled), tmp_path / f"rmd17_aspirin_{kind}_01.npz")
    cfg = load("deq_rmd17", [f"data_dir={tmp_path}", "data.train=200", "data.val=50"])
    assert cfg.training_module._target_ == "nequip_deq.train.DEQEMALightningModule"
    model = build_model(cfg)
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 1.5e6


def test_rmd17_config_requires_data_dir():
    cfg = load("rmd17")
    with pytest.raises(Exception, match="data_dir"):
        OmegaConf.to_container(cfg.data, resolve=True)


@pytest.mark.parametrize("name,target", [("rmd17_v2", "EquiformerModel"), ("deq_rmd17_v2", "DEQEquiformerModel")])
def test_rmd17_v2_configs(tmp_path, name, target):
    """The EquiformerV2 configs compose over their v1 counterparts and build models of
    EquiformerV2 blocks at DEQuify's MD17 shape (64 channels, l_max 3, m_max 2, 4 heads)."""
    from nequip_deq.nn.attention.so2_attention import SO2GraphAttention

    for kind, bundled in [("train", "rmd17_aspirin_train_01_first250.npz"), ("test", "rmd17_aspirin_test_01_first200.npz")]:
        shutil.copy(bundled_data_path(bundled), tmp_path / f"rmd17_aspirin_{kind}_01.npz")
    cfg = load(name, [f"data_dir={tmp_path}", "data.train=200", "data.val=50"])
    assert cfg.training_module.model._target_ == f"nequip_deq.model.{target}"
    assert (cfg.training_module.model.block_type, cfg.training_module.model.l_max, cfg.cutoff_radius) == ("v2", 3, 5.0)
    model = build_model(cfg)
    attention = [m for m in model.modules() if isinstance(m, SO2GraphAttention)]
    assert attention and all(a.channels == 64 and a.num_heads == 4 for a in attention)
