"""Load on the job service, loopback only and bounded: N jobs submitted at once, W workers,
C clients polling — every job must end in a terminal state, none lost or duplicated, and the
API's latency is measured at the clients (p50/p99 over every request they made).

    python benchmarks/service_load.py --jobs 50 --workers 2 --clients 100

It makes its own tiny random Llama (`tuneforge make-tiny-lm`) and a throw-away data directory
with SQLite (``--db postgresql://...`` to measure PostgreSQL); each job trains one step. The
figures printed are measured here, on this machine: write them down with `uptime` and the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "service"))
sys.path.insert(0, str(ROOT / "src"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--db", help="database URL (default: SQLite in the temporary data directory)")
    ap.add_argument("--timeout", type=float, default=1800, help="give up after this many seconds")
    args = ap.parse_args()

    import httpx
    from conftest import make_keys
    from svc import Server, chat_file

    from tuneforge.llm.tiny import make_tiny_lm

    tmp = Path(tempfile.mkdtemp(prefix="tf-load-"))
    tiny = make_tiny_lm(tmp / "tiny-lm")
    url = args.db or f"sqlite:///{tmp / 'data' / 'service.db'}"
    keys = make_keys(tmp / "data", url)
    server = Server(tmp / "data", url, {"tiny-lm": str(tiny)}, workers=args.workers,
                    extra=["--stale-after-s", "15", "--heartbeat-s", "1"]).start()
    headers = {"Authorization": f"Bearer {keys['alpha']}"}
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    try:
        http = httpx.Client(base_url=server.url, headers=headers, timeout=60)
        file_id = http.post("/v1/files", files={"file": ("chat.jsonl", chat_file(tiny, tmp / "c.jsonl", 16).read_bytes())},
                            data={"purpose": "fine-tune"}).json()["id"]
        body = {"model": "tiny-lm", "training_file": file_id, "seed": 1,
                "tuneforge": {"overrides": {"train.max_steps": 1, "task.generation.eval_prompts": 0,
                                            "output.report": False}}}
        t0 = time.perf_counter()
        created: list[str] = []

        def submit(i):
            with httpx.Client(base_url=server.url, headers={**headers, "Idempotency-Key": f"load-{i}"}, timeout=60) as c:
                start = time.perf_counter()
                r = c.post("/v1/fine_tuning/jobs", json=body)
                with lock:
                    latencies.append(time.perf_counter() - start)
                    (created.append(r.json()["id"]) if r.status_code == 200 else errors.append(r.text[:200]))

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(args.jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done = threading.Event()

        def poll(k):
            with httpx.Client(base_url=server.url, headers=headers, timeout=60) as c:
                while not done.is_set():
                    job = created[k % len(created)]
                    start = time.perf_counter()
                    r = c.get(f"/v1/fine_tuning/jobs/{job}") if k % 2 else c.get("/v1/fine_tuning/jobs?limit=20")
                    with lock:
                        latencies.append(time.perf_counter() - start)
                        if r.status_code != 200:
                            errors.append(f"{r.status_code} {r.text[:120]}")
                    time.sleep(0.2)

        pollers = [threading.Thread(target=poll, args=(k,), daemon=True) for k in range(args.clients)]
        for t in pollers:
            t.start()
        terminal = {}
        while time.perf_counter() - t0 < args.timeout:
            page = http.get("/v1/fine_tuning/jobs?limit=100").json()["data"]
            terminal = {j["id"]: j["status"] for j in page if j["status"] in ("succeeded", "failed", "cancelled")}
            if len(terminal) >= len(created):
                break
            time.sleep(1)
        wall = time.perf_counter() - t0
        done.set()
        for t in pollers:
            t.join(timeout=70)
        listed = [j["id"] for j in http.get("/v1/fine_tuning/jobs?limit=100").json()["data"]]
        attempts = {}
        for job in created:
            events = http.get(f"/v1/fine_tuning/jobs/{job}/events?limit=100").json()["data"]
            attempts[job] = sum(e["message"].startswith(("Fine-tuning job started", "Attempt ")) for e in events)
    finally:
        server.stop()
    lat = sorted(latencies)
    result = {
        "jobs": args.jobs, "workers": args.workers, "clients": args.clients, "db": url.split(":")[0],
        "created": len(created), "distinct_listed": len(set(listed)), "duplicated": len(listed) - len(set(listed)),
        "lost": len(set(created) - set(listed)), "terminal": len(terminal),
        "succeeded": sum(s == "succeeded" for s in terminal.values()),
        "runs_per_job": sorted(set(attempts.values())), "wall_s": round(wall, 1), "requests": len(lat),
        "errors": len(errors), "p50_ms": round(1000 * statistics.median(lat), 1),
        "p99_ms": round(1000 * lat[int(0.99 * (len(lat) - 1))], 1), "max_ms": round(1000 * lat[-1], 1),
    }
    print(json.dumps(result))
    if errors:
        print("first errors:", errors[:3], file=sys.stderr)
    ok = result["terminal"] == args.jobs and not result["lost"] and not result["duplicated"] and \
        result["runs_per_job"] == [1]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
