"""Issue 22's findings against `tuneforge serve`, one test each: a bad request fails alone (also
inside a micro-batch), malformed bodies are 4xx that say what to send and are counted, a key
source without keys is an error, `Bearer` is case-insensitive, /metrics is labelled by route,
and /docs needs no CDN."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from helpers import text_recipe, write_text_csv
from tuneforge import TuneforgeError, finetune, load
from tuneforge.cli import main
from tuneforge.deploy import predictor as predictor_module
from tuneforge.deploy.serve import ServeConfig, create_app, load_api_keys

GOOD = ["good fun film", "bad", "a dull and bad and boring long film", "good good good", "film", "bad acting"]
POISON = "awful"  # in the tiny vocabulary: a model wrapper below raises on its token id


@pytest.fixture(scope="module")
def text_run(tiny_bert_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_hostile")
    train = write_text_csv(tmp / "train.csv", n=32)
    return finetune(text_recipe(tiny_bert_dir, train, tmp / "run", train={"epochs": 1})).path


@pytest.fixture
def poisoned_model(monkeypatch):
    """The served model raises whenever a batch holds the token of POISON (a model failure that
    no request validation can see): the failure belongs to that request alone."""
    real = predictor_module.load_model_dir

    class Poisoned(torch.nn.Module):
        def __init__(self, model, token):
            super().__init__()
            self.inner, self.token = model, token

        def forward(self, input_ids, **kw):
            if bool((input_ids == self.token).any()):
                raise RuntimeError("the model failed on this row")
            return self.inner(input_ids=input_ids, **kw)

    def load_poisoned(path):
        model, task, labels, meta = real(path)
        return Poisoned(model, task.tokenizer.convert_tokens_to_ids(POISON)), task, labels, meta

    monkeypatch.setattr(predictor_module, "load_model_dir", load_poisoned)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _real_server(app):
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _post_all(base: str, bodies: list[bytes]) -> list[httpx.Response]:
    """Every body at once, each on its own connection (a failing request may close its own)."""
    def post(body):
        return httpx.post(f"{base}/v1/predict", content=body, headers={"content-type": "application/json"},
                          timeout=60)
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(post, bodies))


def _series(metrics: str, name: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
            if line.startswith(name)}


def _batched(base: str) -> bool:
    """Whether some model call took more than one request's input (every request has one)."""
    metrics = httpx.get(f"{base}/metrics").text
    calls = sum(_series(metrics, "tuneforge_batch_size_count").values())
    alone = sum(_series(metrics, 'tuneforge_batch_size_bucket{le="1.0"}').values())
    return alone < calls


def test_one_bad_request_does_not_fail_its_micro_batch(text_run):
    # the issue: 140 good requests batched with one lone surrogate all got 500
    cfg = ServeConfig(max_batch_size=64, max_wait_ms=300)  # a long window: all of them share batches
    good = [json.dumps({"inputs": [GOOD[i % len(GOOD)]]}).encode() for i in range(24)]
    bad = b'{"inputs": ["good \\ud800 film"]}'
    with _real_server(create_app(text_run, cfg)) as base:
        replies = _post_all(base, good[:12] + [bad] + good[12:])
        assert _batched(base)
    bad_reply = replies.pop(12)
    assert [r.status_code for r in replies] == [200] * len(good)
    assert bad_reply.status_code == 422 and "lone UTF-16 surrogate" in bad_reply.json()["detail"]
    single = load(text_run)
    for body, reply in zip(good, replies):
        expected = single.predict(json.loads(body)["inputs"])[0]
        assert reply.json()["predictions"][0]["label"] == expected["label"]


def test_a_failing_batch_is_answered_member_by_member(text_run, poisoned_model):
    cfg = ServeConfig(max_batch_size=64, max_wait_ms=300)
    good = [json.dumps({"inputs": [GOOD[i % len(GOOD)]]}).encode() for i in range(16)]
    with _real_server(create_app(text_run, cfg)) as base:
        replies = _post_all(base, good[:8] + [json.dumps({"inputs": [f"an {POISON} film"]}).encode()] + good[8:])
        assert _batched(base)
        metrics = httpx.get(f"{base}/metrics").text
    failed = replies.pop(8)
    assert failed.status_code == 500 and "server log" in failed.json()["detail"]
    assert [r.status_code for r in replies] == [200] * 16
    assert 'tuneforge_requests_total{endpoint="/v1/predict",status="500"} 1.0' in metrics
    assert 'tuneforge_errors_total{reason="internal"} 1.0' in metrics


@pytest.mark.parametrize("body,status,words", [
    (b'{"inputs": ["good"], "adapter": []}', 422, "'adapter' must be a string"),
    (b'{"inputs": ["good"], "adapter": {}}', 422, "'adapter' must be a string"),
    (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "nests too deeply"),
    (b'{"inputs": ["\\ud800"]}', 422, "inputs[0] holds a lone UTF-16 surrogate"),
    (b'{"inputs": ["fine", "a \\udfff b"]}', 422, "inputs[1] holds a lone UTF-16 surrogate"),
    (b'{"inputs": ["good"], "\\ud800": 1}', 422, "unknown field"),
])
def test_malformed_requests_are_counted_4xx(text_run, body, status, words):
    with TestClient(create_app(text_run), raise_server_exceptions=False) as client:
        r = client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
        assert r.status_code == status and words in r.json()["detail"]
        metrics = client.get("/metrics").text
    assert f'tuneforge_requests_total{{endpoint="/v1/predict",status="{status}"}} 1.0' in metrics


def test_a_server_error_is_counted_and_says_where_to_look(text_run, poisoned_model):
    with TestClient(create_app(text_run)) as client:  # raise_server_exceptions on: nothing may escape
        r = client.post("/v1/predict", json={"inputs": [POISON]})
        assert r.status_code == 500 and "RuntimeError" in r.json()["detail"]
        assert client.post("/v1/predict", json={"inputs": ["good"]}).status_code == 200
        metrics = client.get("/metrics").text
    assert 'tuneforge_requests_total{endpoint="/v1/predict",status="500"} 1.0' in metrics
    assert 'tuneforge_errors_total{reason="internal"} 1.0' in metrics


@pytest.mark.parametrize("content", ["# keys go here\n\n", "# keys go here\n   # an indented comment\n", ""])
def test_a_key_file_without_keys_is_an_error(tmp_path, content):
    f = tmp_path / "keys.txt"
    f.write_text(content)
    with pytest.raises(TuneforgeError, match="holds no keys"):
        load_api_keys(file=str(f))
    f.write_text("# a comment\n  s3cret  \n\n   # indented comment\nother\n")
    assert load_api_keys(file=str(f)) == ["s3cret", "other"]


def test_serve_command_key_errors_and_startup_lines(text_run, tmp_path, monkeypatch, capsys):
    import uvicorn

    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append(kw))
    monkeypatch.delenv("TUNEFORGE_API_KEYS", raising=False)
    empty = tmp_path / "keys.txt"
    empty.write_text("# only a comment\n")
    assert main(["serve", str(text_run), "--api-key-file", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "holds no keys" in err and "Traceback" not in err
    assert main(["serve", str(text_run), "--api-key-file", str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    assert not started  # neither started a server

    assert main(["serve", str(text_run)]) == 0
    assert "authentication: off" in capsys.readouterr().err
    monkeypatch.setenv("TUNEFORGE_API_KEYS", "k1")
    assert main(["serve", str(text_run)]) == 0
    err = capsys.readouterr().err
    assert "authentication: on (1 API key" in err and "/openapi.json" in err
    monkeypatch.setenv("TUNEFORGE_API_KEYS", " , ")
    assert main(["serve", str(text_run)]) == 2
    assert "holds no key" in capsys.readouterr().err
    assert len(started) == 2


def test_bearer_scheme_in_any_case_and_a_bare_key_refused(text_run):
    with TestClient(create_app(text_run, ServeConfig(api_keys=["s3cret"]))) as client:
        for header in ("Bearer s3cret", "bearer s3cret", "BEARER  s3cret"):
            assert client.get("/v1/model", headers={"Authorization": header}).status_code == 200, header
        r = client.get("/v1/model", headers={"Authorization": "s3cret"})  # the key without its scheme
        assert r.status_code == 401 and "Bearer scheme" in r.json()["detail"]
        assert r.headers["www-authenticate"] == "Bearer"
        assert client.get("/v1/model", headers={"Authorization": "Basic s3cret"}).status_code == 401
        assert client.get("/v1/model", headers={"X-API-Key": "s3cret"}).status_code == 200


def test_metrics_are_labelled_by_route_not_by_path(text_run):
    # the issue: 2,000 random paths grew /metrics from 12 KB to 3.6 MB, unauthenticated ones too
    with TestClient(create_app(text_run, ServeConfig(api_keys=["k"]))) as client:
        auth = {"X-API-Key": "k"}
        client.post("/v1/predict", json={"inputs": ["good"]}, headers=auth)
        client.get("/metrics", headers=auth)
        before = len(client.get("/metrics", headers=auth).text)
        for i in range(150):
            client.get(f"/random/{i}")  # 401
            client.get(f"/also-random-{i}", headers=auth)  # 404
        client.get("/v1/predict", headers=auth)  # a known path with the wrong method: 405
        metrics = client.get("/metrics", headers=auth).text
    endpoints = {line.split('endpoint="')[1].split('"')[0] for line in metrics.splitlines() if 'endpoint="' in line}
    assert endpoints == {"/v1/predict", "/metrics", "unmatched"}
    assert 'tuneforge_requests_total{endpoint="unmatched",status="401"} 150.0' in metrics
    assert 'tuneforge_requests_total{endpoint="unmatched",status="404"} 150.0' in metrics
    assert 'tuneforge_requests_total{endpoint="/v1/predict",status="405"} 1.0' in metrics
    assert len(metrics) - before < 4000  # a few new series, not one per path


def test_docs_page_works_offline(text_run):
    with TestClient(create_app(text_run)) as client:
        page = client.get("/docs")
        assert page.status_code == 200 and "/openapi.json" in page.text
        assert "http://" not in page.text and "https://" not in page.text and "<script" not in page.text
        assert client.get("/openapi.json").json()["paths"].keys() >= {"/v1/predict", "/v1/model"}
