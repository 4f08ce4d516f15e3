"""Which normal runs fit the twin's detector, which calibrate its limits (`monitor.calibration`),
and which the PCA baseline gets, on the synthetic prepared dataset (train R001, R002, R002_s1,
R003 of 8 rows; val R004; test R005; fault R006)."""

import pytest
from omegaconf import OmegaConf

from hybrid_twin import ConfigError
from training.dataset import PreparedDataset
from training.export import monitor_calibration_runs, monitor_fit_runs
from training.fault_evaluation import calibration_summary, pca_fit_runs

PAST_STEPS = 7  # R003 (8 rows) is too short to monitor: more than past_steps + 1 rows needed


def monitor_cfg(**overrides):
    return OmegaConf.create({"fit_split": ["train"], "calibration": "split",
                             "calibration_split": ["val"], **overrides})  # fmt: skip


@pytest.fixture
def dataset(prepared) -> PreparedDataset:
    return PreparedDataset.open(prepared.path)


def test_split_calibration_runs_are_disjoint_from_the_fit_runs(dataset):
    cfg = monitor_cfg()
    fit = monitor_fit_runs(dataset, cfg.fit_split, PAST_STEPS)
    calibration = monitor_calibration_runs(dataset, cfg, fit, PAST_STEPS)
    fit_ids, calibration_ids = [r.run_id for r in fit], [r.run_id for r in calibration]
    assert fit_ids == ["R001", "R002", "R002_s1"] and calibration_ids == ["R004"]
    assert not set(fit_ids) & set(calibration_ids)
    # The PCA baseline learns from both, as the twin's detector does.
    pca = pca_fit_runs(dataset, OmegaConf.create({"monitor": cfg}), PAST_STEPS)
    assert [r.run_id for r in pca] == [*fit_ids, *calibration_ids]


def test_in_sample_calibration_uses_no_calibration_runs(dataset):
    for cfg in (monitor_cfg(calibration="in_sample", calibration_split=None),
                OmegaConf.create({"fit_split": "train"})):  # fmt: skip
        fit = monitor_fit_runs(dataset, cfg.fit_split, PAST_STEPS)
        assert monitor_calibration_runs(dataset, cfg, fit, PAST_STEPS) == []


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"fit_split": ["train", "val"]},
         r"calibration_split \['val'\] shares runs \['R004'\] with monitor.fit_split"),
        ({"calibration_split": ["test"]},
         r"monitor.calibration_split: \['test'\]: .* test, fault score the detector"),
        ({"calibration_split": None}, r"monitor.calibration_split: \[\]"),
        ({"calibration": "in_sample"},
         r"monitor.calibration_split: \['val'\] is set but monitor.calibration is in_sample"),
        ({"calibration": "conformal"},
         "monitor.calibration: expected one of in_sample, split, got 'conformal'"),
    ],
)  # fmt: skip
def test_bad_calibration_config_is_refused_naming_the_key(dataset, overrides, match):
    cfg = monitor_cfg(**overrides)
    fit = monitor_fit_runs(dataset, cfg.fit_split, PAST_STEPS)
    with pytest.raises(ConfigError, match=match):
        monitor_calibration_runs(dataset, cfg, fit, PAST_STEPS)


def test_calibration_summary_says_how_the_limits_were_set():
    record = {"fit_runs": ["a", "b"], "fit_exceed_rate": 0.01, "calibration_runs": ["c"],
              "calibration_scale": 1.76, "calibration_exceed_rate": 0.0094}  # fmt: skip
    assert calibration_summary(record) == (
        "split-conformal: 2 fit runs, scale 1.760 on 1 calibration runs (exceed rate there 0.0094)"
    )
    assert calibration_summary({**record, "calibration_runs": []}).startswith(
        "in-sample on 2 fit runs, exceed rate 0.0100"
    )
