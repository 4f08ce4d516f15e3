"""Entry points of the data stages: Hydra config -> plain dicts -> data_pipelines.

data_pipelines never sees a DictConfig (STYLE.md); these functions are the translation.
"""

import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True, throw_on_missing=True)


def run_generate(cfg: DictConfig) -> dict:
    """`twin generate`: simulate the built-in line and write a historian export."""
    from data_pipelines.plant_sim import write_historian_export

    started = time.perf_counter()
    summary = write_historian_export(
        Path(cfg.out_dir),
        tags=_plain(cfg.plant.tags),
        sim=_plain(cfg.sim),
        seed=cfg.seed,  # checked there: int() would make 1.7 seed 1
        file_format=str(cfg.file_format),
    )
    print(f"generate: wrote a historian export to {cfg.out_dir} "
          f"in {time.perf_counter() - started:.1f} s")
    return summary


def run_prepare(cfg: DictConfig) -> dict:
    """`twin prepare`: validate, align and split a historian export into the prepared dataset."""
    from data_pipelines import prepare_dataset

    started = time.perf_counter()
    manifest = prepare_dataset(
        Path(cfg.data.raw_dir),
        Path(cfg.data.out_dir),
        tags=_plain(cfg.plant.tags),
        data=_plain(cfg.data),
        plant_name=str(cfg.plant.name),
    )
    counts = manifest["counts"]
    splits = ", ".join(f"{name} {len(runs)}" for name, runs in manifest["splits"].items())
    print(f"prepare: {counts['rows_in']} historian rows -> {counts['rows_valid']} valid, "
          f"{counts['rows_rejected']} rejected (see rejects.csv); runs: {splits}; "
          f"wrote {cfg.data.out_dir}/manifest.json in {time.perf_counter() - started:.1f} s")
    return manifest
