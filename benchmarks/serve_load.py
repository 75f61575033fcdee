"""Load benchmark for `tuneforge serve` (loopback only, bounded in requests and time).

    .venv/bin/python benchmarks/serve_load.py                       # quick MiniLM run, 32 clients
    .venv/bin/python benchmarks/serve_load.py --run RUN_DIR --clients 32 --requests 2000 --max-seconds 120

For micro-batching on and then off, a server is started in its own process on a free
loopback port; ``--clients`` threads each send single-text ``POST /v1/predict`` requests
back to back until ``--requests`` are done or ``--max-seconds`` pass. Reported per mode:
requests/s, p50/p95/p99 latency, errors, and the mean model batch size (from the server's
own /metrics). Without ``--run`` a MiniLM linear-probe classifier is trained first on a few
dozen built-in sentences (throughput depends on the model, not on its accuracy).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SENTENCES = [
    "a gripping, beautifully acted film", "dull and far too long", "the best thing i have seen all year",
    "a mess from start to finish", "warm, funny and surprisingly moving", "i walked out halfway through",
    "an unforgettable performance by the lead", "the plot makes no sense at all", "charming and clever",
    "boring", "a triumph", "predictable, flat and lifeless", "it will make you laugh and cry",
    "a waste of a talented cast", "sharp writing and great pacing", "painfully slow",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quick_run(workdir: Path) -> Path:
    data = workdir / "train.csv"
    rows = [(s, int(i % 2 == 0)) for i, s in enumerate(SENTENCES * 4)]
    data.write_text("text,label\n" + "\n".join(f'"{t}",{y}' for t, y in rows) + "\n")
    run = workdir / "run"
    cmd = [sys.executable, "-m", "tuneforge", "train", str(ROOT / "recipes" / "sst2-minilm.yaml"),
           "--set", f"data.train={data}", "--set", "data.validation=null", "--set", "data.validation_split=0.25",
           "--set", "data.text_column=text", "--set", "data.label_column=label", "--set", "data.max_train_rows=null",
           "--set", "strategy.name=linear-probe", "--set", "train.epochs=1", "--set", "train.progress=false",
           "--set", "output.report=false", "--output", str(run)]
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
    return run


def load(port: int, clients: int, requests: int, max_seconds: float) -> dict:
    import httpx

    latencies, errors, lock = [], [], threading.Lock()
    remaining = [requests]
    stop_at = time.perf_counter() + max_seconds

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            while time.perf_counter() < stop_at:
                with lock:
                    if remaining[0] <= 0:
                        return
                    remaining[0] -= 1
                t0 = time.perf_counter()
                try:
                    r = http.post("/v1/predict", json={"inputs": [rng.choice(SENTENCES)]})
                    ok = r.status_code == 200
                except httpx.HTTPError as err:
                    ok, r = False, err
                with lock:
                    (latencies if ok else errors).append(time.perf_counter() - t0 if ok else str(r))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [float("nan")] * 99
    return {"requests_ok": len(latencies), "errors": len(errors), "first_errors": errors[:3], "wall_s": round(wall, 2),
            "requests_per_s": round(len(latencies) / wall, 1), "p50_ms": round(q[49] * 1000, 1),
            "p95_ms": round(q[94] * 1000, 1), "p99_ms": round(q[98] * 1000, 1)}


def batch_stats(port: int) -> tuple[float, float]:
    """(model calls, inputs) so far, from the server's own Prometheus metrics."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    get = lambda name: sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))  # noqa: E731
    return get("tuneforge_batch_size_count"), get("tuneforge_batch_size_sum")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=None, help="a text run directory (default: train a quick MiniLM one)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=1500, help="requests per mode (upper bound)")
    p.add_argument("--max-seconds", type=float, default=90, help="time bound per mode")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    run = args.run or quick_run(work)
    results = {}
    for mode in ("batching", "one-by-one"):
        port = _free_port()
        cmd = [sys.executable, "-m", "tuneforge", "serve", str(run), "--port", str(port), "--max-items", "64",
               "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms)]
        if mode == "one-by-one":
            cmd.append("--no-batching")
        server = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            import httpx

            for _ in range(600):
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            load(port, 4, 40, 30)  # warm-up, not counted
            calls0, inputs0 = batch_stats(port)
            results[mode] = load(port, args.clients, args.requests, args.max_seconds)
            calls1, inputs1 = batch_stats(port)
            results[mode]["mean_batch"] = round((inputs1 - inputs0) / max(calls1 - calls0, 1), 2)
        finally:
            server.terminate()
            server.wait(timeout=60)
        r = results[mode]
        print(f"{mode:>11}: {r['requests_per_s']:7.1f} req/s  p50 {r['p50_ms']:7.1f} ms  p95 {r['p95_ms']:7.1f} ms  "
              f"p99 {r['p99_ms']:7.1f} ms  errors {r['errors']}  mean model batch {r['mean_batch']}", flush=True)
    ratio = results["batching"]["requests_per_s"] / max(results["one-by-one"]["requests_per_s"], 1e-9)
    print(f"micro-batching / one-by-one throughput: {ratio:.2f}x at {args.clients} concurrent clients "
          f"(goal >= 3x, zero errors, p99 < 1 s)")
    out = args.output or ROOT / "benchmarks" / "results" / f"serve-load-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "run": str(run),
                               "cpu_count": os.cpu_count(), "results": results, "ratio": round(ratio, 2)}, indent=2))
    print(out)


if __name__ == "__main__":
    main()
