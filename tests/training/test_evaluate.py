"""`twin evaluate` end to end: trained runs from a real SQLite MLflow store, the table on disk
and in MLflow, RMSE checked against the registered models' own predictions."""


import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.training.twin_cli import TINY_SIZES, run_twin
from training.dataset import PreparedDataset
from training.evaluate import comparison_markdown

pytestmark = pytest.mark.filterwarnings("ignore:.*Any type hint is inferred as AnyType:UserWarning")
TINY = [*TINY_SIZES, "trainer.max_epochs=1"]
# forecasts of 1 min (12 rows of 5 s) every 30 s, after P = 6 past rows
EVALUATE = ["horizons_min=[0.5,1]", "stride_min=0.5", "num_threads=1"]


@pytest.fixture(scope="module")
def evaluated(tiny_cdc_dataset, tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluate_cli")
    uri = f"sqlite:///{folder / 'store.db'}"
    data = f"datamodule.path={tiny_cdc_dataset}"
    for kind in ("mechanistic", "hybrid"):
        result = run_twin(folder, uri, "train", data, *TINY, f"model={kind}")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    result = run_twin(
        folder,
        uri,
        "evaluate",
        f"data_path={tiny_cdc_dataset}",
        "kinds=[hybrid,mechanistic]",
        *EVALUATE,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (out_dir,) = (folder / "outputs" / "evaluate").iterdir()
    return folder, uri, out_dir, result.stdout


def test_table_is_written_printed_and_holds_every_kind_tag_and_horizon(evaluated, tiny_cdc_dataset):
    _, _, out_dir, stdout = evaluated
    table = pd.read_csv(out_dir / "evaluation.csv")
    tags = PreparedDataset.open(tiny_cdc_dataset).measurement_tags
    assert len(table) == 2 * len(tags) * 2  # kinds x tags x horizons, one regime
    assert set(table["kind"]) == {"hybrid", "mechanistic"}
    assert set(table["horizon_min"]) == {0.5, 1.0}
    markdown = (out_dir / "evaluation.md").read_text()
    assert "| tag | unit | horizon | hybrid | mechanistic | hybrid / best baseline |" in markdown
    assert markdown.strip() in stdout


def test_rmse_matches_the_registered_models_own_forecasts(evaluated, tiny_cdc_dataset):
    """Recompute one kind's RMSE from `models:/cdc-line-twin/<v>` predictions in tag units."""
    import mlflow.pyfunc

    _, uri, out_dir, _ = evaluated
    table = pd.read_csv(out_dir / "evaluation.csv")
    row = table[(table["kind"] == "mechanistic")].iloc[0]
    client = MlflowClient(tracking_uri=uri)
    (version,) = [
        v for v in client.search_model_versions("name='cdc-line-twin'") if v.run_id == row["run_id"]
    ]
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/cdc-line-twin/{version.version}")
    dataset = PreparedDataset.open(tiny_cdc_dataset)
    u_mean, u_std, y_mean, y_std = (t.numpy() for t in dataset.normalisation())
    sq = {0.5: [], 1.0: []}
    for run in dataset.load_split("test"):
        if dataset.manifest["runs"][run.run_id]["regime"] != row["regime"]:
            continue
        u = run.u.numpy() * u_std + u_mean
        y = np.where(run.mask.numpy(), run.y.numpy() * y_std + y_mean, np.nan)
        for t0 in range(6, run.n_rows - 13 + 1, 6):  # P = 6, stride 6 rows, 12 + 1 rows
            prediction = model.predict(
                {
                    "past_u": u[None, t0 - 6 : t0],
                    "past_y": y[None, t0 - 6 : t0],
                    "u": u[None, t0 : t0 + 13],
                }
            )[0]
            for horizon, steps in ((0.5, 6), (1.0, 12)):
                sq[horizon].append(prediction[1 : steps + 1] - y[t0 + 1 : t0 + steps + 1])
    column = dataset.measurement_tags.index(row["tag"])
    for horizon in (0.5, 1.0):
        errors = np.concatenate(sq[horizon])[:, column]
        errors = errors[np.isfinite(errors)]
        logged = table[
            (table["kind"] == "mechanistic")
            & (table["tag"] == row["tag"])
            & (table["horizon_min"] == horizon)
        ].iloc[0]
        assert logged["n"] == errors.size
        assert logged["rmse"] == pytest.approx(np.sqrt(np.mean(errors**2)), rel=1e-4)


def test_mlflow_holds_an_evaluation_run_and_each_training_run_its_own_rmse(evaluated):
    folder, uri, _, _ = evaluated
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("cdc-line-twin")
    runs = client.search_runs([experiment.experiment_id])
    (evaluation,) = [r for r in runs if r.data.tags.get("twin.stage") == "evaluate"]
    trained = {r.data.tags["model.kind"]: r for r in runs if "model.kind" in r.data.tags}
    assert evaluation.data.tags["evaluated.hybrid"] == trained["hybrid"].info.run_id
    names = {a.path for a in client.list_artifacts(evaluation.info.run_id)}
    assert {"evaluation.csv", "evaluation.md"} <= names
    key = "test/rmse/interpolation/NIR.API_CONC/1min"
    for kind, run in trained.items():
        assert evaluation.data.metrics[f"{key}/{kind}"] == pytest.approx(run.data.metrics[key])


def test_a_kind_never_trained_is_named_with_how_to_fix_it(evaluated, tiny_cdc_dataset):
    folder, uri, _, _ = evaluated
    result = run_twin(
        folder, uri, "evaluate", f"data_path={tiny_cdc_dataset}", "kinds=[black_box]", *EVALUATE
    )
    assert result.returncode != 0
    assert "no finished `twin train model=black_box` run on this dataset" in result.stderr


def test_a_list_of_runs_in_forecast_mode_is_refused_naming_the_key(evaluated, tiny_cdc_dataset):
    folder, uri, _, _ = evaluated
    result = run_twin(
        folder,
        uri,
        "evaluate",
        f"data_path={tiny_cdc_dataset}",
        "kinds=[hybrid]",
        "runs.hybrid=[abc,def]",
        *EVALUATE,
    )
    assert result.returncode != 0
    assert "runs.hybrid: forecast mode evaluates one run per kind, got a list" in result.stderr


def test_a_row_no_kind_has_a_number_for_is_shown_as_a_dash_not_left_out():
    rows = [
        {"kind": kind, "regime": "extrapolation", "tag": tag, "unit": unit, "horizon_min": 1.0,
         "rmse": rmse}
        for kind in ("hybrid", "mechanistic")
        for tag, unit, rmse in (("NIR.API_CONC", "%w/w", 0.25), ("PRESS.TABLET_API", "%LC", np.nan))
    ]  # fmt: skip
    markdown = comparison_markdown(pd.DataFrame(rows), "NIR.API_CONC")
    assert "| **NIR.API_CONC** | %w/w | 1 min | 0.25 | 0.25 | 1 |" in markdown
    # the 5-min assay has no sample within 1 min
    assert "| PRESS.TABLET_API | %LC | 1 min | - | - | - |" in markdown


def test_the_best_baseline_ignores_a_kind_without_a_number_whatever_their_order():
    def ratio(kinds):
        rmse = {"hybrid": 0.3, "mechanistic": np.nan, "black_box": 0.6}
        rows = [{"kind": k, "regime": "extrapolation", "tag": "NIR.API_CONC", "unit": "%w/w",
                 "horizon_min": 60.0, "rmse": rmse[k]} for k in kinds]  # fmt: skip
        return comparison_markdown(pd.DataFrame(rows), "NIR.API_CONC").splitlines()[-1]

    assert ratio(["hybrid", "mechanistic", "black_box"]).endswith("| 0.5 |")
    assert ratio(["hybrid", "black_box", "mechanistic"]).endswith("| 0.5 |")


def test_runs_of_different_past_windows_are_refused_not_scored_on_other_windows():
    from types import SimpleNamespace

    from hybrid_twin import ConfigError
    from training.evaluate import evaluate_runs

    def run(past):
        return SimpleNamespace(data=SimpleNamespace(params={"datamodule.past_steps": str(past)}))

    dataset = SimpleNamespace(dt_s=5.0, load_split=lambda split: [], normalisation=lambda: None)
    with pytest.raises(ConfigError, match=r"past_steps differ \(\{'hybrid': 12, 'mechanistic': "
                                          r"24\}\)"):  # fmt: skip
        evaluate_runs({"hybrid": run(12), "mechanistic": run(24)}, dataset, "test", [1.0], 1.0)
