"""`twin train` end to end: Lightning fit, MLflow run contents, the registered model round trip."""

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from hybrid_twin import ConfigError
from tests.training.shipped import shipped_config
from tests.training.twin_cli import TINY_SIZES, run_twin
from training.config_dir import SHIPPED_CONFIG_DIR
from training.datamodule import CDCDataModule
from training.twin_model import build_twin_model

# mlflow.pyfunc warns about its own type hints when it is first imported (mlflow 3.17).
pytestmark = pytest.mark.filterwarnings("ignore:.*Any type hint is inferred as AnyType:UserWarning")
TINY = [*TINY_SIZES, "trainer.max_epochs=2"]  # 2 epochs of 2 batches


@pytest.fixture(scope="module")
def trained(tiny_cdc_dataset, tmp_path_factory):
    """One `twin train` run of a tiny hybrid against a SQLite store in a fresh folder."""
    folder = tmp_path_factory.mktemp("train_cli")
    uri = f"sqlite:///{folder / 'store.db'}"
    result = run_twin(folder, uri, "train", f"datamodule.path={tiny_cdc_dataset}", *TINY)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("cdc-line-twin")
    (run,) = client.search_runs([experiment.experiment_id])
    return client, run, folder, uri


def test_twin_train_logs_the_resolved_config_as_params_and_as_config_yaml(trained):
    client, run, folder, _ = trained
    params = run.data.params
    assert params["model.kind"] == "hybrid"
    assert params["datamodule.window_steps"] == "12"
    assert params["trainer.max_epochs"] == "2"
    path = client.download_artifacts(run.info.run_id, "config.yaml", str(folder))
    logged = yaml.safe_load(Path(path).read_text())
    assert logged["datamodule"]["batch_size"] == 4
    assert logged["flowsheet"]["name"] == "cdc_line"


def test_twin_train_logs_every_metric_once_per_epoch(trained):
    client, run, _, _ = trained
    for name in ("train/loss", "val/loss", "val/rmse/NIR.API_CONC", "val/rmse/BLEND.SPEED"):
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == [0, 1], name
        assert all(np.isfinite(m.value) for m in history), name


def test_twin_train_tags_the_manifest_hash_and_git_commit(trained, tiny_cdc_dataset):
    _, run, _, _ = trained
    manifest = (tiny_cdc_dataset / "manifest.json").read_bytes()
    assert run.data.tags["data.manifest_sha256"] == hashlib.sha256(manifest).hexdigest()
    commit = run.data.tags["git.commit"]
    assert commit == "unknown" or len(commit.removesuffix("-dirty")) == 40
    assert run.data.tags["model.kind"] == "hybrid"


def test_registered_version_predicts_what_the_logged_weights_predict(trained, tiny_cdc_dataset):
    import mlflow.pyfunc

    client, run, folder, uri = trained
    version = client.get_model_version("cdc-line-twin", "1")
    assert version.run_id == run.info.run_id
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pyfunc.load_model("models:/cdc-line-twin/1")
    assert loaded.metadata.signature is not None
    # An eager model rebuilt from the logged config, with the registered weights loaded.
    config = yaml.safe_load(
        Path(client.download_artifacts(run.info.run_id, "config.yaml", str(folder))).read_text()
    )
    dm = CDCDataModule(**config["datamodule"])
    eager = build_twin_model(
        config["flowsheet"],
        config["model"],
        config["solver"],
        dm.input_tags,
        dm.measurement_tags,
        dm.normalisation,
        dm.dt_s,
        config["initial_state"],
    )
    twin_pt = client.download_artifacts(run.info.run_id, "model/artifacts/twin.pt", str(folder))
    eager.load_state_dict(torch.jit.load(twin_pt).state_dict())
    example = _example(dm)
    with torch.no_grad():
        expected = eager.forecast(*(torch.as_tensor(example[k]) for k in ("past_u", "past_y", "u")))
    np.testing.assert_allclose(loaded.predict(example), expected.numpy(), rtol=1e-5, atol=1e-5)


def _example(dm: CDCDataModule) -> dict[str, np.ndarray]:
    from training.train import example_input

    dm.setup("validate")
    return example_input(dm, 2)


def test_logged_twin_loads_back_from_the_registry_with_the_in_memory_predictions(
    tiny_cdc_dataset, tmp_path
):
    import mlflow
    import mlflow.pyfunc

    from training.twin_pyfunc import log_twin

    dm = CDCDataModule(tiny_cdc_dataset, window_steps=12, past_steps=6, batch_size=4)
    model = build_twin_model(
        shipped_config("flowsheet", "cdc_line"),
        {
            **shipped_config("model", "hybrid"),
            "residual": {**shipped_config("model", "hybrid")["residual"], "zero_init": False},
        },
        {"name": "rk4"},
        dm.input_tags,
        dm.measurement_tags,
        dm.normalisation,
        dm.dt_s,
        generator=torch.Generator().manual_seed(1),
    )
    example = _example(dm)
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run():
        info = log_twin(
            model,
            example,
            {"input_tags": dm.input_tags, "measurement_tags": dm.measurement_tags},
            "cdc-line-twin",
            tmp_path,
        )
    assert str(info.registered_model_version) == "1"
    loaded = mlflow.pyfunc.load_model("models:/cdc-line-twin/1")
    with torch.no_grad():
        expected = model.forecast(*(torch.as_tensor(example[k]) for k in ("past_u", "past_y", "u")))
    assert expected.shape == (2, 12, len(dm.measurement_tags))
    np.testing.assert_allclose(loaded.predict(example), expected.numpy(), rtol=1e-6, atol=1e-6)
    assert loaded.metadata.metadata["measurement_tags"] == dm.measurement_tags
    # A consumer without this project loads and runs it (the class was stored by reference:
    # No module named 'training'), and its requirements name no package of ours
    np.savez(tmp_path / "example.npz", **example)
    result = subprocess.run([sys.executable, "-c", WITHOUT_PROJECT, uri, str(tmp_path)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "predicted.npy"), expected.numpy(),
                               rtol=1e-6, atol=1e-6)  # fmt: skip
    requirements = Path(mlflow.artifacts.download_artifacts(
        "models:/cdc-line-twin/1/requirements.txt", dst_path=str(tmp_path / "req")))
    names = {line.split("==")[0] for line in requirements.read_text().split()}
    assert names == {"mlflow", "torch", "numpy", "cloudpickle"}, requirements.read_text()


# The project's packages cannot be imported here, as on a machine with torch and mlflow alone.
WITHOUT_PROJECT = r"""
import importlib.abc, sys, warnings
import numpy as np
class NoProject(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("training", "hybrid_twin", "data_pipelines", "serving", "tests"):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, NoProject())
warnings.filterwarnings("ignore")
import mlflow, mlflow.pyfunc
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model("models:/cdc-line-twin/1")
example = dict(np.load(sys.argv[2] + "/example.npz"))
np.save(sys.argv[2] + "/predicted.npy", model.predict(example))
"""


def _single_run(uri: str):
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("cdc-line-twin")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def test_twin_train_logs_val_metrics_only_for_the_epochs_that_validated(tiny_cdc_dataset, tmp_path):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    result = run_twin(
        tmp_path,
        uri,
        "train",
        f"datamodule.path={tiny_cdc_dataset}",
        "model=mechanistic",
        *TINY_SIZES,
        "trainer.max_epochs=4",
        "+trainer.check_val_every_n_epoch=2",  # validates after epochs 1 and 3
        "trainer.num_sanity_val_steps=1",  # a sanity check is no epoch's validation
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client, run = _single_run(uri)

    def steps(name: str) -> list[int]:
        return [m.step for m in client.get_metric_history(run.info.run_id, name)]

    assert steps("train/loss") == [0, 1, 2, 3]
    for name in ("val/loss", "val/rmse/NIR.API_CONC"):
        assert steps(name) == [1, 3], name


def test_an_unknown_plot_split_is_refused_before_a_run_or_a_version_exists(
    tiny_cdc_dataset, tmp_path
):
    # Checked only when plotting, after the version was registered: the run failed, and its
    # version became "the latest" that a bare `twin export` shipped.
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    result = run_twin(tmp_path, uri, "train", f"datamodule.path={tiny_cdc_dataset}",
                      "model=mechanistic", *TINY_SIZES, "tracking.plot_split=nosuch")  # fmt: skip
    assert result.returncode != 0
    assert "tracking.plot_split: unknown split 'nosuch'; the manifest has: " in result.stderr
    client = MlflowClient(tracking_uri=uri)
    assert client.search_model_versions("name='cdc-line-twin'") == []
    experiment = client.get_experiment_by_name("cdc-line-twin")
    assert experiment is None or client.search_runs([experiment.experiment_id]) == []


def test_a_validation_cadence_that_skips_the_last_epoch_is_refused():
    from omegaconf import OmegaConf

    from training.train import check_validation_cadence

    # 3 epochs validated every 2: the model registered after epoch 2 would carry epoch 1's loss
    expected = r"check_val_every_n_epoch=2 does not divide trainer.max_epochs=3.*epoch 1 "
    with pytest.raises(ConfigError, match=expected):
        check_validation_cadence(OmegaConf.create({"max_epochs": 3, "check_val_every_n_epoch": 2}))
    check_validation_cadence(OmegaConf.create({"max_epochs": 4, "check_val_every_n_epoch": 2}))
    check_validation_cadence(OmegaConf.create({"max_epochs": 3}))


@pytest.mark.slow
def test_twin_train_with_ddp_runs_two_gloo_processes_on_cpu_and_records_one_run(
    tiny_cdc_dataset, tmp_path
):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    result = run_twin(
        tmp_path, uri, "train", f"datamodule.path={tiny_cdc_dataset}", *TINY, "trainer=ddp",
        "hydra.run.dir=run",
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "distributed_backend=gloo" in output
    assert "Starting with 2 processes" in output
    client, run = _single_run(uri)  # the second process trains but records nothing
    assert run.data.params["trainer.devices"] == "2"
    history = client.get_metric_history(run.info.run_id, "val/loss")
    assert [m.step for m in history] == [0, 1]
    # The 7 val windows split over 2 processes: each counted once, as by one process.
    assert history[-1].value == pytest.approx(_one_process_val_loss(tmp_path / "run"), rel=1e-5)
    assert client.get_model_version("cdc-line-twin", "1").run_id == run.info.run_id


def _one_process_val_loss(run_dir: Path) -> float:
    from omegaconf import OmegaConf

    from training.build import build_training

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    datamodule, _, lit = build_training(cfg, OmegaConf.to_container(cfg, resolve=True))
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    lit.load_state_dict(checkpoint["state_dict"])
    windows = datamodule.sequential_windows("val")
    assert len(windows) % 2 == 1  # so that a padding sampler would repeat one
    squared, count = 0.0, 0
    with torch.no_grad():
        for batch in torch.utils.data.DataLoader(windows, batch_size=4):
            y_hat = lit.model(batch.past_u, batch.past_y, batch.past_mask, batch.u)
            squared += float(torch.where(batch.mask, y_hat - batch.y, 0.0).pow(2).sum())
            count += int(batch.mask.sum())
    return squared / count


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_healthy(url: str, server: subprocess.Popen, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"mlflow server at {url} not healthy after {timeout_s} s")


@pytest.mark.slow
def test_twin_train_against_a_real_mlflow_server_records_and_registers_the_run(
    tiny_cdc_dataset, tmp_path
):
    import mlflow.pyfunc

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
        ],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_until_healthy(url, server)
        result = run_twin(
            tmp_path,
            url,
            "train",
            f"datamodule.path={tiny_cdc_dataset}",
            *TINY,
            "model=mechanistic",
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        client, run = _single_run(url)
        assert run.data.params["model.kind"] == "mechanistic"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [0, 1]
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "config.yaml" in names
        mlflow.set_tracking_uri(url)
        loaded = mlflow.pyfunc.load_model("models:/cdc-line-twin/1")
        dm = CDCDataModule(tiny_cdc_dataset, window_steps=12, past_steps=6, batch_size=4)
        prediction = loaded.predict(_example(dm))
        assert prediction.shape == (2, 12, len(dm.measurement_tags))
        assert np.isfinite(prediction).all()
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its worker, by the group we made
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(SHIPPED_CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp"])
@pytest.mark.parametrize("kind", ["hybrid", "mechanistic", "black_box"])
def test_train_config_composes_for_every_model_kind_and_trainer(kind, trainer):
    cfg = _compose(f"model={kind}", f"trainer={trainer}")
    assert cfg.model.kind == kind
    assert cfg.datamodule.window_steps == 60  # experiment=cdc_default applied last
    assert cfg.trainer.precision == 32


def test_seed_zero_fixes_the_network_weights_and_null_leaves_them_free(tiny_cdc_dataset):
    from omegaconf import OmegaConf

    from training.build import build_training

    def weights(seed: str) -> torch.Tensor:
        cfg = _compose("model=black_box", f"seed={seed}", f"datamodule.path={tiny_cdc_dataset}")
        config = OmegaConf.to_container(cfg, resolve=True)
        return build_training(cfg, config)[1].field.net.layers[0].weight.detach().clone()

    torch.testing.assert_close(weights("0"), weights("0"), rtol=0.0, atol=0.0)
    assert not torch.equal(weights("null"), weights("null"))


def test_twin_train_logs_open_loop_plots_of_the_test_runs(trained, tiny_cdc_dataset):
    from training.dataset import PreparedDataset

    client, run, _, _ = trained
    names = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    test_runs = PreparedDataset.open(tiny_cdc_dataset).run_ids("test")
    expected = {f"plots/predicted_vs_measured_{r}.png" for r in test_runs}
    assert expected | {"plots/parity.png", "plots/residual_size.png"} == names


def test_a_tag_recorded_in_another_unit_than_its_quantity_is_refused():
    from hybrid_twin import build_flowsheet
    from hybrid_twin.flowsheets import cdc_line_flowsheet_spec
    from training.build import check_tag_units

    flowsheet = build_flowsheet(cdc_line_flowsheet_spec())
    units = {"FEED_API.MASSFLOW_SP": "kg/h", "NIR.API_CONC": "%w/w", "BLEND.SPEED": "rpm"}
    check_tag_units(flowsheet, units)  # the shipped units agree
    # a feeder recorded in g/min on a kg/h input would run 60x off, silently
    expected = (r"flowsheet.inputs.FEED_API.MASSFLOW_SP: the dataset records "
                r"FEED_API.MASSFLOW_SP in 'g/min', but feeder_api.mass_flow_sp_kg_h is in 'kg/h'")
    with pytest.raises(ConfigError, match=expected):
        check_tag_units(flowsheet, {**units, "FEED_API.MASSFLOW_SP": "g/min"})
    with pytest.raises(ConfigError, match=r"flowsheet.measurements.BLEND.SPEED: .* in 'rad/s'"):
        check_tag_units(flowsheet, {**units, "BLEND.SPEED": "rad/s"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback where no CUDA device is")
def test_trainer_gpu_falls_back_to_the_cpu_with_a_warning_where_there_is_no_cuda():
    from training.train import trainer_arguments

    cfg = _compose("trainer=gpu").trainer
    # Lightning stopped with "No supported gpu backend found!" before anything ran
    with pytest.warns(UserWarning, match=r"trainer.accelerator=gpu: no CUDA device here, "
                                         r"training on the CPU instead"):  # fmt: skip
        arguments = trainer_arguments(cfg)
    assert arguments["accelerator"] == "cpu" and arguments["devices"] == 1


def test_training_warns_where_no_measurement_starts_a_window(tiny_tanks_dataset, caplog):
    # The linear prior's level maps to its output y, not to a state: past levels were never
    # used to start a window, silently (a soft sensor forecast worse than the last value)
    from omegaconf import OmegaConf

    from training.build import build_training

    def warnings(*overrides: str) -> list[str]:
        cfg = _compose("experiment=cascaded_tanks", f"datamodule.path={tiny_tanks_dataset}",
                       *overrides)  # fmt: skip
        caplog.clear()
        with caplog.at_level("WARNING", logger="training.build"):
            build_training(cfg, OmegaConf.to_container(cfg, resolve=True))
        return [r.getMessage() for r in caplog.records]

    (linear,) = warnings("flowsheet=cascaded_tanks_linear", "model=mechanistic")
    assert linear.startswith("no measurement maps to a state of flowsheet "
                             "cascaded_tanks_linear (they map to outputs only)")  # fmt: skip
    assert "past values of ['TANK2.LEVEL'] are not used" in linear
    assert warnings("flowsheet=cascaded_tanks", "model=mechanistic") == []  # lower level resets
    (short,) = warnings("flowsheet=cascaded_tanks", "model=hybrid", "trainer.max_epochs=2",
                        "lit.theta_only_epochs=2")  # fmt: skip
    assert short == "lit.theta_only_epochs = 2 >= trainer.max_epochs = 2: the hybrid's network " \
                    "never trains"


def test_each_job_of_a_sweep_is_tagged_with_its_sweep_and_named_by_its_number(
    tiny_cdc_dataset, tmp_path
):
    # Nothing tied a run to its sweep, and the `/` of datamodule.path split a job's folder
    # into nested ones, the last of which named the run ("mechanistic-prepared,...")
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    sweep = tmp_path / "sweep"
    result = run_twin(tmp_path, uri, "train", "-m", "model=mechanistic", "optimizer.lr=1e-3,2e-3",
                      f"datamodule.path={tiny_cdc_dataset}", *TINY_SIZES, "trainer.max_epochs=1",
                      "tracking.plot_split=null", f"hydra.sweep.dir={sweep}")  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("cdc-line-twin")
    runs = sorted(client.search_runs([experiment.experiment_id]),
                  key=lambda r: r.data.tags["sweep.job"])  # fmt: skip
    assert [r.info.run_name for r in runs] == ["mechanistic-sweep-0", "mechanistic-sweep-1"]
    for job, (run, lr) in enumerate(zip(runs, ("0.001", "0.002"), strict=True)):
        tags = run.data.tags
        assert (tags["sweep.dir"], tags["sweep.job"]) == (str(sweep.resolve()), str(job))
        assert f"optimizer.lr={lr}" in tags["sweep.overrides"].split(",")
        assert f"datamodule.path={tiny_cdc_dataset}" in tags["sweep.overrides"].split(",")
        assert run.data.params["optimizer.lr"] == lr
    # one folder per job, right under the sweep's, its name cut (the tags have it whole)
    folders = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert [f[:2] for f in folders] == ["0_", "1_"] and all(len(f) <= 122 for f in folders)
    assert folders[0].startswith("0_datamodule.batch_size=4,")
    assert all((sweep / f / "checkpoints" / "last.ckpt").is_file() for f in folders)
