"""The configs shipped in configs/, read as plain mappings (what build_twin_model takes)."""

import yaml

from training.config_dir import SHIPPED_CONFIG_DIR


def shipped_config(group: str, name: str) -> dict:
    """configs/<group>/<name>.yaml as a dict."""
    return yaml.safe_load((SHIPPED_CONFIG_DIR / group / f"{name}.yaml").read_text())
