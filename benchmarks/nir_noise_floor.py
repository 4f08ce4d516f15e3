"""The RMSE floor of any NIR.API_CONC forecast on a prepared split, from the plant's sensor model.

A forecast of the true blend concentration c is still scored against readings
c (1 + s e)(1 + o), e ~ N(0, 1), o = +-U(low, high) with probability `rate` (plant_sim's NIR:
configs/sim/cdc_default.yaml `pat`). Its expected squared error per reading is
c^2 (s^2 + rate E[o^2] (1 + s^2)); the floor is the root of its mean over the split's readings,
with the readings standing in for c (they differ from c by ~2 %). Used to judge the evaluation
table (docs/training.md): a model at the floor cannot be beaten by any other.

    python benchmarks/nir_noise_floor.py [--data data/prepared] [--split test]
"""

import argparse
from pathlib import Path

import numpy as np
import yaml

from training.dataset import PreparedDataset

TAG = "NIR.API_CONC"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--split", default="test")
    parser.add_argument("--sim", default="configs/sim/cdc_default.yaml")
    args = parser.parse_args()
    pat = yaml.safe_load(Path(args.sim).read_text())["pat"]
    s, rate = pat["nir_noise_rel"], pat["nir_outlier_rate"]
    low, high = pat["nir_outlier_rel"]
    outlier_sq = (high**3 - low**3) / (3.0 * (high - low))  # E[o^2], o ~ U(low, high)
    factor = s**2 + rate * outlier_sq * (1.0 + s**2)
    dataset = PreparedDataset.open(args.data)
    column = dataset.measurement_tags.index(TAG)
    stats = dataset.normalisation()
    by_regime: dict[str, list[np.ndarray]] = {}
    for run in dataset.load_split(args.split):
        mask = run.mask[:, column].numpy()
        c = run.y[:, column].numpy()[mask] * float(stats.y_std[column]) + float(
            stats.y_mean[column]
        )
        regime = dataset.manifest["runs"][run.run_id].get("regime") or "all"
        by_regime.setdefault(regime, []).append(c)
    print(
        f"{TAG} RMSE floor on split {args.split!r} (relative noise {s}, outliers {rate} x "
        f"U({low}, {high})):"
    )
    for regime, values in sorted(by_regime.items()):
        c = np.concatenate(values)
        print(f"  {regime}: {np.sqrt(factor * np.mean(c**2)):.3f} %w/w over {c.size} readings")


if __name__ == "__main__":
    main()
