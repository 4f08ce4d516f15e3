"""Bearer tokens on everything but health, and the refusal to start unprotected."""

import pytest

from tests.serving.server import run_serve, start_server, stop_server

PROTECTED = [("GET", "/v1/model"), ("POST", "/v1/forecast"), ("POST", "/v1/sessions"),
             ("GET", "/v1/sessions/abc"), ("POST", "/v1/sessions/abc/observations"),
             ("DELETE", "/v1/sessions/abc"), ("POST", "/v1/model/reload"), ("GET", "/metrics"),
             ("GET", "/openapi.json")]  # fmt: skip


@pytest.mark.parametrize(("header", "kind"), [
    (None, "missing_token"),
    ("Bearer wrong-token", "invalid_token"),
    ("Basic dGVzdDp0ZXN0", "missing_token"),
    ("Bearer", "missing_token"),
])  # fmt: skip
def test_every_protected_route_refuses_without_the_token(server, header, kind):
    headers = {"Authorization": header} if header else {}
    with server.client(token=None) as client:
        for method, path in PROTECTED:
            response = client.request(method, path, headers=headers, json={})
            assert response.status_code == 401, (method, path, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["detail"][0] == {
                "loc": ["header", "Authorization"], "type": kind,
                "msg": response.json()["detail"][0]["msg"]}


def test_the_token_is_checked_before_the_body(server):
    with server.client(token="wrong") as client:
        response = client.post("/v1/sessions", content=b"not json")
    assert response.status_code == 401


def _refusal(folder, *overrides) -> str:
    process = run_serve(folder, "model_uri=does/not/matter.pt", "port=1", *overrides, token=None)
    assert process.wait(120) != 0
    return (folder / "serve.log").read_text()


def test_without_a_token_it_refuses_to_start(tmp_path):
    log = _refusal(tmp_path)
    assert "no bearer token configured" in log and "TWIN_SERVE_TOKENS" in log


def test_insecure_is_refused_off_loopback(tmp_path):
    log = _refusal(tmp_path, "insecure=true", "host=0.0.0.0")
    assert "insecure=true is refused on host '0.0.0.0'" in log


def test_a_token_a_client_cannot_send_and_a_misspelt_log_level_are_refused_by_name():
    from serving.settings import SettingsError, load_settings

    base = {"model_uri": "twin.pt"}
    # HTTP headers are latin-1: a UTF-8 client's bytes of this token never matched
    with pytest.raises(SettingsError, match=r"tokens: a token of other than ASCII"):
        load_settings(base, {"TWIN_SERVE_TOKENS": "pässwörd-0123456789"})
    # uvicorn raised KeyError: 'verbose' after the twin had loaded
    with pytest.raises(SettingsError, match=r"log_level: Input should be 'critical'"):
        load_settings({**base, "log_level": "verbose"}, {"TWIN_SERVE_TOKENS": "abc"})


def test_insecure_on_loopback_serves_without_a_token(twin_build, runs, tmp_path):
    server = start_server(tmp_path, f"model_uri={twin_build.path}", "insecure=true",
                          "log_level=warning", token=None)  # fmt: skip
    try:
        with server.client(token=None) as client:
            assert client.get("/v1/model").status_code == 200
            past = {"line_id": "LINE-1", "past": runs[0][:6]}
            assert client.post("/v1/sessions", json=past).status_code == 201
    finally:
        # uvicorn shuts down gracefully on SIGTERM, then re-raises it: exit code -15
        assert stop_server(server) in (0, -15)
    log = server.log.read_text()
    # the lifespan's shutdown ran, and said what a restart loses
    assert "stopping with 1 open session(s), of lines LINE-1: they are lost" in log, log
    # log_level=warning holds for the service's own lines too (Hydra had set INFO before)
    assert "serving twin" not in log and "[INFO]" not in log, log


def test_log_level_trace_reaches_the_model_load(tmp_path):
    # "trace" (uvicorn's level 5) stopped the start with ValueError: Unknown level: 'TRACE'
    log = _refusal(tmp_path, "insecure=true", "host=127.0.0.1", "log_level=trace")
    assert "Unknown level" not in log and "does/not/matter.pt" in log, log[-2000:]
    assert "twin serve: error: " in log and "Traceback" not in log, log[-2000:]
