from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lmc.run import CONF_DIR

EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
SWEEPS = sorted(p.stem for p in (Path(CONF_DIR) / "sweep").glob("*.yaml"))


def compose_cfg(overrides=()):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def test_default_config_is_mlp_mnist1d():
    cfg = compose_cfg()
    assert cfg.name == "mlp_mnist1d"
    assert list(cfg.seeds) == [0, 1]
    assert cfg.data.name == "mnist1d" and cfg.model.name == "mlp"
    assert cfg.align.method == "weight_matching"
    assert cfg.interp.num_alphas == 25 and cfg.interp.layerwise is True
    assert cfg.logger.name == "wandb" and cfg.device == "auto"
    # the documented keys exist
    for key in ("data.root", "model.width", "model.depth", "train.epochs", "train.batch_size", "train.lr"):
        assert OmegaConf.select(cfg, key) is not None, key


def test_experiment_mlp_mnist1d_equals_default():
    plain = OmegaConf.to_container(compose_cfg(), resolve=False)
    explicit = OmegaConf.to_container(compose_cfg(["experiment=mlp_mnist1d"]), resolve=False)
    for cfg in (plain, explicit):
        cfg.pop("hydra")
    assert plain == explicit


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    cfg = compose_cfg([f"experiment={experiment}"])
    assert cfg.name
    first = (Path(CONF_DIR) / "experiment" / f"{experiment}.yaml").read_text().splitlines()
    assert first[0] == "# @package _global_"
    assert first[1].startswith("# python -m lmc.run") and f"experiment={experiment}" in first[1]
    OmegaConf.to_container(cfg, resolve=False)


@pytest.mark.parametrize("sweep", SWEEPS)
def test_every_sweep_preset_composes(sweep):
    cfg = compose_cfg([f"sweep={sweep}"])
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.hydra.sweeper.params


def test_overrides_land_where_documented():
    cfg = compose_cfg(["seeds=[3,4]", "model.width=64", "model.depth=2", "train.epochs=2", "align=none",
                       "interp.num_alphas=5", "interp.layerwise=false", "logger=none", "device=cpu"])
    assert list(cfg.seeds) == [3, 4] and cfg.model.width == 64 and cfg.model.depth == 2
    assert cfg.train.epochs == 2 and cfg.align.method == "none" and cfg.interp.num_alphas == 5
    assert cfg.logger.name == "none" and cfg.device == "cpu"


def test_wandb_mode_defaults_to_environment(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert compose_cfg().logger.mode == "offline"
    monkeypatch.delenv("WANDB_MODE")
    assert compose_cfg().logger.mode == "auto"
    assert compose_cfg(["logger.mode=disabled"]).logger.mode == "disabled"
