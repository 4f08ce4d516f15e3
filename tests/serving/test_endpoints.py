"""Each endpoint of a real `twin serve` process, over HTTP, against the twin file itself."""

import hashlib
import json
from datetime import datetime, timedelta

import pytest
import torch

from tests.serving.reference import replay, tensors

PAST = 6  # the tiny twin's past_steps
# The service batches lines together; float64 results of batched and single-line updates
# agree to rounding (the same ops in another order at most).
CLOSE = {"rtol": 1e-9, "atol": 1e-9}


def _create(client, line_id: str, past: list[dict]) -> dict:
    response = client.post("/v1/sessions", json={"line_id": line_id, "past": past})
    assert response.status_code == 201, response.text
    return response.json()


def _close(actual: list, expected: torch.Tensor) -> None:
    torch.testing.assert_close(torch.tensor(actual, dtype=torch.float64), expected, **CLOSE)


def test_health_and_readiness_answer_without_a_token(server):
    with server.client(token=None) as client:
        assert client.get("/healthz").json() == {"status": "ok", "model_version": None,
                                                 "format": None}  # fmt: skip
        ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"


def test_model_endpoint_gives_the_files_digest_and_metadata(server, twin_build, metadata):
    with server.client() as client:
        body = client.get("/v1/model").json()
    # format auto (the default) serves the export's fastest file: the one /v1/model names
    served = twin_build.path.with_name(metadata["files"][body["format"]])
    assert body["file"] == str(served) and body["format_setting"] == "auto"
    assert body["sha256"] == hashlib.sha256(served.read_bytes()).hexdigest()
    # JSON has no inf: t2_limits[0] (no tag sampled) is inf in the file, null in the response
    expected = {**metadata, "format": body["format"]}  # the files' metadata differ in this only
    assert body["metadata"] == json.loads(json.dumps(expected).replace("Infinity", "null"))
    assert body["version"] == metadata["registered_version"] == "1"
    assert body["label"] == f"v1-{body['sha256'][:12]}"


def test_forecast_of_two_lines_equals_the_twin_files_forecast(server, twin, metadata, runs):
    lines = [runs[0][:PAST + 12], runs[1][40:40 + PAST + 12]]
    body = {"lines": [{"past": [{"inputs": r["inputs"], "measurements": r["measurements"]}
                                for r in rows[:PAST]],
                       "future_inputs": [r["inputs"] for r in rows[PAST:]]}
                      for rows in lines]}  # fmt: skip
    with server.client() as client:
        response = client.post("/v1/forecast", json=body)
    assert response.status_code == 200, response.text
    u, y = zip(*(tensors(rows, metadata) for rows in lines), strict=True)
    u, y = torch.cat(u), torch.cat(y)
    with torch.no_grad():
        expected = twin.forecast(u[:, :PAST], y[:, :PAST], u[:, PAST:])
    tags = metadata["measurement_tags"]
    got = [[[step[t] for t in tags] for step in line["predicted"]]
           for line in response.json()["lines"]]  # fmt: skip
    _close(got, expected)


def test_session_answers_row_by_row_as_the_twin_file_does(server, twin, metadata, runs):
    rows = runs[2][: PAST + 5]
    past, new = rows[:PAST], rows[PAST:]
    expected = replay(twin, metadata, past, new)
    with server.client() as client:
        created = _create(client, "LINE-round-trip", past)
        sid = created["session_id"]
        assert created["n_updates"] == 0 and created["last_result"] is None
        results = []
        for chunk in (new[:3], new[3:4], new[4:]):  # one post of 3 rows, then single rows
            response = client.post(f"/v1/sessions/{sid}/observations",
                                   json={"observations": chunk})  # fmt: skip
            assert response.status_code == 200, response.text
            results += response.json()["results"]
        state = client.get(f"/v1/sessions/{sid}").json()
        listed = client.get("/v1/sessions").json()
        assert client.delete(f"/v1/sessions/{sid}").status_code == 204
        gone = client.get(f"/v1/sessions/{sid}")
        post_gone = client.post(f"/v1/sessions/{sid}/observations",
                                json={"observations": new[:1]})  # fmt: skip
    names, tags = metadata["state_names"], metadata["measurement_tags"]
    for result, out in zip(results, expected, strict=True):
        _close([result["state"][n] for n in names], out[0][0])
        _close([result["predicted"][t] for t in tags], out[5][0])
        _close([result["residual"][t] for t in tags], out[6][0])
        _close([result["t2"]], out[8])
        assert result["alarm"] == bool(out[11][0])
        assert result["steps"] == 1 and result["solver_status"] == 0
        top = [c["tag"] for c in result["top_contributions"]]
        by_size = sorted(range(len(tags)), key=lambda k: -float(out[12][0, k]))
        assert top == [tags[k] for k in by_size[: len(top)]]
    assert state["n_updates"] == 5
    assert state["last_result"] == results[-1]
    assert datetime.fromisoformat(state["last_timestamp"]) == datetime.fromisoformat(
        new[-1]["timestamp"])
    _close([state["state"][n] for n in names], expected[-1][0][0])
    _close([state["state_std"][n] for n in names], expected[-1][1][0].diagonal().sqrt())
    assert any(s["session_id"] == sid for s in listed)
    assert gone.status_code == 404 and gone.json()["detail"][0]["loc"] == ["path", "session_id"]
    assert post_gone.status_code == 404


def test_a_gap_is_bridged_by_predicted_rows_with_the_inputs_held(server, twin, metadata, runs):
    rows = runs[3][: PAST + 4]
    past, new = rows[:PAST], [rows[PAST], rows[PAST + 3]]  # two rows missing before the 2nd
    expected = replay(twin, metadata, past, new)
    with server.client() as client:
        sid = _create(client, "LINE-gap", past)["session_id"]
        response = client.post(f"/v1/sessions/{sid}/observations", json={"observations": new})
        n_updates = client.get(f"/v1/sessions/{sid}").json()["n_updates"]
        client.delete(f"/v1/sessions/{sid}")
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["steps"] for r in results] == [1, 3]
    assert n_updates == 4
    _close([results[1]["state"][n] for n in metadata["state_names"]], expected[1][0][0])


def test_a_retried_post_gets_its_first_answer_not_a_409(server, runs):
    # A client whose post timed out after the service applied it retries: it got 409
    # timestamp_not_after_last, and the rows' results (alarms raised and cleared among them)
    # were lost. The same rows again are answered as the first time, and change nothing.
    rows = runs[2][: PAST + 4]
    with server.client() as client:
        sid = _create(client, "LINE-retry", rows[:PAST])["session_id"]
        path = f"/v1/sessions/{sid}/observations"
        first = client.post(path, json={"observations": rows[PAST : PAST + 3]})
        retry = client.post(path, json={"observations": rows[PAST : PAST + 3]})
        n_updates = client.get(f"/v1/sessions/{sid}").json()["n_updates"]
        # only the very last post is replayed: an older one, or rows overlapping it, is 409
        older = client.post(path, json={"observations": rows[PAST : PAST + 2]})
        metrics = client.get("/metrics").text
        nxt = client.post(path, json={"observations": rows[PAST + 3 :]})
        client.delete(f"/v1/sessions/{sid}")
    assert first.status_code == retry.status_code == 200, retry.text
    assert retry.json() == first.json() and retry.headers["x-twin-replayed"] == "1"
    assert "x-twin-replayed" not in first.headers
    assert n_updates == 3
    assert older.status_code == 409
    assert "twin_posts_replayed_total 1.0" in metrics
    assert nxt.status_code == 200 and nxt.json()["n_updates"] == 4


def _at(row: dict, origin: str, seconds: float) -> dict:
    stamp = datetime.fromisoformat(origin) + timedelta(seconds=seconds)
    return {**row, "timestamp": stamp.isoformat()}


def test_rows_land_on_the_sessions_time_grid_so_jitter_does_not_add_up(server, metadata,
                                                                        runs):  # fmt: skip
    rows, dt = runs[0][: PAST + 40], metadata["dt_s"]
    origin = rows[PAST - 1]["timestamp"]
    # a row every 7.4 s with dt_s = 5 s: 1 or 2 grid steps each, 296 s = 59.2 steps in all
    jittered = [_at(row, origin, 7.4 * k) for k, row in enumerate(rows[PAST:], start=1)]
    with server.client() as client:
        sid = _create(client, "LINE-grid", rows[:PAST])["session_id"]
        path = f"/v1/sessions/{sid}/observations"
        response = client.post(path, json={"observations": jittered})
        # the last row (296 s) is on grid point 59 (295 s); one at 297.4 s still is
        same_point = client.post(path, json={"observations": [_at(rows[0], origin, 297.4)]})
        # halves round up: at least dt_s / 2 after the session's point is the next point
        half_past = client.post(path, json={"observations": [_at(rows[1], origin,
                                                                 59 * dt + dt / 2)]})  # fmt: skip
        client.delete(f"/v1/sessions/{sid}")
    assert response.status_code == 200, response.text
    assert response.json()["n_updates"] == 59
    assert [r["steps"] for r in response.json()["results"][:5]] == [1, 2, 1, 2, 1]
    assert same_point.status_code == 409
    error = same_point.json()["detail"][0]
    assert error["type"] == "timestamp_not_after_last"
    assert "grid point 59" in error["msg"] and "dt_s/2 = 2.5 s" in error["msg"], error["msg"]
    assert half_past.status_code == 200, half_past.text
    assert half_past.json()["n_updates"] == 60


def _shifted(row: dict, tag: str, by: float) -> dict:
    return {**row, "measurements": {**row["measurements"], tag: row["measurements"][tag] + by}}


def test_a_fouled_nir_probe_raises_an_alarm_that_names_it_and_counts(server, runs):
    # runs[1] is the val run the detector was fitted on: quiet until the NIR reads 10 %w/w
    # high (its noise is ~0.3 %w/w). 30 rows: the tiny twin's filter first takes part of the
    # shift into the blend's state (its first alarm came on row 5 of them, on row 12 after
    # the blender's discharge law changed).
    rows = runs[1][: PAST + 30]
    fouled = [_shifted(r, "NIR.API_CONC", 10.0) if r["measurements"]["NIR.API_CONC"] else r
              for r in rows[PAST:]]  # fmt: skip
    with server.client() as client:
        before = _alarm_count(client.get("/metrics").text)
        sid = _create(client, "LINE-fouled", rows[:PAST])["session_id"]
        response = client.post(f"/v1/sessions/{sid}/observations",
                                json={"observations": fouled})  # fmt: skip
        metrics = client.get("/metrics").text
        client.delete(f"/v1/sessions/{sid}")
    alarms = [r["alarm"] for r in response.json()["results"]]
    first = response.json()["results"][alarms.index(True)]
    assert first["top_contributions"][0]["tag"] == "NIR.API_CONC"
    assert first["t2"] > first["t2_limit"]
    raised = sum(now and not was for was, now in zip([False, *alarms], alarms, strict=False))
    assert _alarm_count(metrics) == before + raised  # rising edges, not rows in alarm
    route = 'route="/v1/sessions/{session_id}/observations"'
    assert f'twin_http_requests_total{{method="POST",{route},status="200"}}' in metrics
    assert f'twin_http_request_duration_seconds_bucket{{le="0.02",method="POST",{route}}}' \
        in metrics
    assert "twin_update_batch_size_count" in metrics and "twin_sessions_open" in metrics


def _alarm_count(metrics: str) -> float:
    line = next(x for x in metrics.splitlines() if x.startswith("twin_alarms_raised_total "))
    return float(line.split()[1])


def test_openapi_schema_documents_every_route_tag_unit_and_example(server, metadata):
    with server.client() as client:
        schema = client.get("/openapi.json").json()
    with server.client(token=None) as anonymous:
        refused = anonymous.get("/openapi.json").status_code
    assert refused == 401
    assert schema["info"]["title"] == f"{metadata['registered_model']} service"  # the plant's
    paths = schema["paths"]
    assert set(paths) == {
        "/healthz", "/readyz", "/metrics", "/v1/forecast", "/v1/model", "/v1/model/reload",
        "/v1/sessions", "/v1/sessions/{session_id}", "/v1/sessions/{session_id}/observations",
    }  # fmt: skip
    components = schema["components"]["schemas"]
    inputs = components["Inputs"]["properties"]
    assert set(inputs) == set(metadata["input_tags"])
    assert inputs["FEED_API.MASSFLOW_SP"]["description"] == "FEED_API.MASSFLOW_SP [kg/h]"
    assert components["Inputs"]["additionalProperties"] is False
    for name in ("SessionCreate", "ObservationBatch", "ForecastRequest"):
        assert components[name]["examples"], name
    post = paths["/v1/sessions/{session_id}/observations"]["post"]
    assert {"200", "401", "404", "409", "413", "422"} <= set(post["responses"])
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


@pytest.mark.parametrize("name", ["SessionCreate", "ObservationBatch", "ForecastRequest"])
def test_the_schemas_examples_are_accepted(server, name):
    with server.client() as client:
        example = client.get("/openapi.json").json()["components"]["schemas"][name]["examples"][0]
        if name == "SessionCreate":
            response = client.post("/v1/sessions", json={**example, "line_id": "LINE-example"})
            client.delete(f"/v1/sessions/{response.json()['session_id']}")
            assert response.status_code == 201, response.text
        elif name == "ForecastRequest":
            assert client.post("/v1/forecast", json=example).status_code == 200
        else:  # a row after the example session's past window
            past = client.get("/openapi.json").json()["components"]["schemas"]["SessionCreate"]
            created = client.post("/v1/sessions", json={**past["examples"][0],
                                                        "line_id": "LINE-example-2"}).json()
            sid = created["session_id"]
            response = client.post(f"/v1/sessions/{sid}/observations", json=example)
            client.delete(f"/v1/sessions/{sid}")
            assert response.status_code == 200, response.text
