"""Many clients at once: sessions stay apart, and posts to one session stay in order.

Rows of concurrent sessions run through the twin as one batched update (serving/batcher.py);
each session's answers must still be those of its own rows alone, as the twin file gives them
for that line by itself.
"""

from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import torch

from tests.serving.reference import replay

PAST, ROWS, SESSIONS = 6, 6, 16
CLOSE = {"rtol": 1e-9, "atol": 1e-9}  # batched vs single-line float64: rounding at most


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_concurrent_sessions_each_get_their_own_lines_answers(server, twin, metadata, runs):
    lines = [runs[j % len(runs)][30 * (j // len(runs)):][: PAST + ROWS] for j in range(SESSIONS)]

    def drive(j: int) -> tuple[str, list[dict]]:
        with server.client() as client:
            created = client.post("/v1/sessions", json={"line_id": f"LINE-c{j}",
                                                        "past": lines[j][:PAST]})  # fmt: skip
            assert created.status_code == 201, created.text
            sid, results = created.json()["session_id"], []
            for row in lines[j][PAST:]:
                response = client.post(f"/v1/sessions/{sid}/observations",
                                       json={"observations": [row]})  # fmt: skip
                assert response.status_code == 200, response.text
                results += response.json()["results"]
            state = client.get(f"/v1/sessions/{sid}").json()
            client.delete(f"/v1/sessions/{sid}")
            return state, results

    with server.client() as client:
        before = client.get("/metrics").text
    with ThreadPoolExecutor(SESSIONS) as pool:
        answers = list(pool.map(drive, range(SESSIONS)))
    with server.client() as client:
        after = client.get("/metrics").text
    names = metadata["state_names"]
    for j, (state, results) in enumerate(answers):
        expected = replay(twin, metadata, lines[j][:PAST], lines[j][PAST:])
        got = torch.tensor([[r["state"][n] for n in names] for r in results], dtype=torch.float64)
        torch.testing.assert_close(got, torch.cat([o[0] for o in expected]), **CLOSE)
        assert state["n_updates"] == ROWS and state["line_id"] == f"LINE-c{j}"
    batches = _metric(after, "twin_update_batch_size_count") - _metric(
        before, "twin_update_batch_size_count")
    rows = _metric(after, "twin_update_batch_size_sum") - _metric(
        before, "twin_update_batch_size_sum")
    assert rows == SESSIONS * ROWS
    assert batches < rows  # some rows of different sessions shared an update call


def test_concurrent_posts_to_one_session_apply_in_time_order_or_are_refused(
    server, twin, metadata, runs
):
    rows = runs[1][: PAST + 12]
    with server.client() as client:
        sid = client.post("/v1/sessions", json={"line_id": "LINE-race",
                                                "past": rows[:PAST]}).json()["session_id"]

    def post(row: dict):
        with server.client() as client:
            return client.post(f"/v1/sessions/{sid}/observations", json={"observations": [row]})

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(post, rows[PAST:]))
    with server.client() as client:
        state = client.get(f"/v1/sessions/{sid}").json()
        client.delete(f"/v1/sessions/{sid}")
    accepted = [row for row, r in zip(rows[PAST:], responses, strict=True)
                if r.status_code == 200]  # fmt: skip
    refused = [r for r in responses if r.status_code != 200]
    assert accepted, "at least the first row to arrive is applied"
    assert all(r.status_code == 409 and r.json()["detail"][0]["type"] ==
               "timestamp_not_after_last" for r in refused)  # fmt: skip
    # applied in time order: each accepted response's step count bridges from the previous
    last = datetime.fromisoformat(state["last_timestamp"])
    assert last == max(datetime.fromisoformat(r["timestamp"]) for r in accepted)
    steps = round((last - datetime.fromisoformat(rows[PAST - 1]["timestamp"])).total_seconds()
                  / metadata["dt_s"])  # fmt: skip
    assert state["n_updates"] == steps
    # each accepted row came after the last applied one, so time order = the order applied
    applied = sorted(accepted, key=lambda r: datetime.fromisoformat(r["timestamp"]))
    expected = replay(twin, metadata, rows[:PAST], applied)
    torch.testing.assert_close(
        torch.tensor([state["state"][n] for n in metadata["state_names"]], dtype=torch.float64),
        expected[-1][0][0], **CLOSE)
