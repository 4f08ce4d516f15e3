"""The configs shipped in configs/, read as plain mappings (what build_twin_model takes)."""

import yaml
from omegaconf import DictConfig, OmegaConf

from training.config_dir import SHIPPED_CONFIG_DIR


def shipped_config(group: str, name: str) -> dict:
    """configs/<group>/<name>.yaml as a dict."""
    return yaml.safe_load((SHIPPED_CONFIG_DIR / group / f"{name}.yaml").read_text())


def stage_config(name: str, **changes) -> DictConfig:
    """configs/<name>.yaml (a stage's primary config, its hydra section dropped) with
    `changes` set by dotted key, as the stage's overrides would set them."""
    cfg = OmegaConf.load(SHIPPED_CONFIG_DIR / f"{name}.yaml")
    cfg.pop("hydra")
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value)
    return cfg
