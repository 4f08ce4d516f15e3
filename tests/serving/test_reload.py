"""Hot reload: a newer twin swapped in under load without a failed request; a bad or
incompatible one (a metadata field of the wrong type, other tag units) refused with the old
one kept; a post on one twin; the housekeeping loop outliving an unexpected error; the
registry alias followed by polling."""

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from tests.serving.reference import replay
from tests.serving.server import in_process, start_server, stop_server

PAST, ROWS, SESSIONS = 6, 16, 4
CLOSE = {"rtol": 1e-9, "atol": 1e-9}


def rewrite(source: Path, out: Path, **changes) -> Path:
    """The same scripted twin saved again with metadata changes (a new file, a new digest)."""
    extra = {"metadata.json": ""}
    module = torch.jit.load(str(source), _extra_files=extra)
    metadata = {**json.loads(extra["metadata.json"]), **changes}
    torch.jit.save(module, str(out), _extra_files={"metadata.json": json.dumps(metadata)})
    return out


@pytest.fixture(scope="module")
def file_server(twin_build, tmp_path_factory):
    folder = tmp_path_factory.mktemp("reload")
    served = folder / "twin.pt"
    shutil.copy(twin_build.path, served)
    server = start_server(folder, f"model_uri={served}", "format=torchscript")  # rewritten below
    yield server, served
    stop_server(server)


def _label(client) -> str:
    return client.get("/v1/model").json()["label"]


def _reload_counts(client) -> list[str]:
    """The service's `twin_model_reloads_total` lines (none before its first reload)."""
    return [x for x in client.get("/metrics").text.splitlines()
            if x.startswith("twin_model_reloads_total")]  # fmt: skip


def _first_reload_counts(client, tries: int) -> list[str]:
    """`_reload_counts` once the poll has counted a reload, tried every 0.1 s."""
    for _ in range(tries):
        if counts := _reload_counts(client):
            return counts
        time.sleep(0.1)
    return _reload_counts(client)


def test_reload_under_load_drops_no_request_and_switches_once(file_server, twin, metadata,
                                                              runs):  # fmt: skip
    server, served = file_server
    v2 = rewrite(served, served.with_name("v2.pt"), registered_version="2")
    lines = [runs[j][: PAST + ROWS] for j in range(SESSIONS)]
    with server.client() as client:
        v1_label = _label(client)
        sids = [client.post("/v1/sessions", json={"line_id": f"LINE-r{j}",
                                                  "past": lines[j][:PAST]}).json()["session_id"]
                for j in range(SESSIONS)]  # fmt: skip

    def drive(j: int) -> list:
        out = []
        with server.client() as client:
            for row in lines[j][PAST:]:
                response = client.post(f"/v1/sessions/{sids[j]}/observations",
                                       json={"observations": [row]})  # fmt: skip
                out.append(response)
        return out

    with ThreadPoolExecutor(SESSIONS + 1) as pool:
        posts = [pool.submit(drive, j) for j in range(SESSIONS)]
        with server.client() as client:
            while not any(f.done() for f in posts):  # reload while the posts run
                first = client.get(f"/v1/sessions/{sids[0]}").json()["n_updates"]
                if first >= ROWS // 4:
                    break
            os.replace(v2, served)  # as `twin export` writes: a complete file, renamed
            reload = client.post("/v1/model/reload")
        answers = [f.result() for f in posts]
    assert reload.status_code == 200, reload.text
    assert reload.json()["changed"] is True and reload.json()["previous"] == v1_label
    v2_label = reload.json()["current"]["label"]
    assert v2_label.startswith("v2-") and v2_label != v1_label
    names = metadata["state_names"]
    switched = 0
    for j, responses in enumerate(answers):
        assert [r.status_code for r in responses] == [200] * ROWS
        labels = [r.json()["model_version"] for r in responses]
        assert set(labels) <= {v1_label, v2_label}
        assert labels == sorted(labels, key=lambda x: x == v2_label)  # v1 ... v1, v2 ... v2
        switched += labels[0] == v1_label and labels[-1] == v2_label
        # same weights in v2: the answers go on exactly as before the swap
        expected = replay(twin, metadata, lines[j][:PAST], lines[j][PAST:])
        got = [[r.json()["results"][0]["state"][n] for n in names] for r in responses]
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64),
                                   torch.cat([o[0] for o in expected]), **CLOSE)  # fmt: skip
    assert switched >= 1, "the reload happened while some session was posting"
    with server.client() as client:
        assert _label(client) == v2_label
        metrics = client.get("/metrics").text
    assert 'twin_model_reloads_total{result="changed"} 1.0' in metrics
    info = next(x for x in metrics.splitlines() if x.startswith("twin_model_info{"))
    assert f'sha256="{reload.json()["current"]["sha256"]}"' in info
    assert 'format="torchscript"' in info


def test_a_broken_or_incompatible_file_is_refused_and_the_old_twin_kept(file_server):
    server, served = file_server
    good = served.read_bytes()
    with server.client() as client:
        before = _label(client)
        served.write_bytes(good[: len(good) // 2])  # truncated
        truncated = client.post("/v1/model/reload")
        served.write_bytes(good)
        tags = [*client.get("/v1/model").json()["metadata"]["input_tags"]]
        tags[0] = "FEED_API.RENAMED_SP"
        rewrite(served, served.with_name("other.pt"), input_tags=tags)
        os.replace(served.with_name("other.pt"), served)
        incompatible = client.post("/v1/model/reload")
        after = _label(client)
    served.write_bytes(good)
    assert truncated.status_code == 422
    assert truncated.json()["detail"][0]["loc"] == ["model_uri"]
    assert "not a readable TorchScript archive" in truncated.json()["detail"][0]["msg"]
    assert incompatible.status_code == 409
    assert "interface" in incompatible.json()["detail"][0]["msg"]
    assert before == after


def _reload_refused(client, served: Path, **changes):
    """The reload answer for the served file rewritten with `changes`, and the label after."""
    good = served.read_bytes()
    try:
        rewrite(served, served.with_name("changed.pt"), **changes)
        os.replace(served.with_name("changed.pt"), served)
        return client.post("/v1/model/reload"), _label(client)
    finally:
        served.write_bytes(good)


def test_a_metadata_field_of_the_wrong_type_is_refused_naming_it(file_server):
    server, served = file_server
    with server.client() as client:
        before = _label(client)
        answer, after = _reload_refused(client, served, input_tags=None)
    assert answer.status_code == 422, answer.text
    error = answer.json()["detail"][0]
    assert error["loc"] == ["model_uri"] and error["type"] == "twin_file"
    assert str(served) in error["msg"] and "field 'input_tags' is None" in error["msg"]
    assert after == before


def test_a_twin_whose_tag_units_changed_is_incompatible(file_server):
    server, served = file_server
    with server.client() as client:
        before = _label(client)
        units = {**client.get("/v1/model").json()["metadata"]["units"], "PRESS.WEIGHT_SP": "g"}
        answer, after = _reload_refused(client, served, units=units)
    assert answer.status_code == 409, answer.text
    assert "tag_units: PRESS.WEIGHT_SP 'mg' -> 'g'" in answer.json()["detail"][0]["msg"]
    assert after == before


def test_the_poll_counts_an_incompatible_file_as_the_route_does(twin_build, tmp_path):
    served = tmp_path / "twin.pt"
    shutil.copy(twin_build.path, served)
    server = start_server(tmp_path, f"model_uri={served}", "format=torchscript",
                          "reload_poll_s=0.2")  # fmt: skip
    try:
        with server.client() as client:
            before = _label(client)
            units = {**client.get("/v1/model").json()["metadata"]["units"],
                     "PRESS.WEIGHT_SP": "g"}  # fmt: skip
            rewrite(served, tmp_path / "changed.pt", units=units)
            os.replace(tmp_path / "changed.pt", served)
            counts = _first_reload_counts(client, 100)
            # "failed" before: a poll and the route named the same refusal differently
            assert counts == ['twin_model_reloads_total{result="incompatible"} 1.0'], counts
            assert _label(client) == before
    finally:
        stop_server(server)


def test_a_reload_of_what_is_served_loads_nothing(twin_build, tmp_path, monkeypatch):
    # Each AOTInductor load leaks ~1.3 MB in torch 2.13: 300 unchanged reloads grew the
    # service 396 -> 826 MiB. Nothing changed on disk: nothing is loaded.
    from serving import twin_store
    from serving.twin_file import load_twin_path

    served = tmp_path / "twin.pt"
    shutil.copy(twin_build.path, served)
    store = twin_store.TwinStore(load_twin_path(served, "torchscript"), str(served), None,
                                 "torchscript")  # fmt: skip
    loads = []
    real = twin_store.load_twin
    monkeypatch.setattr(twin_store, "load_twin", lambda *a: loads.append(a) or real(*a))
    for _ in range(3):
        twin, changed = asyncio.run(store.reload())
        assert twin is store.current and not changed
    assert loads == []
    os.utime(served, ns=(time.time_ns(), time.time_ns() + 10**9))  # rewritten, same bytes
    _, changed = asyncio.run(store.reload())
    assert len(loads) == 1 and not changed  # loaded, its digest the served one's
    for _ in range(3):  # those files are now known: nothing is loaded again
        _, changed = asyncio.run(store.reload())
        assert not changed
    assert len(loads) == 1


def test_reload_refuses_a_body_naming_its_field(file_server):
    server, _ = file_server
    with server.client() as client:
        asked = client.post("/v1/model/reload", json={"model_uri": "/elsewhere/twin.pt"})
        empty = client.post("/v1/model/reload", json={})
    assert asked.status_code == 422, asked.text
    assert asked.json()["detail"][0]["loc"] == ["body", "model_uri"]
    assert "takes no body" in asked.json()["detail"][0]["msg"]
    assert empty.status_code == 200 and empty.json()["changed"] is False


def test_a_post_runs_all_its_rows_on_the_twin_it_started_with(twin_build, runs):
    rows = runs[0][: PAST + 4]

    async def scenario() -> tuple:
        async with in_process(twin_build.path) as served:
            client, service = served.client, served.service
            sid = (
                await client.post("/v1/sessions", json={"line_id": "LINE-v", "past": rows[:PAST]})
            ).json()["session_id"]
            v1 = service.store.current
            v2 = dataclasses.replace(v1, version="2")  # a newer export of the same weights
            ran_on, commit = [], service.batcher._commit

            def commit_then_reload(items, outputs) -> None:
                ran_on.extend(o.model_version for o in outputs)
                commit(items, outputs)
                service.store.current = v2  # a reload lands between two steps of the post

            service.batcher._commit = commit_then_reload
            path = f"/v1/sessions/{sid}/observations"
            first = await client.post(path, json={"observations": rows[PAST : PAST + 3]})
            second = await client.post(path, json={"observations": rows[PAST + 3 :]})
            return v1.label, v2.label, ran_on, first.json(), second.json()

    v1, v2, ran_on, first, second = asyncio.run(scenario())
    assert ran_on == [v1, v1, v1, v2]
    assert first["model_version"] == v1 and len(first["results"]) == 3
    assert second["model_version"] == v2


def test_housekeeping_survives_an_unexpected_error_and_goes_on_expiring(twin_build, runs,
                                                                         caplog):  # fmt: skip
    async def scenario() -> tuple:
        async with in_process(twin_build.path, reload_poll_s=0.05,
                              sessions={"idle_expiry_s": 0.2}) as served:  # fmt: skip
            client, service = served.client, served.service

            async def changed() -> bool:
                return True

            async def broken_reload(uri=None):
                raise TypeError("'NoneType' object is not iterable")  # a bug, not a bad file

            service.store.changed_upstream, service.store.reload = changed, broken_reload
            await asyncio.sleep(0.3)  # a pass every 0.05 s, each failing
            created = await client.post(
                "/v1/sessions", json={"line_id": "LINE-idle", "past": runs[0][:PAST]}
            )
            await asyncio.sleep(0.6)  # idle past 0.2 s: a later pass drops it
            return created.status_code, len(service.registry), (await client.get("/metrics")).text

    with caplog.at_level(logging.ERROR, logger="serving"):
        created, still_open, metrics = asyncio.run(scenario())
    assert created == 201 and still_open == 0
    assert "twin_sessions_expired_total 1.0" in metrics
    (errors,) = [x for x in metrics.splitlines() if x.startswith("twin_housekeeping_errors_total")]
    assert float(errors.split()[-1]) >= 4  # every pass failed, and the loop went on
    assert 'twin_model_reloads_total{result="failed"}' in metrics
    logged = [r for r in caplog.records if r.message.startswith("housekeeping pass failed")]
    assert logged and logged[0].exc_info[0] is TypeError  # with its traceback


# The store's columns that hold absolute artifact paths (MLflow 3's SQLite schema).
PATH_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                ("logged_models", "artifact_location"), ("model_versions", "storage_location"))


@pytest.fixture
def registry(twin_build, tmp_path):
    """A copy of the build's MLflow store (store.db and mlruns, their paths rewritten) with
    `production` on the exported version, and its URI. A copy: the test registers versions
    and logs a file, which must not land in the build's store (the session's, or a folder
    reused through TWIN_TEST_TWIN)."""
    import sqlite3

    source = Path(twin_build.tracking_uri.removeprefix("sqlite:///")).parent
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(source / "store.db", store / "store.db")
    shutil.copytree(source / "mlruns", store / "mlruns")
    with contextlib.closing(sqlite3.connect(store / "store.db")) as db, db:
        for table, column in PATH_COLUMNS:
            db.execute(f"UPDATE {table} SET {column} = replace({column}, ?, ?)",
                       (str(source), str(store)))  # fmt: skip
    uri = f"sqlite:///{store / 'store.db'}"
    client = MlflowClient(tracking_uri=uri)
    (first, *_) = sorted(client.search_model_versions("name='cdc-line-twin'"),
                         key=lambda v: int(v.version))  # fmt: skip
    client.set_registered_model_alias("cdc-line-twin", "production", first.version)
    return client, first, uri


def test_the_service_follows_the_registry_alias(registry, twin_build, tmp_path, monkeypatch):
    client, first, uri = registry
    # create_model_version resolves the source through the default tracking URI
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    server = start_server(tmp_path, "model_uri=models:/cdc-line-twin@production",
                          f"tracking_uri={uri}", "reload_poll_s=0.5",
                          "insecure=true", token=None)  # fmt: skip
    try:
        with server.client(token=None) as http:
            served = http.get("/v1/model").json()
            assert served["version"] == str(first.version)
            # format auto: the fastest file of the version's export, its digest as tagged
            exported = json.loads(first.tags["twin_export.files"])[served["format"]]
            assert served["sha256"] == exported["sha256"]
            assert served["file"] == exported["file"]
            time.sleep(1.5)  # three polls: the alias has not moved, so nothing is reloaded
            reloads = _reload_counts(http)
            assert reloads == [], reloads
            # a version whose file does not match its tagged digest: refused once, not
            # fetched again at every poll while the alias stays on it
            broken = client.create_model_version("cdc-line-twin", first.source, first.run_id)
            for key in ("twin_export.file", "twin_export.sha256"):
                client.set_model_version_tag("cdc-line-twin", broken.version, key,
                                             first.tags[key] if key.endswith("file")
                                             else "0" * 64)  # fmt: skip
            client.set_registered_model_alias("cdc-line-twin", "production", broken.version)

            _first_reload_counts(http, 200)  # the first poll after the move refuses it
            time.sleep(2.0)  # four more polls while the alias stays on it
            failed = _reload_counts(http)
            assert failed == ['twin_model_reloads_total{result="failed"} 1.0'], failed
            assert http.get("/v1/model").json()["version"] == str(first.version)
            # a newer export of the same run, registered as a new version, aliased production
            v_next = rewrite(twin_build.path, tmp_path / "twin_next.pt", registered_version="x")
            client.log_artifact(first.run_id, str(v_next), "twin_export")
            new = client.create_model_version("cdc-line-twin", first.source, first.run_id)
            client.set_model_version_tag("cdc-line-twin", new.version, "twin_export.file",
                                         "twin_export/twin_next.pt")  # fmt: skip
            digest = hashlib.sha256(v_next.read_bytes()).hexdigest()
            client.set_model_version_tag("cdc-line-twin", new.version, "twin_export.sha256",
                                         digest)  # fmt: skip
            client.set_registered_model_alias("cdc-line-twin", "production", new.version)
            for _ in range(200):  # the poll (0.5 s) picks it up
                served = http.get("/v1/model").json()
                if served["version"] == str(new.version):
                    break
                time.sleep(0.1)
            assert served["version"] == str(new.version) and served["sha256"] == digest
    finally:
        client.set_registered_model_alias("cdc-line-twin", "production", first.version)
        stop_server(server)


def test_a_new_export_with_other_files_is_loaded_once(tmp_path, monkeypatch):
    # The files were stamped as the served export listed them: a new export that wrote one
    # more file beside twin.pt looked changed to the next poll and was loaded again.
    from serving import twin_store
    from serving.twin_file import LoadedTwin

    served = tmp_path / "twin.pt"
    served.write_bytes(b"old")

    def export(sha: str, files: dict) -> LoadedTwin:
        return LoadedTwin(module=None, metadata={"files": files}, sha256=sha,
                          source=str(served), version=None)  # fmt: skip

    store = twin_store.TwinStore(export("old", {"torchscript": "twin.pt"}), str(served), None,
                                 "torchscript")  # fmt: skip
    loads = []
    new = export("new", {"torchscript": "twin.pt", "export": "twin.pt2"})
    monkeypatch.setattr(twin_store, "load_twin", lambda *a: loads.append(a) or new)
    monkeypatch.setattr(twin_store, "interface_changes", lambda old, new: [])
    monkeypatch.setattr(LoadedTwin, "interface", property(lambda self: None))
    served.write_bytes(b"new export")
    (tmp_path / "twin.pt2").write_bytes(b"program")
    assert asyncio.run(store.reload()) == (new, True)
    assert not asyncio.run(store.changed_upstream())
    assert asyncio.run(store.reload()) == (new, False) and len(loads) == 1
