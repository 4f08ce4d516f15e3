"""Sessions are bounded: a full registry refuses (429), idle sessions expire and free slots."""

import asyncio
import time

import pytest

from tests.serving.server import in_process, start_server, stop_server

PAST = 6


@pytest.fixture(scope="module")
def small_server(twin_build, tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("limits"), f"model_uri={twin_build.path}",
                          "sessions.max_sessions=2", "sessions.idle_expiry_s=2")  # fmt: skip
    yield server
    stop_server(server)


def _create(client, line: str, runs) -> object:
    return client.post("/v1/sessions", json={"line_id": line, "past": runs[0][:PAST]})


def test_a_full_registry_refuses_then_idle_sessions_expire(small_server, runs):
    with small_server.client() as client:
        first, second = _create(client, "L1", runs), _create(client, "L2", runs)
        assert first.status_code == second.status_code == 201
        third = _create(client, "L3", runs)
        assert third.status_code == 429
        assert third.json()["detail"][0]["type"] == "too_many_sessions"
        assert client.delete(f"/v1/sessions/{first.json()['session_id']}").status_code == 204
        assert _create(client, "L3", runs).status_code == 201  # the freed slot
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # idle 2 s, swept every 0.5 s
            time.sleep(0.5)
            if not client.get("/v1/sessions").json():
                break
        gone = client.get(f"/v1/sessions/{second.json()['session_id']}")
        metrics = client.get("/metrics").text
        assert _create(client, "L4", runs).status_code == 201
    assert gone.status_code == 404
    assert "twin_sessions_expired_total 2.0" in metrics
    # the log says so too: an operator reading it learns which lines lost their session
    log = small_server.log.read_text()
    assert "idle for over 2 s, of lines L2, L3" in log or (
        "session of line L2, idle" in log and "session of line L3, idle" in log), log[-3000:]


def test_a_create_that_loses_the_last_slot_to_a_concurrent_one_is_429(twin_build, runs):
    async def scenario() -> list:
        async with in_process(twin_build.path, sessions={"max_sessions": 1}) as served:
            batcher = served.service.batcher
            run_torch, arrived, both_checked = batcher.run_torch, [], asyncio.Event()

            async def after_both_checked(fn, twin, *args):
                # each create found the slot free; the state of either takes it first
                arrived.append(fn)
                if len(arrived) == 2:
                    both_checked.set()
                await both_checked.wait()
                return await run_torch(fn, twin, *args)

            batcher.run_torch = after_both_checked
            return await asyncio.gather(*(
                served.client.post("/v1/sessions", json={"line_id": line,
                                                         "past": runs[0][:PAST]})
                for line in ("LINE-a", "LINE-b")))  # fmt: skip

    answers = asyncio.run(scenario())
    assert sorted(a.status_code for a in answers) == [201, 429], [a.text for a in answers]
    (refused,) = [a.json()["detail"][0] for a in answers if a.status_code == 429]
    assert refused["loc"] == ["body"] and refused["type"] == "too_many_sessions"
