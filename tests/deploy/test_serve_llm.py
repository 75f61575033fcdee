"""`tuneforge serve` on a causal-lm run: OpenAI-style chat and text completions, plain and
streamed, checked with the official ``openai`` client against a real uvicorn server; bad
requests are 4xx naming the field; API keys and /metrics apply as on the classifier server."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
import torch

from tuneforge import finetune
from tuneforge.deploy.generator import Generator
from tuneforge.deploy.serve import ServeConfig, create_app
from tuneforge.llm.tiny import make_tiny_lm

openai = pytest.importorskip("openai", reason="the openai client is in the dev extra")
KEY = "test-key-1"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "reverse abc"}]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve_llm")
    model = make_tiny_lm(root / "tiny-lm")
    run = finetune({"model": {"name": str(model)},
                    "task": {"type": "causal-lm", "max_length": 48, "chat_template": "chatml",
                             "generation": {"eval_prompts": 0, "max_new_tokens": 12}},
                    "data": {"train": str(model / "sft-train.jsonl"), "validation": str(model / "sft-val.jsonl"),
                             "max_train_rows": 32},
                    "strategy": {"name": "lora"},
                    "train": {"max_steps": 2, "eval_every": 2, "batch_size": 8, "lr": 5e-3, "precision": "fp32",
                              "progress": False},
                    "output": {"dir": str(root / "sft-run"), "report": False}})
    yield run.path
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(lm_run):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(lm_run, ServeConfig(api_keys=[KEY], max_tokens=64))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", "model": lm_run.name, "generator": app.state.generator}
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_chat_completion_is_the_runs_own_greedy_reply(server, client, lm_run):
    r = client.chat.completions.create(model=server["model"], messages=MESSAGES, max_tokens=10, temperature=0)
    assert r.object == "chat.completion" and r.model == server["model"] and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    # the same reply as the run answers through `tuneforge chat` (its template, greedy, same cap)
    expected = Generator(lm_run).reply(MESSAGES, greedy=True, max_new_tokens=10)
    assert choice.message.content.strip() == expected
    gen = server["generator"]
    assert r.usage.prompt_tokens == gen.count_tokens(gen.prompt_text(MESSAGES))
    assert 1 <= r.usage.completion_tokens <= 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert choice.finish_reason == ("length" if r.usage.completion_tokens == 10 else "stop")
    assert client.models.list().data[0].id == server["model"]


def test_streamed_chat_is_the_same_reply_in_pieces(server, client):
    plain = client.chat.completions.create(model=server["model"], messages=MESSAGES, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model=server["model"], messages=MESSAGES, max_tokens=10,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == plain.choices[0].message.content
    assert with_choices[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens  # the include_usage chunk
    # on the wire: server-sent events ending with [DONE]
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": server["model"], "messages": MESSAGES, "max_tokens": 4, "stream": True},
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_text_completion_stop_and_seed(server, client, lm_run):
    prompt = "reverse abc ="
    r = client.completions.create(model=server["model"], prompt=prompt, max_tokens=8, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text.strip() == Generator(lm_run).complete([prompt], raw=True, max_new_tokens=8)[0]
    text = r.choices[0].text
    if len(text.strip()) >= 2:  # a stop string cuts the reply before it, finish_reason "stop"
        stop = text.strip()[1:3]
        cut = client.completions.create(model=server["model"], prompt=prompt, max_tokens=8, temperature=0,
                                        stop=[stop])
        assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=server["model"], prompt=prompt, max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == text
    # sampling: the same seed, the same reply
    a, b = (client.chat.completions.create(model=server["model"], messages=MESSAGES, max_tokens=8, temperature=1.0,
                                           seed=7).choices[0].message.content for _ in range(2))
    assert a == b


@pytest.mark.parametrize("body,status,param,words", [
    ({"messages": MESSAGES, "n": 2}, 422, "n", "one choice per request"),
    ({"messages": MESSAGES, "temperature": 5}, 422, "temperature", "at most 2"),
    ({"messages": MESSAGES, "max_tokens": 0}, 422, "max_tokens", "at least 1"),
    ({"messages": MESSAGES, "max_tokens": 65}, 422, "max_tokens", "at most 64"),
    ({"messages": MESSAGES, "top_p": 0}, 422, "top_p", "above 0"),
    ({"messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, 422, "stop", "at most 4"),
    ({"messages": MESSAGES, "logprobs": True}, 422, "logprobs", "not supported"),
    ({"messages": MESSAGES, "tools": [{"type": "function"}]}, 422, "tools", "not supported"),
    ({"messages": MESSAGES, "temprature": 0.5}, 422, "temprature", "unknown field"),
    ({"messages": []}, 422, "messages", "non-empty list"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 422, "messages[0].role", "use one of"),
    ({"messages": [{"role": "user", "content": 3}]}, 422, "messages[0].content", "must be a string"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, 422,
     "messages[1].role", "end with a user message"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, 422, "messages[0].content", "lone UTF-16 surrogate"),
    ({"messages": [{"role": "user", "content": "x" * 10_001}]}, 413, "messages[0].content", "limit is 10,000"),
    ({"messages": [{"role": "user", "content": "reverse " * 200}]}, 400, "messages", "at most 256"),
])
def test_bad_chat_requests_are_4xx_naming_the_field(server, body, status, param, words):
    r = httpx.post(server["url"] + "/v1/chat/completions", headers={"X-API-Key": KEY,
                                                                   "Content-Type": "application/json"},
                   content=json.dumps({"model": server["model"], **body}).encode(), timeout=30)  # "\ud800" escaped
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"] and r.json()["detail"] == error["message"]


def test_wrong_model_bad_json_and_auth(server, client):
    with pytest.raises(openai.NotFoundError, match="is not served here"):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    r = httpx.post(server["url"] + "/v1/completions", headers={"X-API-Key": KEY}, content=b"{not json", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_json"
    r = httpx.post(server["url"] + "/v1/completions", headers={"X-API-Key": KEY},
                   json={"model": server["model"], "prompt": ["a", "b"]}, timeout=30)
    assert r.status_code == 422 and r.json()["error"]["param"] == "prompt"
    stranger = openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.chat.completions.create(model=server["model"], messages=MESSAGES)
    assert httpx.get(server["url"] + "/v1/models", timeout=30).status_code == 401  # no key
    assert httpx.get(server["url"] + "/health", timeout=30).status_code == 200  # open
    metrics = httpx.get(server["url"] + "/metrics", headers={"X-API-Key": KEY}, timeout=30).text
    assert 'tuneforge_requests_total{endpoint="/v1/chat/completions",status="404"}' in metrics
    assert 'tuneforge_requests_total{endpoint="/v1/completions",status="400"}' in metrics
    assert 'tuneforge_errors_total{reason="auth"}' in metrics and 'tuneforge_tokens_total{kind="completion"}' in metrics


def test_concurrent_requests_wait_their_turn_and_get_their_own_replies(server, client):
    """One generation at a time: concurrent requests (streamed and not) each get exactly the reply
    they get alone, while the handlers count tokens beside a running generation."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [[{"role": "user", "content": f"reverse {w}"}] for w in ("abc", "dge", "fab", "ced")]

    def ask(i):
        messages = prompts[i % len(prompts)]
        if i % 2:
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model=server["model"], messages=messages, max_tokens=6, temperature=0, stream=True) if c.choices)
        return client.chat.completions.create(model=server["model"], messages=messages, max_tokens=6,
                                              temperature=0).choices[0].message.content

    alone = [ask(i) for i in range(len(prompts))]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(ask, range(12)))
    assert together == [alone[i % len(prompts)] for i in range(12)]  # i and i % 4 are both even or both odd
