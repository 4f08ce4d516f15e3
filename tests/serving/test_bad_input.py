"""Each class of bad input gets a 4xx whose body names the field, never a 5xx."""

import asyncio
import dataclasses
import json
import math
from datetime import UTC, datetime, timedelta

import pytest
import torch

from tests.serving.reference import replay
from tests.serving.server import TOKEN, in_process

PAST = 6


@pytest.fixture(scope="module")
def session(server, runs):
    """An open session on runs[1] (its past window), and the rows that follow it."""
    rows = runs[1][: PAST + 20]
    with server.client() as client:
        created = client.post("/v1/sessions", json={"line_id": "LINE-bad", "past": rows[:PAST]})
        assert created.status_code == 201, created.text
        yield created.json()["session_id"], rows[PAST:]
        client.delete(f"/v1/sessions/{created.json()['session_id']}")


def _post(server, path: str, body, raw: bool = False):
    with server.client() as client:
        if raw:
            return client.post(path, content=body, headers={"content-type": "application/json"})
        return client.post(path, json=body)


def _loc(response) -> list:
    return response.json()["detail"][0]["loc"]


def _shifted(row: dict, seconds: float) -> dict:
    stamp = datetime.fromisoformat(row["timestamp"]) + timedelta(seconds=seconds)
    return {**row, "timestamp": stamp.isoformat()}


def _with(row: dict, part: str, tag: str, value) -> dict:
    return {**row, part: {**row[part], tag: value}}


def test_bad_observation_rows_name_the_field(server, session):
    sid, rows = session
    path = f"/v1/sessions/{sid}/observations"
    row = rows[0]
    no_input = {**row, "inputs": {k: v for k, v in row["inputs"].items()
                                  if k != "BLEND.SPEED_SP"}}  # fmt: skip
    cases = [  # (body, status, loc, type)
        ({"observations": []}, 422, ["body", "observations"], "too_short"),
        ({"observations": row}, 422, ["body", "observations"], "list_type"),
        ({"observations": [no_input]}, 422,
         ["body", "observations", 0, "inputs", "BLEND.SPEED_SP"], "missing"),
        ({"observations": [_with(row, "inputs", "NO.SUCH_TAG", 1.0)]}, 422,
         ["body", "observations", 0, "inputs", "NO.SUCH_TAG"], "extra_forbidden"),
        ({"observations": [_with(row, "measurements", "NIR.API_CONCX", 1.0)]}, 422,
         ["body", "observations", 0, "measurements", "NIR.API_CONCX"], "extra_forbidden"),
        ({"observations": [_with(row, "inputs", "BLEND.SPEED_SP", "fast")]}, 422,
         ["body", "observations", 0, "inputs", "BLEND.SPEED_SP"], "float_type"),
        # a number in a string, or a boolean, is no value (false was taken as a 0.0 reading)
        ({"observations": [_with(row, "inputs", "BLEND.SPEED_SP", "511.7")]}, 422,
         ["body", "observations", 0, "inputs", "BLEND.SPEED_SP"], "float_type"),
        ({"observations": [_with(row, "measurements", "NIR.API_CONC", False)]}, 422,
         ["body", "observations", 0, "measurements", "NIR.API_CONC"], "float_type"),
        ({"observations": [_with(row, "inputs", "BLEND.SPEED_SP", 1e9)]}, 422,
         ["body", "observations", 0, "inputs", "BLEND.SPEED_SP"], "less_than_equal"),
        ({"observations": [{**row, "timestamp": "2025-03-01T06:00:00"}]}, 422,
         ["body", "observations", 0, "timestamp"], "timezone_aware"),
        ({"observations": [row, row]}, 422,
         ["body", "observations", 1, "timestamp"], "timestamp_out_of_order"),
        ({"observations": [_shifted(row, -60.0)]}, 409,
         ["body", "observations", 0, "timestamp"], "timestamp_not_after_last"),
        ({"observations": [_shifted(row, 3600.0)]}, 422,
         ["body", "observations", 0, "timestamp"], "gap_too_long"),
        ({"observations": [row] * 121}, 422, ["body", "observations"], "too_long"),
    ]
    for body, status, loc, kind in cases:
        response = _post(server, path, body)
        assert response.status_code == status, (loc, response.text)
        assert _loc(response) == loc and response.json()["detail"][0]["type"] == kind, \
            response.text
    # nothing of the above was applied: the next row in order is still accepted as row 1
    response = _post(server, path, {"observations": [row]})
    assert response.status_code == 200 and response.json()["n_updates"] == 1


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_nan_and_inf_are_refused_naming_the_tag(server, session, literal):
    sid, rows = session
    body = json.dumps({"observations": [_with(rows[5], "measurements", "NIR.API_CONC", 0.5)]})
    body = body.replace('"NIR.API_CONC": 0.5', f'"NIR.API_CONC": {literal}')
    response = _post(server, f"/v1/sessions/{sid}/observations", body, raw=True)
    assert response.status_code == 422, response.text
    assert _loc(response) == ["body", "observations", 0, "measurements", "NIR.API_CONC"]
    assert response.json()["detail"][0]["type"] == "finite_number"


def test_malformed_json_and_wrong_content_are_422(server, session):
    sid, _ = session
    path = f"/v1/sessions/{sid}/observations"
    broken = _post(server, path, b'{"observations": [1,,]}', raw=True)
    assert broken.status_code == 422 and broken.json()["detail"][0]["type"] == "json_invalid"
    # The offset is said in the message, not passed off as a field name in `loc`.
    assert _loc(broken) == ["body"]
    assert broken.json()["detail"][0]["msg"] == (
        "malformed JSON at character 20: Expecting value")
    with server.client() as client:
        text = client.post(path, content=b"hello", headers={"content-type": "text/plain"})
    assert text.status_code == 422 and _loc(text)[0] == "body"


def test_an_oversize_body_is_413_before_it_is_parsed(server, session):
    sid, rows = session
    body = {"observations": rows[:1], "padding": "x" * 300_000}  # limit 200 000 bytes here
    response = _post(server, f"/v1/sessions/{sid}/observations", body)
    assert response.status_code == 413
    assert _loc(response) == ["body"] and "max_body_bytes" in response.json()["detail"][0]["msg"]


def test_a_refused_upload_is_counted_under_the_route_it_was_for(server, session):
    sid, rows = session
    body = {"observations": rows[:1], "padding": "x" * 300_000}
    assert _post(server, f"/v1/sessions/{sid}/observations", body).status_code == 413
    with server.client() as client:
        metrics = client.get("/metrics").text
    refused = [x for x in metrics.splitlines() if x.startswith("twin_http_requests_total")
               and 'status="413"' in x]  # fmt: skip
    assert refused and all('route="/v1/sessions/{session_id}/observations"' in x
                           for x in refused), refused  # fmt: skip


def test_a_client_gone_during_the_upload_counts_as_499_not_500(twin_build):
    upload = iter([{"type": "http.request", "body": b'{"line_id": "LINE-', "more_body": True},
                   {"type": "http.disconnect"}])  # fmt: skip
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/sessions",
             "raw_path": b"/v1/sessions", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"in-process"), (b"content-type", b"application/json"),
                         (b"authorization", f"Bearer {TOKEN}".encode())],
             "server": ("in-process", 80), "client": ("127.0.0.1", 50000)}  # fmt: skip

    async def scenario() -> tuple[list, str]:
        async with in_process(twin_build.path) as served:
            answered = []

            async def receive() -> dict:
                return next(upload)

            async def send(message: dict) -> None:
                answered.append(message)

            await served.app(scope, receive, send)
            return answered, (await served.client.get("/metrics")).text

    answered, metrics = asyncio.run(scenario())
    assert answered == []  # nobody to answer
    counted = [x for x in metrics.splitlines()
               if x.startswith('twin_http_requests_total{method="POST"')]  # fmt: skip
    assert counted == [
        'twin_http_requests_total{method="POST",route="/v1/sessions",status="499"} 1.0'
    ], counted


def _upload_scope(headers: list[tuple[bytes, bytes]]) -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": "/v1/sessions",
            "raw_path": b"/v1/sessions", "query_string": b"", "root_path": "",
            "headers": [(b"host", b"in-process"), (b"content-type", b"application/json"),
                        *headers],
            "server": ("in-process", 80), "client": ("127.0.0.1", 50000)}  # fmt: skip


async def _answer(app, scope: dict, receive) -> list[dict]:
    answered = []

    async def send(message: dict) -> None:
        answered.append(message)

    await app(scope, receive, send)
    return answered


def test_a_body_without_a_token_is_answered_401_without_being_read(twin_build):
    # A client without a token could hold max_body_bytes of memory and a connection per
    # request for as long as it liked: 64 such uploads held +65 MiB for minutes
    reads = []

    async def receive() -> dict:
        reads.append(1)
        return {"type": "http.request", "body": b'{"line_id": ', "more_body": True}

    async def scenario() -> list[dict]:
        async with in_process(twin_build.path) as served:
            return await _answer(served.app, _upload_scope([]), receive)

    answered = asyncio.run(scenario())
    assert answered[0]["status"] == 401 and reads == []


def test_a_body_still_arriving_after_the_timeout_is_408(twin_build):
    async def receive() -> dict:
        if not started.is_set():
            started.set()
            return {"type": "http.request", "body": b'{"line_id": ', "more_body": True}
        await asyncio.sleep(3600)  # the rest never comes

    async def scenario() -> list[dict]:
        async with in_process(twin_build.path, limits={"body_timeout_s": 0.5}) as served:
            scope = _upload_scope([(b"authorization", f"Bearer {TOKEN}".encode())])
            return await asyncio.wait_for(_answer(served.app, scope, receive), 30)

    started = asyncio.Event()
    answered = asyncio.run(scenario())
    assert answered[0]["status"] == 408
    detail = json.loads(answered[1]["body"])["detail"][0]
    assert detail["type"] == "body_timeout" and "limits.body_timeout_s = 0.5 s" in detail["msg"]


def test_a_timestamp_outside_a_plants_years_is_422_not_500(server, session):
    # near 9999-12-31 the grid arithmetic (origin + k dt) overflowed: a 500
    sid, rows = session
    far = {**rows[0], "timestamp": "9999-12-31T23:59:59.999999+00:00"}
    response = _post(server, f"/v1/sessions/{sid}/observations", {"observations": [far]})
    assert response.status_code == 422, response.text
    assert _loc(response) == ["body", "observations", 0, "timestamp"]
    assert "years 1900-2999" in response.json()["detail"][0]["msg"]


def test_a_past_window_dated_ahead_of_the_clock_is_refused(server, session):
    # a past window dated in 2999 (a typo of the year) opened a session that refused every
    # later post (409): each real row was before its last timestamp
    _, rows = session
    ahead = datetime.now(UTC) + timedelta(days=2)
    past = [{**row, "timestamp": (ahead + timedelta(seconds=5 * k)).isoformat()}
            for k, row in enumerate(rows[:6])]  # fmt: skip
    with server.client() as client:
        response = client.post("/v1/sessions", json={"line_id": "LINE-ahead", "past": past})
    assert response.status_code == 422, response.text
    assert _loc(response) == ["body", "past", 0, "timestamp"]
    assert "at most a day after the service's clock" in response.json()["detail"][0]["msg"]


class DivergingTwin:
    """The served twin, except that its update number `at` (counting from 0) returns a
    non-finite state. Since the line's residence-time floor the test twin no longer diverges
    with any one input or measurement, or all inputs, at +-1e6 (limits.max_abs_value), so a
    post that blows up midway is staged at the twin's edge."""

    def __init__(self, module, at: int) -> None:
        self.module, self.at, self.calls = module, at, 0

    def __getattr__(self, name: str):
        return getattr(self.module, name)

    def update(self, x, *args):
        out = self.module.update(x, *args)
        self.calls += 1
        if self.calls - 1 == self.at:
            out = (out[0] * math.nan, *out[1:])
        return out


def test_a_post_refused_midway_leaves_the_session_as_it_was(twin_build, twin, metadata, runs):
    rows = runs[0][: PAST + 8]
    good, later = rows[PAST], rows[PAST + 1 :]

    async def scenario():
        async with in_process(twin_build.path) as served:
            client, store = served.client, served.service.store
            created = await client.post("/v1/sessions", json={"line_id": "LINE-undo",
                                                             "past": rows[:PAST]})  # fmt: skip
            path = f"/v1/sessions/{created.json()['session_id']}"
            assert (await client.post(f"{path}/observations",
                                      json={"observations": [good]})).status_code == 200
            before = (await client.get(path)).json()
            served_twin = store.current
            store.current = dataclasses.replace(served_twin,
                                                module=DivergingTwin(served_twin.module, at=3))
            refused = await client.post(f"{path}/observations", json={"observations": later})
            store.current = served_twin
            after = (await client.get(path)).json()
            retry = await client.post(f"{path}/observations", json={"observations": later[:2]})
            return before, refused, after, retry

    before, refused, after, retry = asyncio.run(scenario())
    assert refused.status_code == 422, refused.text
    error = refused.json()["detail"][0]
    assert error["type"] == "state_not_finite"
    assert error["loc"] == ["body", "observations", 3], "rows 0-2 ran first: the case under test"
    assert "nothing of this post was applied" in error["msg"]
    assert after == before  # steps, last timestamp, state and its spread, alarm, last result
    assert retry.status_code == 200, retry.text
    assert retry.json()["n_updates"] == 3
    # the filter state (held inputs, EWMA, run length too) is the one from before the post
    (*_, last), result = replay(twin, metadata, rows[:PAST], [good, *later[:2]]), retry.json()
    got = result["results"][-1]
    for values, want in ((got["state"], last[0][0]), (got["ewma_stat"], last[10][0])):
        torch.testing.assert_close(torch.tensor(list(values.values()), dtype=torch.float64),
                                   want, rtol=1e-9, atol=1e-9)  # fmt: skip


def test_an_oversize_chunked_body_without_length_is_413(server, session):
    sid, _ = session

    def chunks():
        for _ in range(30):
            yield b" " * 10_000

    with server.client() as client:
        response = client.post(f"/v1/sessions/{sid}/observations", content=chunks(),
                               headers={"content-type": "application/json"})  # fmt: skip
    assert response.status_code == 413


def test_bad_session_creation_names_the_field(server, runs):
    past = runs[2][:PAST]
    gapped = [past[0], *past[2:]]
    # 7.4 s apart at dt_s 5 s: each row one step after the one before, rounded, but 37 s of
    # plant time would run as 25 s; row 2 (14.8 s) is on grid point 3 from row 0
    stretched = [_shifted(row, 2.4 * i) for i, row in enumerate(past)]
    cases = [
        ({"line_id": "LINE-1", "past": past[:1]}, 422, ["body", "past"]),
        ({"line_id": "line with spaces", "past": past}, 422, ["body", "line_id"]),
        ({"line_id": "LINE-1", "past": gapped}, 422, ["body", "past", 1, "timestamp"]),
        ({"line_id": "LINE-1", "past": stretched}, 422, ["body", "past", 2, "timestamp"]),
        ({"line_id": "LINE-1", "past": past, "extra": 1}, 422, ["body", "extra"]),
        ({"past": past}, 422, ["body", "line_id"]),
    ]
    for body, status, loc in cases:
        response = _post(server, "/v1/sessions", body)
        assert response.status_code == status, response.text
        assert _loc(response) == loc, response.text


def test_a_second_session_for_a_line_is_409(server, runs, session):
    response = _post(server, "/v1/sessions", {"line_id": "LINE-bad", "past": runs[2][:PAST]})
    assert response.status_code == 409
    assert _loc(response) == ["body", "line_id"]


def test_unknown_sessions_are_404_naming_the_path(server, runs):
    with server.client() as client:
        for response in (client.get("/v1/sessions/0123"), client.delete("/v1/sessions/0123"),
                         client.post("/v1/sessions/0123/observations",
                                     json={"observations": runs[0][:1]})):  # fmt: skip
            assert response.status_code == 404
            assert _loc(response) == ["path", "session_id"]


def test_forecast_lines_of_unequal_length_are_422_naming_the_line(server, runs):
    def line(past: int, future: int) -> dict:
        rows = runs[0][: past + future]
        return {"past": [{"inputs": r["inputs"], "measurements": r["measurements"]}
                         for r in rows[:past]],
                "future_inputs": [r["inputs"] for r in rows[past:]]}  # fmt: skip

    response = _post(server, "/v1/forecast", {"lines": [line(6, 4), line(6, 5)]})
    assert response.status_code == 422 and _loc(response) == ["body", "lines", 1,
                                                              "future_inputs"]  # fmt: skip
    response = _post(server, "/v1/forecast", {"lines": [line(6, 4), line(5, 4)]})
    assert _loc(response) == ["body", "lines", 1, "past"]
    too_long = {**line(6, 1), "future_inputs": [runs[0][0]["inputs"]] * 721}
    response = _post(server, "/v1/forecast", {"lines": [too_long]})
    assert response.status_code == 422 and _loc(response) == ["body", "lines", 0,
                                                              "future_inputs"]  # fmt: skip
    response = _post(server, "/v1/forecast", {"lines": []})
    assert response.status_code == 422 and _loc(response) == ["body", "lines"]
