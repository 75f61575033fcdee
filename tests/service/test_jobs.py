"""The service end to end through the official ``openai`` client, on SQLite and on PostgreSQL.

The first test is the README's "moving from OpenAI" code, unchanged but for base_url and
api_key (and the tiny model and step count). Every job trains a tiny model for a handful of
steps in a real worker process.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal

import httpx
import openai
import pytest

from svc import chat_file, events_of, preference_file, wait_for, wait_terminal

TINY = {"train.max_steps": 4, "train.log_every": 1, "train.save_every": 2, "train.precision": "fp32",
        "task.generation.eval_prompts": 0}


def test_moving_from_openai(service, tiny_lm, tmp_path):
    client = service.client("alpha")
    # -- the README's code, from here on
    training = client.files.create(file=open(chat_file(tiny_lm, tmp_path / "chat.jsonl"), "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tiny-lm", training_file=training.id, suffix="demo",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 8}}},
        extra_body={"tuneforge": {"overrides": {**TINY, "output.report": True}}})
    assert job.status == "validating_files"
    job = wait_terminal(client, job.id)
    assert job.status == "succeeded", job.error
    events = client.fine_tuning.jobs.list_events(job.id, limit=50)
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id)
    answer = client.chat.completions.create(model=job.fine_tuned_model, temperature=0, max_tokens=6,
                                            messages=[{"role": "user", "content": "reverse abc ="}])
    # -- what it must have given
    assert job.fine_tuned_model == f"ft:tiny-lm:demo:{job.id}"
    assert job.trained_tokens and job.trained_tokens > 0
    assert job.hyperparameters.n_epochs == 1 and job.hyperparameters.batch_size == 8
    metrics = [e for e in events.data if e.type == "metrics"]
    assert {e.data["step"] for e in metrics if "train_loss" in e.data} == {1, 2, 3, 4}
    assert all(e.data["total_steps"] == 4 for e in metrics)
    assert any("valid_loss" in e.data for e in metrics)
    assert events.data[0].message == "The job has successfully completed"  # newest first, as OpenAI's
    steps = [c.step_number for c in checkpoints.data]
    assert steps and max(steps) == 4 and steps == sorted(steps, reverse=True)
    assert checkpoints.data[0].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-4"
    assert isinstance(answer.choices[0].message.content, str)
    assert answer.usage.completion_tokens >= 1 and answer.usage.prompt_tokens > 3
    assert answer.model == job.fine_tuned_model
    # the results file: one row per step, the losses the events carried
    rows = list(csv.DictReader(io.StringIO(client.files.content(job.result_files[0]).text)))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4]  # 0: the starting weights (train.eval_before)
    by_step = {e.data["step"]: e.data["train_loss"] for e in metrics if "train_loss" in e.data}
    assert rows[0]["train_loss"] == "" and rows[0]["valid_loss"] != ""  # the baseline row: validation only
    assert all(abs(float(r["train_loss"]) - by_step[int(r["step"])]) < 1e-9 for r in rows[1:])
    # the model is listed, and a page of events continues where the last one ended
    assert job.fine_tuned_model in {m.id for m in client.models.list()}
    first = client.fine_tuning.jobs.list_events(job.id, limit=3)
    second = client.fine_tuning.jobs.list_events(job.id, limit=3, after=first.data[-1].id)
    assert first.has_more and not {e.id for e in first.data} & {e.id for e in second.data}
    assert [e.id for e in first.data + second.data] == [e.id for e in events.data[:6]]
    report = httpx.get(f"{service.server.url}/v1/fine_tuning/jobs/{job.id}/report",
                       headers={"Authorization": f"Bearer {service.keys['alpha']}"})
    assert report.status_code == 200 and "<html" in report.text.lower()
    # project beta sees none of it
    other = service.client("beta")
    for call in (lambda: other.fine_tuning.jobs.retrieve(job.id), lambda: other.files.retrieve(training.id),
                 lambda: other.files.content(training.id), lambda: other.fine_tuning.jobs.list_events(job.id),
                 lambda: other.fine_tuning.jobs.checkpoints.list(job.id), lambda: other.models.retrieve(job.fine_tuned_model),
                 lambda: other.fine_tuning.jobs.cancel(job.id),
                 lambda: other.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user",
                                                                                            "content": "hi"}])):
        with pytest.raises(openai.NotFoundError):
            call()
    assert job.fine_tuned_model not in {m.id for m in other.models.list()}
    assert job.id not in {j.id for j in other.fine_tuning.jobs.list()}


def test_dpo_job(service, tiny_lm, tmp_path):
    client = service.client("alpha")
    pairs = client.files.create(file=open(preference_file(tiny_lm, tmp_path / "pairs.jsonl"), "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tiny-lm", training_file=pairs.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "batch_size": 4}}},
        extra_body={"tuneforge": {"overrides": TINY}})
    job = wait_terminal(client, job.id)
    assert job.status == "succeeded", job.error
    evals = [e.data for e in events_of(client, job.id) if e.type == "metrics" and "valid_loss" in e.data]
    assert evals and all("valid_reward_accuracy" in d for d in evals)  # DPO's own metrics reached the events
    assert (service.tmp / "data" / "jobs" / job.id / "run" / "model").is_dir()  # an ordinary run directory
    answer = client.chat.completions.create(model=job.fine_tuned_model, temperature=0, max_tokens=4,
                                            messages=[{"role": "user", "content": "reverse ab ="}])
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_text_classification_through_the_extension(service, tmp_path):
    client = service.client("alpha")
    rows = [{"text": f"{w} movie {w}", "label": lab} for i in range(24)
            for w, lab in [(("good great fun loved".split())[i % 4], "pos"), (("bad awful boring hated".split())[i % 4], "neg")]]
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = client.files.create(file=open(path, "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tiny-bert", training_file=data.id, method={"type": "supervised"},
        extra_body={"tuneforge": {"recipe": {"task": {"type": "text-classification"}, "strategy": {"name": "full"},
                                             "train": {"max_steps": 6, "lr": 5e-3, "precision": "fp32",
                                                       "log_every": 2}, "data": {"validation_split": 0.25}}}})
    job = wait_terminal(client, job.id)
    assert job.status == "succeeded", job.error
    evals = [e.data for e in events_of(client, job.id) if e.type == "metrics" and "valid_accuracy" in e.data]
    assert evals and 0.0 <= evals[0]["valid_accuracy"] <= 1.0
    answer = httpx.post(f"{service.server.url}/v1/predict", json={"model": job.fine_tuned_model,
                                                                 "inputs": ["great fun movie", "awful boring movie"]},
                        headers={"Authorization": f"Bearer {service.keys['alpha']}"}, timeout=60).json()
    assert [set(p["scores"]) for p in answer["predictions"]] == [{"pos", "neg"}] * 2
    # a classifier has no chat: the error says where to go
    with pytest.raises(openai.BadRequestError, match="/v1/predict"):
        client.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}])


def _long_job(client, tiny_lm, tmp_path, steps: int, seed: int = 7, save_every: int = 2):
    training = client.files.create(file=open(chat_file(tiny_lm, tmp_path / "chat.jsonl", n=64), "rb"),
                                   purpose="fine-tune")
    return client.fine_tuning.jobs.create(
        model="tiny-lm", training_file=training.id, seed=seed,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 40, "batch_size": 4}}},
        extra_body={"tuneforge": {"overrides": {**TINY, "train.max_steps": steps, "train.save_every": save_every,
                                                "train.eval_every": save_every}}})


def test_cancel_stops_within_one_step_and_keeps_checkpoints(service, tiny_lm, tmp_path):
    client = service.client("alpha")
    job = _long_job(client, tiny_lm, tmp_path, steps=400)
    wait_for(lambda: client.fine_tuning.jobs.retrieve(job.id).tuneforge["step"] >= 3, what="3 steps")
    client.fine_tuning.jobs.cancel(job.id)
    job = wait_terminal(client, job.id, timeout=120)
    assert job.status == "cancelled" and job.fine_tuned_model is None
    stop = next(e for e in events_of(client, job.id) if e.message.startswith("Job cancelled at step"))
    assert stop.data["stopped_at_step"] - stop.data["seen_at_step"] <= 1  # within one optimizer step of seeing it
    assert stop.data["stopped_at_step"] < 400
    kept = sorted(p.name for p in (service.tmp / "data" / "jobs" / job.id / "run" / "checkpoints").glob("step-*"))
    assert kept and kept[-1] == f"step-{stop.data['stopped_at_step']:08d}"  # the stop itself wrote a checkpoint
    with pytest.raises(openai.BadRequestError, match="cancelled"):
        client.fine_tuning.jobs.cancel(job.id)


def test_pause_and_resume_continue_the_run(service, tiny_lm, tmp_path):
    client = service.client("alpha")
    job = _long_job(client, tiny_lm, tmp_path, steps=16)
    wait_for(lambda: client.fine_tuning.jobs.retrieve(job.id).tuneforge["step"] >= 2, what="2 steps")
    client.fine_tuning.jobs.pause(job.id)
    paused = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status == "paused" and j, timeout=120)
    at = paused.tuneforge["step"]
    assert 2 <= at < 16
    client.fine_tuning.jobs.resume(job.id)
    job = wait_terminal(client, job.id)
    assert job.status == "succeeded", job.error
    messages = [e.message for e in events_of(client, job.id)]
    assert any(m.startswith(f"Job paused at step {at}") for m in messages)
    assert any(f"continuing exactly from checkpoint step-{at:08d}" in m for m in messages)


def test_killed_worker_resumes_elsewhere_with_the_same_final_metrics(service, tiny_lm, tmp_path):
    """kill -9 the worker mid-job: the job is re-queued, another worker continues it from its last
    checkpoint, and it ends with exactly the metrics of the same job never interrupted (fp32)."""
    from tuneforge.service.db import Database, Worker

    client = service.client("alpha")
    steps = 12
    plain = _long_job(client, tiny_lm, tmp_path, steps=steps, seed=11)  # the two run side by side, one per worker
    victim = _long_job(client, tiny_lm, tmp_path, steps=steps, seed=11)
    running = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(victim.id)).tuneforge["step"] >= 5 and j,
                       what="5 steps")
    assert running.status == "running"
    db = Database(service.server.db_url)
    with db.read() as s:
        pid = s.get(Worker, running.tuneforge["worker"]).pid
    db.dispose()
    os.kill(pid, signal.SIGKILL)
    done, plain = wait_terminal(client, victim.id), wait_terminal(client, plain.id)
    assert done.status == "succeeded" and plain.status == "succeeded", (done.error, plain.error)
    # another worker process finished it (the pool may restart the killed slot under the same name)
    db = Database(service.server.db_url)
    with db.read() as s:
        finisher = s.get(Worker, done.tuneforge["worker"]).pid
    db.dispose()
    assert done.tuneforge["attempts"] == 2 and finisher != pid
    messages = [e.message for e in events_of(client, victim.id)]
    assert any("stopped responding" in m for m in messages)
    assert any("continuing exactly from checkpoint" in m for m in messages)

    def final(job):
        return next(e.data["final_validation"] for e in events_of(client, job.id) if "final_validation" in (e.data or {}))
    assert final(done) == final(plain)
    assert done.trained_tokens == plain.trained_tokens
