"""`twin export` end to end: a tiny mechanistic twin trained with the CLI into a SQLite store,
exported in its three formats (the session's `twin_build`, shared with the service tests), then
the files checked as a plant system would use them (plain torch) and against the eager
OnlineTwin rebuilt from the same run."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.filterwarnings("ignore:.*Any type hint is inferred as AnyType:UserWarning")
PAST_STEPS = 6  # TINY_SIZES' datamodule.past_steps
SCRIPTED_VS_EAGER = 1e-6  # float64, same ops: tests/tolerances.py's scripted-vs-eager value


@pytest.fixture(scope="module")
def export_dataset(twin_build) -> Path:
    """4 normal runs of 30 min (train 2, val 1, test 1), at-line tags every 30 s."""
    return twin_build.dataset


@pytest.fixture(scope="module")
def exported(twin_build):
    """The session's tiny twin, trained and exported by the CLI (tests/conftest.py)."""
    out = twin_build.path
    return out.parent, twin_build.tracking_uri, out, twin_build.export_stdout


@pytest.fixture(scope="module")
def eager(exported, export_dataset):
    """The eager OnlineTwin export fits, rebuilt from the file's own q, r, p0 and monitor."""
    import mlflow

    from training.dataset import PreparedDataset
    from training.export import load_eager_twin, load_twin_file
    from training.online_twin import OnlineTwin, placeholder_monitor

    _, uri, out, _ = exported
    scripted, metadata = load_twin_file(out)
    mlflow.set_tracking_uri(uri)
    dataset = PreparedDataset.open(export_dataset)
    twin = load_eager_twin(metadata["training_run_id"], dataset)
    detector = metadata["detector"]
    n_y = len(metadata["measurement_tags"])
    online = OnlineTwin(
        twin.to(torch.float64),
        torch.tensor(detector["q"], dtype=torch.float64),
        torch.tensor(detector["r"], dtype=torch.float64),
        torch.tensor(detector["p0_std"], dtype=torch.float64),
        placeholder_monitor(n_y),
    ).to(torch.float64)
    # The fitted monitor's buffers come from the file (same module structure).
    monitor_state = {
        k.removeprefix("monitor."): v
        for k, v in scripted.state_dict().items()
        if k.startswith("monitor.")
    }
    online.monitor.load_state_dict(monitor_state)
    online.monitor.persistence = int(detector["persistence"])
    online.monitor.ewma_lambda = float(detector["ewma_lambda"])
    return online.eval(), scripted, metadata, dataset


def _test_rows(dataset, steps: int):
    from training.export import engineering_runs

    u, y, _ = engineering_runs(dataset, dataset.load_split("test"), torch.float64)
    return u[:, : PAST_STEPS + steps], y[:, : PAST_STEPS + steps]


def test_export_writes_one_file_and_reports_the_achieved_difference(exported):
    _, _, out, stdout = exported
    assert out.is_file()
    for name in ("twin.pt", "twin.pt2", "twin.aoti.pt2"):
        assert f"{name} (" in stdout and (out.parent / name).is_file()
        assert not list(out.parent.glob(name + "*.partial"))
    assert stdout.count("vs eager max diff") == 3


def test_twin_file_loads_and_forecasts_in_a_process_that_imports_only_torch(exported, eager):
    online, _, _, dataset = eager
    _, _, out, _ = exported
    u, y = _test_rows(dataset, 24)
    inputs = out.parent / "forecast_inputs.pt"
    torch.save({"past_u": u[:, :PAST_STEPS], "past_y": y[:, :PAST_STEPS], "u": u[:, PAST_STEPS:]},
               inputs)  # fmt: skip
    result_file = out.parent / "forecast_result.pt"
    code = (
        "import sys, torch\n"
        f"m = torch.jit.load({str(out)!r})\n"
        f"a = torch.load({str(inputs)!r})\n"
        "y = m.forecast(a['past_u'], a['past_y'], a['u'])\n"
        f"torch.save(y, {str(result_file)!r})\n"
        "bad = [n for n in ('training', 'hybrid_twin', 'mlflow', 'data_pipelines') "
        "if n in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = online.forecast(u[:, :PAST_STEPS], y[:, :PAST_STEPS], u[:, PAST_STEPS:])
    torch.testing.assert_close(torch.load(result_file), expected, rtol=0, atol=SCRIPTED_VS_EAGER)


def test_the_file_is_frozen_and_holds_the_noise_settings_of_its_metadata(exported, eager):
    """A caller's update loop without no_grad kept every step's autograd graph (the file's
    parameters required gradients: 0.4 MB more a row); and a float32 model rounded q, r and
    p0 inside the float64 file (r off its metadata by 2e-6)."""
    _, scripted, metadata, dataset = eager
    assert not [name for name, p in scripted.named_parameters() if p.requires_grad]
    u, y = _test_rows(dataset, 2)
    state = scripted.initial_state(u[:, :PAST_STEPS], y[:, :PAST_STEPS])
    out = scripted.update(*state, u[:, PAST_STEPS], y[:, PAST_STEPS],
                          torch.isfinite(y[:, PAST_STEPS]))  # fmt: skip
    assert not [i for i, o in enumerate(out) if isinstance(o, torch.Tensor) and o.requires_grad]
    buffers = dict(scripted.named_buffers())
    detector = metadata["detector"]
    for key in ("q", "r"):
        [name] = [n for n in buffers if n == f"ekf.{key}"]
        assert buffers[name].dtype == torch.float64
        assert buffers[name].tolist() == detector[key], key


def test_metadata_round_trips_through_the_file_and_mlflow(exported, export_dataset):
    from training.dataset import PreparedDataset

    _, uri, out, _ = exported
    extra = {"metadata.json": ""}
    torch.jit.load(str(out), _extra_files=extra)
    metadata = json.loads(extra["metadata.json"])
    dataset = PreparedDataset.open(export_dataset)
    assert metadata["measurement_tags"] == dataset.measurement_tags
    assert metadata["input_tags"] == dataset.input_tags
    assert metadata["units"]["NIR.API_CONC"] == "%w/w"
    assert metadata["dt_s"] == 5.0
    assert metadata["model_kind"] == "mechanistic"
    assert metadata["data_manifest_sha256"] == dataset.manifest_sha256
    assert metadata["past_steps"] == PAST_STEPS
    assert metadata["detector"]["false_alarm_rate"] == 0.005
    assert metadata["detector"]["fit_split"] == ["train", "val"]
    assert len(metadata["detector"]["fit_runs"]) == 3
    assert metadata["verification"]["max_diff"] <= metadata["verification"]["tolerance"]
    # the horizon verified (EXPORT_TINY's verify.forecast_steps), not the timing's whole run
    assert metadata["verification"]["forecast_steps"] == 24
    assert "update_p50_ms" not in metadata["verification"]
    client = MlflowClient(tracking_uri=uri)
    # The store is the session's shared build: the service tests may register more versions.
    versions = client.search_model_versions("name='cdc-line-twin'")
    (version,) = [v for v in versions if str(v.version) == metadata["registered_version"]]
    assert metadata["training_run_id"] == version.run_id
    folder = f"twin_export/v{version.version}"  # one per version: a later one keeps it whole
    assert version.tags["twin_export.file"] == f"{folder}/twin.pt"
    logged = {a.path for a in client.list_artifacts(version.run_id, folder)}
    assert logged == {f"{folder}/twin.pt", f"{folder}/twin.pt2", f"{folder}/twin.aoti.pt2"}
    files = json.loads(version.tags["twin_export.files"])
    assert {fmt: f["file"] for fmt, f in files.items()} == {
        "torchscript": f"{folder}/twin.pt", "export": f"{folder}/twin.pt2",
        "aoti": f"{folder}/twin.aoti.pt2"}  # fmt: skip
    assert metadata["format"] == "torchscript"
    assert metadata["files"] == {"torchscript": "twin.pt", "export": "twin.pt2",
                                 "aoti": "twin.aoti.pt2"}  # fmt: skip
    for record in metadata["formats"].values():
        assert record["max_diff"] <= metadata["verification"]["tolerance"]
        assert 0 < record["update_p50_ms"] <= record["update_p99_ms"]


def test_a_missing_measurement_leaves_the_state_as_predict_alone(eager):
    _, scripted, _, dataset = eager
    u, y = _test_rows(dataset, 3)
    with torch.no_grad():
        x, P, u_held, ewma, run = scripted.initial_state(u[:, :PAST_STEPS], y[:, :PAST_STEPS])
        x_pred, P_pred, _ = scripted.predict(x, P, u_held, u[:, PAST_STEPS])
        nothing = torch.zeros_like(y[:, PAST_STEPS], dtype=torch.bool)
        out = scripted.update(x, P, u_held, ewma, run, u[:, PAST_STEPS], y[:, PAST_STEPS], nothing)
    assert torch.equal(out[0], x_pred)
    assert torch.equal(out[1], P_pred)
    assert torch.equal(out[3], ewma) and torch.equal(out[4], run)  # the monitor holds
    assert torch.equal(out[6], torch.zeros_like(out[6]))  # no residual
    # NaN measurements with mask True count as missing too
    nan = torch.full_like(y[:, PAST_STEPS], float("nan"))
    with torch.no_grad():
        out_nan = scripted.update(x, P, u_held, ewma, run, u[:, PAST_STEPS], nan, ~nothing)
    assert torch.equal(out_nan[0], x_pred)


def test_scripted_update_sequence_equals_eager(eager):
    from training.export import run_filter

    online, scripted, _, dataset = eager
    u, y = _test_rows(dataset, 20)
    a = run_filter(online, u, y, PAST_STEPS)
    b = run_filter(scripted, u, y, PAST_STEPS)
    assert len(a) == len(b) == 21
    for step_a, step_b in zip(a, b, strict=True):
        for value_a, value_b in zip(step_a, step_b, strict=True):
            torch.testing.assert_close(value_b, value_a, rtol=0, atol=SCRIPTED_VS_EAGER)
    alarms = torch.stack([s[11] for s in b[1:]])
    assert alarms.dtype == torch.bool
    assert torch.isfinite(torch.stack([s[8] for s in b[1:]])).all()


def test_a_window_too_short_is_refused_naming_the_argument(eager):
    online, scripted, _, dataset = eager
    u, y = _test_rows(dataset, 4)
    for twin in (online, scripted):  # was an indexing error deep inside the twin
        with pytest.raises(Exception, match=r"past_u: expected \(batch, rows >= 2, columns\)"):
            twin.initial_state(u[:, :1], y[:, :1])
        with pytest.raises(Exception, match=r"u: expected \(batch, rows >= 1, columns\), got "
                                            r"\[\d+, 0, \d+\]"):  # fmt: skip
            twin.forecast(u[:, :PAST_STEPS], y[:, :PAST_STEPS], u[:, PAST_STEPS:PAST_STEPS])


def test_a_truncated_twin_file_names_the_path_and_the_cause(exported, tmp_path):
    from training.export import TwinFileError, load_twin_file

    _, _, out, _ = exported
    data = out.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(TwinFileError, match=r"truncated\.pt.*not a readable TorchScript"):
        load_twin_file(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a twin")
    with pytest.raises(TwinFileError, match="garbage.pt"):
        load_twin_file(garbage)
    with pytest.raises(TwinFileError, match="no such file"):
        load_twin_file(tmp_path / "absent.pt")


def test_the_detector_fits_on_train_and_val_and_never_on_a_scoring_split(export_dataset):
    from hybrid_twin import ConfigError
    from training.dataset import PreparedDataset
    from training.export import monitor_fit_runs

    dataset = PreparedDataset.open(export_dataset)
    runs = monitor_fit_runs(dataset, ["train", "val"], PAST_STEPS)
    expected = [*dataset.run_ids("train"), *dataset.run_ids("val")]
    assert [r.run_id for r in runs] == expected and len(expected) == 3
    assert [r.run_id for r in monitor_fit_runs(dataset, "val", PAST_STEPS)] == expected[2:]
    for splits in (["train", "test"], "fault", []):
        with pytest.raises(ConfigError, match=r"monitor.fit_split: .*test, fault score it"):
            monitor_fit_runs(dataset, splits, PAST_STEPS)


PT2_CALL = """
import sys, torch
from torch.export.pt2_archive._package import load_pt2
contents = load_pt2(sys.argv[1])
programs = contents.aoti_runners or {n: p.module() for n, p in contents.exported_programs.items()}
a = torch.load(sys.argv[2])
out = {}
with torch.no_grad():
    out["forecast"] = programs["forecast"](a["past_u"], a["past_y"], a["u"])
    state = programs["initial_state"](a["past_u"], a["past_y"])
    out["initial_state"] = list(state)
    out["update"] = list(programs["update"](*state, a["row_u"], a["row_y"], a["mask"]))
torch.save(out, sys.argv[3])
bad = [n for n in ("training", "hybrid_twin", "mlflow", "data_pipelines") if n in sys.modules]
assert not bad, bad
"""


@pytest.mark.parametrize("name", ["twin.pt2", "twin.aoti.pt2"])
def test_each_pt2_format_runs_in_a_process_that_imports_only_torch_as_eager(
    exported, eager, name
):
    online, _, _, dataset = eager
    _, _, out, _ = exported
    u, y = _test_rows(dataset, 24)
    # Contiguous arguments: the caller rule of training/export_formats.py.
    args = {"past_u": u[:, :PAST_STEPS].contiguous(), "past_y": y[:, :PAST_STEPS].contiguous(),
            "u": u[:, PAST_STEPS:].contiguous(), "row_u": u[:, PAST_STEPS].contiguous(),
            "row_y": y[:, PAST_STEPS].contiguous()}  # fmt: skip
    args["mask"] = torch.isfinite(args["row_y"])
    inputs, result_file = out.parent / f"{name}.inputs.pt", out.parent / f"{name}.result.pt"
    torch.save(args, inputs)
    result = subprocess.run(
        [sys.executable, "-c", PT2_CALL, str(out.parent / name), str(inputs), str(result_file)],
        cwd="/", capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(result_file)
    with torch.no_grad():
        forecast = online.forecast(args["past_u"], args["past_y"], args["u"])
        state = online.initial_state(args["past_u"], args["past_y"])
        update = online.update(*state, args["row_u"], args["row_y"], args["mask"])
    forecast_got = got["forecast"][0] if isinstance(got["forecast"], list) else got["forecast"]
    torch.testing.assert_close(forecast_got, forecast, rtol=0, atol=SCRIPTED_VS_EAGER)
    for value_got, value in zip(got["initial_state"], state, strict=True):
        torch.testing.assert_close(value_got, value, rtol=0, atol=SCRIPTED_VS_EAGER)
    for value_got, value in zip(got["update"], update, strict=True):
        torch.testing.assert_close(value_got, value, rtol=0, atol=SCRIPTED_VS_EAGER)


def test_pt2_twin_applies_the_caller_rules_strided_rows_and_a_one_row_horizon(exported, eager):
    """Through `load_pt2_twin`, which export's verification uses: the service's ProgramTwin."""
    from serving.twin_formats import ProgramTwin
    from training.export_formats import load_pt2_twin

    online, _, _, dataset = eager
    _, _, out, _ = exported
    u, y = _test_rows(dataset, 4)
    for name in ("twin.pt2", "twin.aoti.pt2"):
        twin, metadata = load_pt2_twin(out.parent / name)
        assert isinstance(twin, ProgramTwin)
        assert metadata["format"] == twin.format == name.split(".")[1].replace("pt2", "export")
        with torch.no_grad():
            # a horizon of one row (padded inside), from strided views (made contiguous)
            args = (u[:, :PAST_STEPS], y[:, :PAST_STEPS], u[:, PAST_STEPS:][:, :1])
            got, expected = twin.forecast(*args), online.forecast(*args)
        assert got.shape == expected.shape == (u.shape[0], 1, len(metadata["measurement_tags"]))
        torch.testing.assert_close(got, expected, rtol=0, atol=SCRIPTED_VS_EAGER)


def test_a_damaged_pt2_file_names_the_path_and_the_cause(exported, tmp_path):
    from training.export_formats import TwinFormatError, load_pt2_twin

    _, _, out, _ = exported
    data = (out.parent / "twin.aoti.pt2").read_bytes()
    truncated = tmp_path / "truncated.aoti.pt2"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(TwinFormatError, match=r"truncated\.aoti\.pt2 is not a readable PT2"):
        load_pt2_twin(truncated)


def test_a_nan_on_one_side_only_is_an_infinite_difference_not_a_pass():
    from training.export import max_scaled_difference

    eager = torch.tensor([[1.0, math.inf, math.nan, 2.0]])
    scale = torch.ones(4)
    assert max_scaled_difference(eager, eager.clone(), scale) == 0.0  # inf = inf, NaN = NaN
    off = eager.clone()
    off[0, 3] = 2.5
    assert max_scaled_difference(eager, off, scale) == 0.5
    for broken in (torch.tensor([[1.0, math.inf, math.nan, math.nan]]),  # NaN in the candidate
                   torch.tensor([[1.0, math.inf, 0.0, 2.0]])):  # a number where eager has NaN
        assert max_scaled_difference(eager, broken, scale) == math.inf  # > any tolerance


def test_formats_must_be_known_and_include_torchscript():
    from hybrid_twin import ConfigError
    from training.export import check_formats

    assert check_formats(["aoti", "torchscript"]) == ["torchscript", "aoti"]
    with pytest.raises(ConfigError, match=r"unknown: \['onnx'\]"):
        check_formats(["torchscript", "onnx"])
    with pytest.raises(ConfigError, match="torchscript is always written"):
        check_formats(["export"])


def test_pt2_programs_take_the_smallest_windows_and_one_line(exported, eager):
    """program_shapes' lower ends: a past window of 2 and 3 rows, a horizon of 1 (padded) and
    2 rows, a batch of one line: the same as eager."""
    from training.export_formats import load_pt2_twin

    online, _, _, dataset = eager
    _, _, out, _ = exported
    u, y = _test_rows(dataset, 16)
    # two different lines from the one test run: its start and 5 rows later
    u, y = torch.stack([u[0, :12], u[0, 5:17]]), torch.stack([y[0, :12], y[0, 5:17]])
    for name in ("twin.pt2", "twin.aoti.pt2"):
        twin, _ = load_pt2_twin(out.parent / name)
        for lines, past, horizon in ((1, 2, 1), (1, 3, 2), (2, 2, 2), (2, 3, 1)):
            args = (u[:lines, :past], y[:lines, :past], u[:lines, past : past + horizon])
            with torch.no_grad():
                got, expected = twin.forecast(*args), online.forecast(*args)
                state, state_eager = twin.initial_state(*args[:2]), online.initial_state(*args[:2])
            torch.testing.assert_close(got, expected, rtol=0, atol=SCRIPTED_VS_EAGER)
            for value, value_eager in zip(state, state_eager, strict=True):
                torch.testing.assert_close(value, value_eager, rtol=0, atol=SCRIPTED_VS_EAGER)


class _OneOutputOff:
    """The scripted twin with one `update` output moved (fed back when it is a state field)."""

    def __init__(self, scripted, index: int) -> None:
        self.scripted, self.index = scripted, index

    def forecast(self, *args):
        return self.scripted.forecast(*args)

    def initial_state(self, *args):
        return self.scripted.initial_state(*args)

    def update(self, *args):
        out = list(self.scripted.update(*args))
        value = out[self.index]
        if value.dtype == torch.bool:
            out[self.index] = ~value
        elif not value.is_floating_point():
            out[self.index] = value + 1
        else:  # 1e-3 of the value, at least 1e-3: far above the 1e-6 tolerance on any scale
            out[self.index] = value + 1e-3 * value.abs().clamp_min(1.0)
        return tuple(out)


def test_verification_compares_every_output_the_service_returns(eager):
    # residual_var, t2_limit, ewma_stat, P, u_held, ewma, run_length and status were not
    # compared: a file serving residual_var x3 and status 7 passed with max_diff 0.0
    from omegaconf import OmegaConf

    from training.export import ExportMismatchError, verification_data, verify_twin
    from training.online_twin import UPDATE_OUTPUTS

    online, scripted, _, dataset = eager
    verify = OmegaConf.create({"split": "test", "max_runs": 1, "update_steps": 12,
                               "forecast_steps": 12, "tolerance": SCRIPTED_VS_EAGER})  # fmt: skip
    held_out = verification_data(dataset, verify, PAST_STEPS, torch.float64)
    passed = verify_twin(online, scripted, held_out, verify, torch.float64)
    exact = {"alarm", "run_length", "status"}
    assert set(passed["diffs"]) == {"forecast", *(set(UPDATE_OUTPUTS) - exact)}
    assert passed["mismatches"] == dict.fromkeys(sorted(exact, key=UPDATE_OUTPUTS.index), 0)
    for index, name in enumerate(UPDATE_OUTPUTS):
        with pytest.raises(ExportMismatchError) as refused:
            verify_twin(online, _OneOutputOff(scripted, index), held_out, verify, torch.float64)
        # its own entry is off (a state field fed back moves the others too, even more)
        entry = re.search(rf"'{name}': ([^,}}]+)", str(refused.value)).group(1)
        assert float(entry) > SCRIPTED_VS_EAGER, (name, str(refused.value))


def test_two_versions_of_one_run_keep_their_own_exported_files(exported, tmp_path,
                                                                monkeypatch):  # fmt: skip
    # A resumed run registers a version per `twin train`; each export was logged as
    # twin_export/twin.pt, so exporting version 2 replaced the file version 1 (and an alias
    # on it, a rollback) names: version 1 then failed its digest check
    import mlflow

    from serving.registry import load_from_registry
    from serving.twin_file import TwinFileError
    from training.export import _log

    _, _, out, _ = exported
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    # _log uses the process's tracking URI; set as set_tracking_uri would, restored after
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", uri)
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    client.create_registered_model("cdc-line-twin")
    files = {}
    for version, label in (("1", "first"), ("2", "second")):
        client.create_model_version("cdc-line-twin", f"runs:/{run_id}/model", run_id)
        scripted = torch.jit.load(str(out))  # the same twin, its metadata telling them apart
        files[version] = tmp_path / version / "twin.pt"
        files[version].parent.mkdir()
        torch.jit.save(scripted, str(files[version]),
                       _extra_files={"metadata.json": json.dumps({**json.loads(
                           _metadata_text(out)), "label": label})})  # fmt: skip
        _log(run_id, version, "cdc-line-twin", {"torchscript": files[version]},
             {"verification": {"max_diff": 0.0}})  # fmt: skip
    for version, label in (("1", "first"), ("2", "second")):
        twin = load_from_registry(f"models:/cdc-line-twin/{version}", uri, "torchscript")
        assert twin.metadata["label"] == label
        assert twin.file == f"twin_export/v{version}/twin.pt"
    # a stored file that is not the one exported is named as stored, not as its deleted
    # temporary download
    client.set_model_version_tag("cdc-line-twin", "1", "twin_export.files", json.dumps(
        {"torchscript": {"file": "twin_export/v2/twin.pt", "sha256": "0" * 64}}))
    with pytest.raises(TwinFileError, match=rf"twin file runs:/{run_id}/twin_export/v2/twin.pt: "
                                            "sha256 [0-9a-f]+ differs from the registry's 0+ "):
        load_from_registry("models:/cdc-line-twin/1", uri, "torchscript")


def _metadata_text(path) -> str:
    extra = {"metadata.json": ""}
    torch.jit.load(str(path), _extra_files=extra)
    return extra["metadata.json"]


def test_loading_a_runs_twin_leaves_nothing_in_the_temp_folder(exported, tmp_path, monkeypatch):
    # MLflow downloads into a new temporary folder unless told where: each export,
    # evaluation and scenario left the run's config.yaml and a whole copy of its model there
    import tempfile

    import mlflow

    from training.export import load_twin_file
    from training.tracking import download_run_file, load_twin

    _, uri, out, _ = exported
    run_id = load_twin_file(out)[1]["training_run_id"]
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", uri)
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    assert "flowsheet" in download_run_file(run_id, "config.yaml")
    twin = load_twin(run_id)  # runs:/<run>/model: the newest model the run logged
    assert isinstance(twin, torch.jit.ScriptModule)
    assert list(temp.iterdir()) == []


def test_a_linear_state_space_twin_exports_for_any_batch_and_matches_eager():
    # torch.export fixed the batch to != 1 (the parameter matrices broadcast as (1, n, n)
    # against the batch), and with no measured state to reset, the forecast's time loop got
    # a strided view of the burn-in as its state: `twin export` of the linear prior failed.
    from hybrid_twin.flowsheets import FLOWSHEETS
    from training.export_formats import example_arguments, export_programs
    from training.online_twin import OnlineTwin, placeholder_monitor
    from training.twin_model import build_twin_model

    generator = torch.Generator().manual_seed(0)
    stats = (torch.tensor([2.8]), torch.tensor([1.0]), torch.tensor([5.6]), torch.tensor([2.2]))
    twin = build_twin_model(FLOWSHEETS["cascaded_tanks_linear"](), {"kind": "hybrid"},
                            {"name": "rk4", "n_substeps": 1}, ["PUMP.VOLTAGE"], ["TANK2.LEVEL"],
                            stats, 4.0, generator=generator)  # fmt: skip
    online = OnlineTwin(twin, torch.ones(2), torch.ones(1), torch.ones(2),
                        placeholder_monitor(1)).to(torch.float64).eval()  # fmt: skip
    u = 2.8 + torch.rand(3, 40, 1, generator=generator, dtype=torch.float64)
    y = 5.6 + torch.rand(3, 40, 1, generator=generator, dtype=torch.float64)
    programs = export_programs(online, example_arguments(online, u, y, 12))
    for batch in (1, 3):
        past_u, past_y, future = u[:batch, :12], y[:batch, :12], u[:batch, 12:30]
        with torch.no_grad():
            expected = online.forecast(past_u, past_y, future)
            got = programs["forecast"].module()(past_u, past_y, future)
            state = programs["initial_state"].module()(past_u, past_y)
        assert got.shape == (batch, 18, 1)
        torch.testing.assert_close(got, expected, rtol=0.0, atol=SCRIPTED_VS_EAGER)
        torch.testing.assert_close(state[0], online.initial_state(past_u, past_y)[0])
