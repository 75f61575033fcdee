"""The server through HTTP: predictions equal the model's own, validation errors are
precise 4xx, API keys are enforced, metrics are exported, and concurrent requests are
micro-batched with each request getting exactly its own answers (on a real uvicorn)."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient

from helpers import image_recipe, text_recipe, write_image_folder, write_text_csv
from tuneforge import finetune, load
from tuneforge.deploy.serve import ServeConfig, create_app

TEXTS = ["good fun film", "bad", "a dull and bad and boring long film", "good good good", "film", "bad acting"]


@pytest.fixture(scope="module")
def text_run(tiny_bert_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_text")
    train = write_text_csv(tmp / "train.csv", n=32)
    return finetune(text_recipe(tiny_bert_dir, train, tmp / "run", train={"epochs": 2, "lr": 5e-3})).path


@pytest.fixture(scope="module")
def image_run(tiny_timm_weights, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_image")
    train = write_image_folder(tmp / "images", n_per_class=4)
    return finetune(image_recipe(tiny_timm_weights, train, tmp / "run", train={"epochs": 1})).path, train


def _same(got: list[dict], expected: list[dict]):
    assert [g["label"] for g in got] == [e["label"] for e in expected]
    for g, e in zip(got, expected):
        assert g["scores"] == pytest.approx(e["scores"], abs=1e-5)


def test_text_endpoints(text_run):
    with TestClient(create_app(text_run)) as client:
        r = client.post("/v1/predict", json={"inputs": TEXTS})
        assert r.status_code == 200
        _same(r.json()["predictions"], load(text_run).predict(TEXTS))
        model = client.get("/v1/model").json()
        assert model["labels"] and model["modality"] == "text" and "accuracy" in model["metrics"]["validation"]
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/openapi.json").status_code == 200
        metrics = client.get("/metrics").text
        assert 'tuneforge_requests_total{endpoint="/v1/predict",status="200"} 1.0' in metrics
        assert "tuneforge_batch_size_bucket" in metrics and "tuneforge_request_seconds_bucket" in metrics


@pytest.mark.parametrize("body,status,words", [
    ({"images": ["x"]}, 422, "'images' is for image models"),
    ({"inputs": "one text"}, 422, "non-empty list"),
    ({"inputs": [], }, 422, "non-empty list"),
    ({"inputs": ["ok"], "extra": 1}, 422, "unknown field"),
    ({"inputs": [3]}, 422, "inputs[0] is not a string"),
    ({"inputs": ["a"] * 5}, 413, "at most 4"),
    ({"inputs": ["x" * 101]}, 413, "inputs[0] has 101 characters"),
])
def test_text_validation_errors(text_run, body, status, words):
    cfg = ServeConfig(max_items=4, max_text_chars=100)
    with TestClient(create_app(text_run, cfg)) as client:
        r = client.post("/v1/predict", json=body)
        assert r.status_code == status and words in r.json()["detail"]
        assert 'tuneforge_errors_total' in client.get("/metrics").text


def test_body_limits_and_bad_json(text_run):
    with TestClient(create_app(text_run, ServeConfig(max_body_bytes=1000))) as client:
        r = client.post("/v1/predict", content=b'{"inputs": ["' + b"a" * 2000 + b'"]}',
                        headers={"content-type": "application/json"})
        assert r.status_code == 413 and "limit is 1,000" in r.json()["detail"]

        def chunks():  # no Content-Length: counted while it streams
            yield b'{"inputs": ["'
            for _ in range(20):
                yield b"a" * 100
            yield b'"]}'
        r = client.post("/v1/predict", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "exceeds 1,000 bytes" in r.json()["detail"]
        r = client.post("/v1/predict", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400


def test_api_keys(text_run):
    with TestClient(create_app(text_run, ServeConfig(api_keys=["s3cret", "other"]))) as client:
        assert client.get("/health").status_code == 200  # probes need no key
        r = client.post("/v1/predict", json={"inputs": ["good"]})
        assert r.status_code == 401 and "API key" in r.json()["detail"]
        assert client.post("/v1/predict", json={"inputs": ["good"]},
                           headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.post("/v1/predict", json={"inputs": ["good"]},
                           headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/v1/model", headers={"X-API-Key": "other"}).status_code == 200
        assert client.get("/metrics").status_code == 401


def test_images_base64_multipart_and_bad_images(image_run):
    run, train = image_run
    files = sorted(train.rglob("*.png"))[:3]
    expected = load(run).predict([str(p) for p in files])
    cfg = ServeConfig(max_image_pixels=40 * 40)
    with TestClient(create_app(run, cfg)) as client:
        b64 = [base64.b64encode(p.read_bytes()).decode() for p in files]
        r = client.post("/v1/predict", json={"images": b64})
        assert r.status_code == 200
        _same(r.json()["predictions"], expected)
        r = client.post("/v1/predict", files=[("images", (p.name, p.read_bytes(), "image/png")) for p in files])
        assert r.status_code == 200
        _same(r.json()["predictions"], expected)
        r = client.post("/v1/predict", json={"images": [base64.b64encode(b"not an image").decode()]})
        assert r.status_code == 422 and "images[0]" in r.json()["detail"]
        assert client.post("/v1/predict", json={"images": ["%%%"]}).status_code == 422
        from PIL import Image

        big = io.BytesIO()
        Image.new("RGB", (64, 64)).save(big, format="PNG")
        r = client.post("/v1/predict", json={"images": [base64.b64encode(big.getvalue()).decode()]})
        assert r.status_code == 413 and "too large" in r.json()["detail"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("batching", [True, False])
def test_concurrent_requests_on_a_real_server(text_run, batching):
    import uvicorn

    cfg = ServeConfig(batching=batching, max_batch_size=16, max_wait_ms=20)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(text_run, cfg), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.05)
        requests = [[TEXTS[(i + j) % len(TEXTS)] for j in range(1 + i % 3)] for i in range(24)]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client, ThreadPoolExecutor(12) as pool:
            replies = list(pool.map(lambda texts: client.post("/v1/predict", json={"inputs": texts}), requests))
            metrics = client.get("/metrics").text
        single = load(text_run)
        for texts, reply in zip(requests, replies):
            assert reply.status_code == 200
            _same(reply.json()["predictions"], single.predict(texts))
        calls = float(next(line.split()[-1] for line in metrics.splitlines()
                           if line.startswith("tuneforge_batch_size_count")))
        assert (calls < len(requests)) is batching  # batching: fewer model calls than requests
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_several_lora_adapters_over_one_base(tiny_bert_dir, tmp_path):
    # two LoRA runs of the same base with opposite labels: each request gets its adapter's answer
    train = write_text_csv(tmp_path / "train.csv", n=32)
    flipped = write_text_csv(tmp_path / "flipped.csv", n=32, labels=("neg", "pos"))  # same texts, labels swapped
    lora = {"epochs": 3, "lr": 2e-2}
    a = finetune(text_recipe(tiny_bert_dir, train, tmp_path / "a", "lora", train=lora)).path
    b = finetune(text_recipe(tiny_bert_dir, flipped, tmp_path / "b", "lora", train=lora)).path
    with TestClient(create_app(a, ServeConfig(adapters={"flipped": str(b)}))) as client:
        default = client.post("/v1/predict", json={"inputs": TEXTS}).json()["predictions"]
        other = client.post("/v1/predict", json={"inputs": TEXTS, "adapter": "flipped"}).json()["predictions"]
        _same(default, load(a).predict(TEXTS))
        _same(other, load(b).predict(TEXTS))
        assert client.get("/v1/model").json()["adapters"].keys() == {"default", "flipped"}
        r = client.post("/v1/predict", json={"inputs": TEXTS, "adapter": "nope"})
        assert r.status_code == 422 and "flipped" in r.json()["detail"]
    full = finetune(text_recipe(tiny_bert_dir, train, tmp_path / "full", train={"epochs": 1})).path
    from tuneforge import TuneforgeError

    with pytest.raises(TuneforgeError, match="only LoRA runs share a base"):
        create_app(a, ServeConfig(adapters={"x": str(full)}))


def test_shutdown_finishes_in_flight_requests(text_run):
    import uvicorn

    # a long batching window keeps the request waiting inside the server when shutdown begins
    cfg = ServeConfig(max_batch_size=64, max_wait_ms=400)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(text_run, cfg), host="127.0.0.1", port=port,
                                           log_level="warning", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    with ThreadPoolExecutor(1) as pool:
        reply = pool.submit(httpx.post, f"http://127.0.0.1:{port}/v1/predict", json={"inputs": TEXTS}, timeout=30)
        time.sleep(0.15)
        server.should_exit = True  # what SIGTERM does
        response = reply.result()
    thread.join(timeout=15)
    assert response.status_code == 200 and len(response.json()["predictions"]) == len(TEXTS)
    assert not thread.is_alive()
