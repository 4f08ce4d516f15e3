"""A session's edges: expiry that no sweep reached yet, idle time after a long post, a DELETE
queued behind another, the model version a session reports across a reload, and the order of
the token and body checks. In process, with the registry's clock under the test's control
(idle_expiry_s 3600: the housekeeping sweep, every 30 s, never runs during a test)."""

import asyncio
from datetime import datetime

from tests.serving.server import in_process
from tests.serving.test_reload import rewrite

PAST = 6
IDLE_S = 3600.0


def _frozen_clock(service) -> list[float]:
    """The registry's clock made a number the test moves; returns the one-element holder."""
    now = [1000.0]
    service.registry.clock = lambda: now[0]
    return now


def _create(client, line: str, runs):
    return client.post("/v1/sessions", json={"line_id": line, "past": runs[0][:PAST]})


def test_a_session_idle_past_its_expiry_is_gone_before_any_sweep(twin_build, runs):
    # get() never looked at the expiry: a post revived a session a sweep would have dropped,
    # and with the pool full its own line's new session was refused 409 line_busy
    async def scenario() -> tuple:
        async with in_process(twin_build.path, sessions={"max_sessions": 1,
                                                         "idle_expiry_s": IDLE_S}) as served:
            client, now = served.client, _frozen_clock(served.service)
            first = (await _create(client, "LINE-a", runs)).json()["session_id"]
            now[0] += IDLE_S + 1
            post = await client.post(f"/v1/sessions/{first}/observations",
                                     json={"observations": runs[0][PAST : PAST + 1]})
            open_after_post = (await client.get("/metrics")).text
            second = await _create(client, "LINE-a", runs)
            now[0] += IDLE_S + 1  # the new one idles out too: the pool (1 slot) is full
            third = await _create(client, "LINE-a", runs)
            metrics = (await client.get("/metrics")).text
            return post.status_code, second.status_code, third.status_code, metrics, \
                open_after_post

    post, second, third, metrics, open_after_post = asyncio.run(scenario())
    assert (post, second, third) == (404, 201, 201)
    assert "twin_sessions_expired_total 2.0" in metrics
    assert "twin_sessions_open 0.0" in open_after_post  # the gauge follows the drop


def test_idle_time_counts_from_the_end_of_a_post(twin_build, runs):
    # last_used was set when a post began: a post that ran past idle_expiry_s left a session
    # the next sweep dropped right after it answered
    async def scenario() -> tuple:
        async with in_process(twin_build.path, sessions={"idle_expiry_s": IDLE_S}) as served:
            client, service = served.client, served.service
            now = _frozen_clock(service)
            session = (await _create(client, "LINE-a", runs)).json()["session_id"]
            step = service.batcher.step

            async def slow_step(*args, **kwargs):
                now[0] += IDLE_S / 2  # each row takes half the expiry time
                return await step(*args, **kwargs)

            service.batcher.step = slow_step
            post = await client.post(f"/v1/sessions/{session}/observations",
                                     json={"observations": runs[0][PAST : PAST + 3]})
            dropped = service.registry.expire()
            read = await client.get(f"/v1/sessions/{session}")
            return post.status_code, dropped, read.status_code

    assert asyncio.run(scenario()) == (200, 0, 200)


def test_a_second_delete_queued_behind_a_post_is_404(twin_build, runs):
    # both DELETEs waited on the session's lock and both answered 204
    async def scenario() -> list[int]:
        async with in_process(twin_build.path) as served:
            client, registry = served.client, served.service.registry
            session_id = (await _create(client, "LINE-a", runs)).json()["session_id"]
            session = registry.get(session_id)
            async with session.lock:  # a post in flight
                deletes = [asyncio.ensure_future(client.delete(f"/v1/sessions/{session_id}"))
                           for _ in range(2)]  # fmt: skip
                await asyncio.sleep(0.2)  # both are waiting on the lock
            return sorted(r.status_code for r in await asyncio.gather(*deletes))

    assert asyncio.run(scenario()) == [204, 404]


def test_a_session_names_the_model_version_that_made_its_state(twin_build, runs, tmp_path):
    # after a reload, GET /v1/sessions/{id} named the new twin while its state and last
    # result were still the old one's
    served_file = tmp_path / "twin.pt"
    rewrite(twin_build.path, served_file)

    async def scenario() -> list[str]:
        async with in_process(served_file) as served:
            client = served.client
            old = (await client.get("/v1/model")).json()["label"]
            created = (await _create(client, "LINE-a", runs)).json()
            session = created["session_id"]
            rewrite(twin_build.path, served_file, registered_version="next")
            reloaded = (await client.post("/v1/model/reload")).json()
            after_reload = (await client.get(f"/v1/sessions/{session}")).json()
            posted = (await client.post(f"/v1/sessions/{session}/observations",
                                        json={"observations": runs[0][PAST : PAST + 1]})).json()
            after_post = (await client.get(f"/v1/sessions/{session}")).json()
            new = reloaded["current"]["label"]
            assert new != old
            return [created["model_version"], after_reload["model_version"],
                    posted["model_version"], after_post["model_version"], old, new]

    created, after_reload, posted, after_post, old, new = asyncio.run(scenario())
    assert [created, after_reload, posted, after_post] == [old, old, new, new]


def test_the_token_is_checked_before_the_body(twin_build):
    # FastAPI validates a body before it runs the token dependency: a malformed body
    # without a token answered 422, where every protected route promises 401 first
    async def scenario() -> list[tuple[int, str]]:
        async with in_process(twin_build.path) as served:
            answers = []
            json = {"Content-Type": "application/json"}
            for token in ({"Authorization": "Bearer wrong"}, {"Authorization": ""}):
                for path in ("/v1/sessions", "/v1/forecast", "/v1/sessions/x/observations"):
                    r = await served.client.post(path, content=b"{", headers={**json, **token})
                    answers.append((r.status_code, r.json()["detail"][0]["type"]))
            with_token = await served.client.post("/v1/sessions", content=b"{", headers=json)
            deep = await served.client.post("/v1/model/reload", content=b"[" * 100_000)
            answers += [(with_token.status_code, with_token.json()["detail"][0]["type"]),
                        (deep.status_code, deep.json()["detail"][0]["type"])]  # fmt: skip
            return answers

    answers = asyncio.run(scenario())
    assert answers[:3] == [(401, "invalid_token")] * 3
    assert answers[3:6] == [(401, "missing_token")] * 3
    # with the token, the body's own fault; a body nested past Python's recursion limit on
    # the reload route was a 500
    assert answers[6:] == [(422, "json_invalid"), (422, "extra_forbidden")]


def test_the_sessions_list_shows_a_post_only_once_it_is_done(twin_build, runs):
    # The list read n_updates and alarm while a post ran: rows that a refusal then undid
    async def scenario() -> tuple:
        import dataclasses

        async with in_process(twin_build.path) as served:
            client, service = served.client, served.service
            session = (await _create(client, "LINE-a", runs)).json()["session_id"]
            rows = runs[0][PAST : PAST + 3]
            done = await client.post(f"/v1/sessions/{session}/observations",
                                     json={"observations": rows[:1]})  # fmt: skip
            step, seen = service.batcher.step, []

            async def step_then_list(*args, **kwargs):
                output = await step(*args, **kwargs)
                seen.append((await client.get("/v1/sessions")).json()[0]["n_updates"])
                return output if len(seen) < 3 else dataclasses.replace(output, ok=False)

            service.batcher.step = step_then_list
            refused = await client.post(f"/v1/sessions/{session}/observations",
                                        json={"observations": runs[0][PAST + 1 : PAST + 4]})
            service.batcher.step = step
            after_refusal = (await client.get("/v1/sessions")).json()[0]["n_updates"]
            accepted = await client.post(f"/v1/sessions/{session}/observations",
                                         json={"observations": runs[0][PAST + 1 : PAST + 3]})
            listed = (await client.get("/v1/sessions")).json()[0]
            return done.status_code, refused.status_code, seen, after_refusal, \
                accepted.status_code, listed, accepted.json()["results"][-1]["timestamp"]

    done, refused, seen, after_refusal, accepted, listed, last = asyncio.run(scenario())
    assert (done, refused, accepted) == (200, 422, 200)
    assert seen == [1, 1, 1] and after_refusal == 1  # the first post's one row, throughout
    assert listed["n_updates"] == 3
    assert datetime.fromisoformat(listed["last_timestamp"]) == datetime.fromisoformat(last)
