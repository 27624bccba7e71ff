"""Configs that only need composing (no training): fast, out of the slow set."""

import pytest

from conftest import compose_cfg


@pytest.mark.parametrize(("launcher", "target"), [
    ("joblib", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
    ("submitit_slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
    ("ray", "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"),
])
def test_cluster_launcher_configs_compose(launcher, target):
    cfg = compose_cfg([f"hydra/launcher={launcher}"])
    assert cfg.hydra.launcher._target_ == target


def test_study_presets_compose_as_sweeps():
    for study, keys in (("study_lr_convergence", {"model", "dataset", "optimizer.lr", "seed"}),
                        ("study_dead_relu", {"model.hidden", "optimizer.lr", "model.bias_init", "seed"})):
        cfg = compose_cfg([f"experiment={study}"])
        assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
        assert set(cfg.hydra.sweeper.params) == keys


def test_base_config_has_the_documented_defaults(base_cfg):
    assert base_cfg.hydra.runtime.choices.model == "mlp" and base_cfg.summary.converge_relative is False
    assert base_cfg.ckpt_path is None and base_cfg.checkpoint.every_n_steps == 100


def test_trainer_strategy_is_a_config_key():
    """`trainer.strategy=ddp trainer.devices=2` composes without a `+` (docs/reliability.md, distributed runs)."""
    cfg = compose_cfg(["trainer.strategy=ddp", "trainer.devices=2"])
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 2
    assert compose_cfg([]).trainer.strategy == "auto"
