"""Load benchmark for `tuneforge serve` (loopback only, bounded in requests and time).

    .venv/bin/python benchmarks/serve_load.py                       # quick MiniLM run, 32 clients
    .venv/bin/python benchmarks/serve_load.py --run RUN_DIR --clients 32 --requests 2000 --max-seconds 120
    # the server on CPU 0 and the clients on CPU 1, then both on CPU 0 (the probe's set-up):
    .venv/bin/python benchmarks/serve_load.py --server-cpus 0 --client-cpus 1 --setup separate --rounds 2
    .venv/bin/python benchmarks/serve_load.py --server-cpus 0 --client-cpus 0 --setup shared --rounds 2

For micro-batching on and then off, a server is started in its own process on a free
loopback port; ``--clients`` threads each send single-text ``POST /v1/predict`` requests
back to back until ``--requests`` are done or ``--max-seconds`` pass. Reported per mode:
requests/s, p50/p95/p99 latency, errors, and the mean model batch size (from the server's
own /metrics). Without ``--run`` a MiniLM linear-probe classifier is trained first on a few
dozen built-in sentences (throughput depends on the model, not on its accuracy).

Where the clients run matters as much as batching: the clients are Python threads doing
HTTP, and on a small machine they compete with the server for the same cores. So
``--server-cpus`` starts the server under ``taskset -c`` (with as many torch threads as it has
CPUs, unless ``--server-threads``) and ``--client-cpus`` pins this process, whose threads are
the clients. ``--rounds N`` alternates the two modes N times (a VM's speed drifts between
invocations). Every mode records the CPU model, the CPU time the server and the clients
used, and ``other_load``: the share of the machine's CPU that other processes took meanwhile.
"""

from __future__ import annotations

import argparse
import importlib.util
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

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


def cpu_list(value: str | None) -> list[int] | None:
    """'0', '0,1' or '0-3' -> [0], [0, 1], [0, 1, 2, 3] (taskset -c syntax)."""
    if not value:
        return None
    cpus = []
    for part in value.split(","):
        lo, _, hi = part.partition("-")
        cpus += list(range(int(lo), int(hi or lo) + 1))
    return cpus


def process_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(mode: str, run: Path, args) -> dict:
    port = _free_port()
    cmd = [sys.executable, "-m", "tuneforge", "serve", str(run), "--port", str(port), "--max-items", "64",
           "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms)]
    if mode == "one-by-one":
        cmd.append("--no-batching")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    server_cpus = cpu_list(args.server_cpus)
    if server_cpus:
        cmd = ["taskset", "-c", args.server_cpus, *cmd]
    threads = args.server_threads or (len(server_cpus) if server_cpus else None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
        busy0, server0, self0 = common.cpu_busy_s(), process_cpu_s(server.pid), time.process_time()
        t0 = time.perf_counter()
        result = load(port, args.clients, args.requests, args.max_seconds)
        wall = time.perf_counter() - t0
        busy1, server1, self1 = common.cpu_busy_s(), process_cpu_s(server.pid), time.process_time()
        calls1, inputs1 = batch_stats(port)
        result["mean_batch"] = round((inputs1 - inputs0) / max(calls1 - calls0, 1), 2)
        result["server_cpu_s"] = round(server1 - server0, 2)
        result["clients_cpu_s"] = round(self1 - self0, 2)
        if busy0 is not None and busy1 is not None:
            other = (busy1 - busy0) - (server1 - server0) - (self1 - self0)
            result["other_load"] = round(max(other, 0.0) / (wall * (os.cpu_count() or 1)), 3)
        result["server_threads"] = threads
    finally:
        server.terminate()
        server.wait(timeout=60)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=None, help="a text run directory (default: train a quick MiniLM one)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=1500, help="requests per mode (upper bound)")
    p.add_argument("--max-seconds", type=float, default=90, help="time bound per mode")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--server-cpus", default=None, help="run the server under taskset -c LIST (e.g. 0)")
    p.add_argument("--client-cpus", default=None, help="pin the client threads (this process) to LIST (e.g. 1)")
    p.add_argument("--server-threads", type=int, default=None,
                   help="torch threads of the server (default: its --server-cpus count, else torch's default)")
    p.add_argument("--rounds", type=int, default=1, help="alternate batching / one-by-one this many times")
    p.add_argument("--setup", default=None, help="a name for this set-up in the JSON (e.g. separate, shared)")
    p.add_argument("--wait-quiet", type=float, default=0,
                   help="before each mode, wait up to this many seconds until other work is below --busy-threshold")
    p.add_argument("--busy-threshold", type=float, default=0.15)
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    run = args.run or quick_run(work)  # trained before any pinning, on every core
    machine = common.machine_info()
    client_cpus = cpu_list(args.client_cpus)
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    print(f"{machine['cpu']}, {machine['cpu_count']} CPUs; server on CPUs {args.server_cpus or 'any'}, "
          f"clients on CPUs {args.client_cpus or 'any'}", flush=True)
    rounds = []
    for r in range(args.rounds):
        results = {}
        for mode in ("batching", "one-by-one"):
            quiet = common.wait_for_quiet(args.wait_quiet, args.busy_threshold) if args.wait_quiet else None
            results[mode] = res = measure(mode, run, args)
            res["other_load_before"] = None if quiet is None else round(quiet, 3)
            print(f"round {r + 1} {mode:>11}: {res['requests_per_s']:7.1f} req/s  p50 {res['p50_ms']:7.1f} ms  "
                  f"p95 {res['p95_ms']:7.1f} ms  p99 {res['p99_ms']:7.1f} ms  errors {res['errors']}  "
                  f"mean model batch {res['mean_batch']}  other load {res.get('other_load', float('nan')):.0%}",
                  flush=True)
        ratio = results["batching"]["requests_per_s"] / max(results["one-by-one"]["requests_per_s"], 1e-9)
        rounds.append({"results": results, "ratio": round(ratio, 2)})
        print(f"round {r + 1}: micro-batching / one-by-one throughput: {ratio:.2f}x at {args.clients} concurrent "
              f"clients (goal >= 3x, zero errors, p99 < 1 s)", flush=True)
    out = args.output or ROOT / "benchmarks" / "results" / f"serve-load-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "command": sys.argv,
                               "setup": args.setup, "machine": machine, "cpu": machine["cpu"], "run": str(run),
                               "tuneforge_src": str(Path(importlib.util.find_spec("tuneforge").origin).parent),
                               "cpu_count": os.cpu_count(), "server_cpus": cpu_list(args.server_cpus),
                               "client_cpus": client_cpus, "rounds": rounds,
                               # the first round under the old keys, for readers of earlier files
                               "results": rounds[0]["results"], "ratio": rounds[0]["ratio"]}, indent=2))
    print(out)


if __name__ == "__main__":
    main()
