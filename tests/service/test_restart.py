"""kill -9 the server: after a restart every job is still there, in the right state, and the
running one continues from its checkpoint (its worker noticed the server was gone, checkpointed
and queued it again)."""

from __future__ import annotations

import httpx
import openai

from conftest import Service, make_keys
from svc import Server, chat_file, events_of, wait_for, wait_terminal


def test_server_killed_and_restarted_keeps_every_job(tmp_path, db_url, tiny_lm):
    keys = make_keys(tmp_path / "data", db_url)
    server = Server(tmp_path / "data", db_url, {"tiny-lm": str(tiny_lm)}, workers=1).start()
    try:
        svc = Service(server=server, keys=keys, tmp=tmp_path)
        client = svc.client("alpha")
        f = client.files.create(file=open(chat_file(tiny_lm, tmp_path / "c.jsonl", n=32), "rb"), purpose="fine-tune")

        def job(steps):
            return client.fine_tuning.jobs.create(
                model="tiny-lm", training_file=f.id, seed=3,
                method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50, "batch_size": 4}}},
                extra_body={"tuneforge": {"overrides": {"train.max_steps": steps, "train.save_every": 2,
                                                        "train.eval_every": 100, "train.precision": "fp32",
                                                        "task.generation.eval_prompts": 0, "output.report": False}}})
        done = wait_terminal(client, job(2).id)
        assert done.status == "succeeded", done.error
        running, waiting = job(400), job(3)
        wait_for(lambda: client.fine_tuning.jobs.retrieve(running.id).tuneforge["step"] >= 3, what="3 steps")
        before = {j.id: j.status for j in client.fine_tuning.jobs.list(limit=100)}
        assert before == {done.id: "succeeded", running.id: "running", waiting.id: "queued"}
        server.kill()
        try:
            httpx.get(server.url + "/health", timeout=1)
            raise AssertionError("the server still answers")
        except httpx.HTTPError:
            pass
        server = Server(tmp_path / "data", db_url, {"tiny-lm": str(tiny_lm)}, workers=1, port=server.port).start()
        svc.server = server
        after = {j.id: j for j in client.fine_tuning.jobs.list(limit=100)}
        assert set(after) == set(before)
        assert after[done.id].status == "succeeded" and after[done.id].fine_tuned_model == done.fine_tuned_model
        assert after[waiting.id].status in ("queued", "running", "succeeded")
        assert after[running.id].status in ("running", "queued")
        # the orphaned worker checkpointed the running job and queued it again; a new worker continues it
        wait_for(lambda: any("continuing exactly from checkpoint" in e.message for e in events_of(client, running.id)),
                 what="the running job to continue")
        messages = [e.message for e in events_of(client, running.id)]
        assert any("is stopping: job queued again" in m for m in messages)
        client.fine_tuning.jobs.cancel(running.id)
        assert wait_terminal(client, running.id).status == "cancelled"
        assert wait_terminal(client, waiting.id).status == "succeeded"
        reply = client.chat.completions.create(model=done.fine_tuned_model, temperature=0, max_tokens=3,
                                               messages=[{"role": "user", "content": "reverse ab ="}])
        assert isinstance(reply.choices[0].message.content, str)
        assert client.files.retrieve(f.id).id == f.id
        try:
            client.fine_tuning.jobs.retrieve("ftjob-nope")
            raise AssertionError("an unknown job must be a 404")
        except openai.NotFoundError:
            pass
    finally:
        server.stop()
