"""Where `twin` finds its Hydra configs.

A pipeline runs from a project folder (the repository, or a plant project of the user's that
holds its own `configs/`), so the folder it is run from comes first; an installed copy falls
back on the configs shipped beside the packages.
"""

import os
from pathlib import Path

SHIPPED_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def config_dir() -> Path:
    """The Hydra config directory: $TWIN_CONFIG_DIR, else ./configs, else the shipped one.

    Raises:
        FileNotFoundError: TWIN_CONFIG_DIR names a folder that does not exist.
    """
    override = os.environ.get("TWIN_CONFIG_DIR")
    if override:
        path = Path(override).resolve()
        if not path.is_dir():
            raise FileNotFoundError(f"TWIN_CONFIG_DIR={override!r} is not a directory")
        return path
    local = Path.cwd() / "configs"
    if (local / "plant").is_dir():
        return local.resolve()
    return SHIPPED_CONFIG_DIR
