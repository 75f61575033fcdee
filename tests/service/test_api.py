"""The API without training: files, malformed uploads, idempotency, refused requests, keys, pages."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from svc import chat_file


def _blobs(service) -> set:
    root = service.tmp / "data" / "files"
    return {p.name for p in root.glob("??/*")} if root.exists() else set()


def test_files_api(service, tiny_lm, tmp_path):
    client = service.client("alpha")
    path = chat_file(tiny_lm, tmp_path / "chat.jsonl", n=5)
    f = client.files.create(file=open(path, "rb"), purpose="fine-tune")
    assert (f.bytes, f.filename, f.purpose, f.status) == (path.stat().st_size, "chat.jsonl", "fine-tune", "processed")
    assert client.files.retrieve(f.id).id == f.id
    assert client.files.content(f.id).content == path.read_bytes()
    assert f.id in {x.id for x in client.files.list()}
    import hashlib

    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert (service.tmp / "data" / "files" / sha[:2] / sha).read_bytes() == path.read_bytes()  # by content hash
    again = client.files.create(file=open(path, "rb"), purpose="fine-tune")  # same bytes: one stored copy
    client.files.delete(f.id)
    assert (service.tmp / "data" / "files" / sha[:2] / sha).exists()  # still used by the second upload
    deleted = client.files.delete(again.id)
    assert deleted.deleted and not (service.tmp / "data" / "files" / sha[:2] / sha).exists()
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


@pytest.mark.parametrize("lines,line,words", [
    (['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}', '{"messages": [}'],
     2, "not valid JSON"),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], 1, "no assistant message"),
    (['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}', "",
      '{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "b"}]}'], 3, "role \"robot\""),
    (['{"input": {"messages": [{"role": "user", "content": "q"}]}, "preferred_output": [{"role": "assistant", '
      '"content": "a"}]}'], 1, "missing 'non_preferred_output'"),
    (['{"input": {"messages": [{"role": "user", "content": "q"}]}, "preferred_output": [{"role": "assistant", '
      '"content": "a"}], "non_preferred_output": [{"role": "assistant", "content": "a"}]}'], 1, "the same reply"),
])
def test_malformed_upload_is_refused_naming_the_line_and_nothing_is_stored(service, tmp_path, lines, line, words):
    client = service.client("alpha")
    before_rows, before_blobs = {f.id for f in client.files.list()}, _blobs(service)
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=open(path, "rb"), purpose="fine-tune")
    message = err.value.body["message"]
    assert f"line {line}:" in message and words in message and "bad.jsonl" in message
    assert {f.id for f in client.files.list()} == before_rows and _blobs(service) == before_blobs
    assert not list((service.tmp / "data" / "files" / ".incoming").iterdir())  # no temporary left either


def test_upload_over_the_size_limit_is_refused(service, tmp_path):
    from tuneforge.service.files import BadUpload, receive
    import asyncio

    class Upload:
        def __init__(self):
            self.left = 3

        async def read(self, n):
            self.left -= 1
            return b"x" * 1024 if self.left >= 0 else b""

    with pytest.raises(BadUpload, match="upload limit"):
        asyncio.run(receive(Upload(), tmp_path, max_bytes=2000))
    assert not list((tmp_path / "files" / ".incoming").iterdir())


def test_one_idempotency_key_makes_one_job(service, tiny_lm, tmp_path):
    client = service.client("alpha")
    f = client.files.create(file=open(chat_file(tiny_lm, tmp_path / "c.jsonl", n=8), "rb"), purpose="fine-tune")
    body = dict(model="tiny-lm", training_file=f.id, extra_body={"tuneforge": {"overrides": {"train.max_steps": 1}}})
    first = client.fine_tuning.jobs.create(**body, extra_headers={"Idempotency-Key": "same-key-1"})
    second = client.fine_tuning.jobs.create(**body, extra_headers={"Idempotency-Key": "same-key-1"})
    assert first.id == second.id
    assert sum(j.id == first.id for j in client.fine_tuning.jobs.list(limit=100)) == 1
    with pytest.raises(openai.ConflictError, match="different request"):
        client.fine_tuning.jobs.create(**{**body, "suffix": "other"}, extra_headers={"Idempotency-Key": "same-key-1"})
    third = client.fine_tuning.jobs.create(**body, extra_headers={"Idempotency-Key": "same-key-2"})
    assert third.id != first.id
    for job in (first, third):
        client.fine_tuning.jobs.cancel(job.id)
    # another project's identical key is its own
    other = service.client("beta")
    g = other.files.create(file=open(tmp_path / "c.jsonl", "rb"), purpose="fine-tune")
    mine = other.fine_tuning.jobs.create(**{**body, "training_file": g.id}, extra_headers={"Idempotency-Key": "same-key-1"})
    assert mine.id != first.id
    other.fine_tuning.jobs.cancel(mine.id)


@pytest.mark.parametrize("extension,param,words", [
    ({"overrides": {"output.dir": "/tmp/elsewhere"}}, "tuneforge.output.dir", "cannot be set"),
    ({"overrides": {"model.key_map": "os:system"}}, "tuneforge.model.key_map", "names code to run"),
    ({"overrides": {"model.trust_remote_code": True}}, "tuneforge.model.trust_remote_code", "its own code"),
    ({"overrides": {"data.test": "/etc/passwd"}}, "tuneforge.data.test", "not a path"),
    ({"recipe": {"data": {"train": "../../secret.jsonl"}}}, "tuneforge.data.train", "not a path"),
    ({"overrides": {"model.name": "/somewhere/model"}}, "tuneforge.model.name", "GET /v1/models"),
    ({"overrides": {"train.lerning_rate": 1}}, "tuneforge", "did you mean"),
])
def test_unsafe_or_invalid_extensions_are_refused(service, tiny_lm, tmp_path, extension, param, words):
    client = service.client("alpha")
    f = client.files.create(file=open(chat_file(tiny_lm, tmp_path / "c.jsonl", n=4), "rb"), purpose="fine-tune")
    before = {j.id for j in client.fine_tuning.jobs.list(limit=100)}
    dirs = set((service.tmp / "data" / "jobs").glob("*"))
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(model="tiny-lm", training_file=f.id, extra_body={"tuneforge": extension})
    assert err.value.body["param"] == param and words in err.value.body["message"]
    assert {j.id for j in client.fine_tuning.jobs.list(limit=100)} == before
    assert set((service.tmp / "data" / "jobs").glob("*")) == dirs  # nothing left behind


def test_refused_job_requests(service, tiny_lm, tmp_path):
    client = service.client("alpha")
    chat = client.files.create(file=open(chat_file(tiny_lm, tmp_path / "c.jsonl", n=4), "rb"), purpose="fine-tune")
    cases = [
        (dict(model="gpt-4o-mini", training_file=chat.id), "model", "not offered"),
        (dict(model="tiny-lm", training_file=chat.id, method={"type": "dpo"}), "training_file", "preference"),
        (dict(model="tiny-lm", training_file=chat.id,
              method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": -1}}}),
         "method.supervised.hyperparameters.n_epochs", "positive integer"),
        (dict(model="tiny-lm", training_file=chat.id, method={"type": "reinforcement"}), "method.type", "not supported"),
    ]
    for body, param, words in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.fine_tuning.jobs.create(**body)
        assert err.value.body["param"] == param and words in err.value.body["message"], err.value.body
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.create(model="tiny-lm", training_file="file-doesnotexist")


def test_keys_auth_and_admin(service):
    url = service.server.url
    assert httpx.get(url + "/v1/files").status_code == 401
    assert httpx.get(url + "/v1/files", headers={"Authorization": "Bearer tf-wrong"}).status_code == 401
    admin = {"Authorization": f"Bearer {service.keys['admin']}"}
    assert httpx.get(url + "/v1/admin/keys", headers={"Authorization": f"Bearer {service.keys['alpha']}"}).status_code == 403
    made = httpx.post(url + "/v1/admin/keys", json={"project": "gamma"}, headers=admin).json()
    assert made["key"].startswith("tf-")
    listed = httpx.get(url + "/v1/admin/keys", headers=admin).json()["data"]
    assert made["key"] not in json.dumps(listed)  # only hashes are stored; lists show a prefix
    mine = {"Authorization": f"Bearer {made['key']}"}
    assert httpx.get(url + "/v1/files", headers=mine).json()["data"] == []  # a new project sees nothing
    assert httpx.delete(url + f"/v1/admin/keys/{made['id']}", headers=admin).status_code == 200
    assert httpx.get(url + "/v1/files", headers=mine).status_code == 401


def test_models_list_has_the_base_models(service):
    ids = {m.id for m in service.client("alpha").models.list()}
    assert {"tiny-lm", "tiny-bert"} <= ids
