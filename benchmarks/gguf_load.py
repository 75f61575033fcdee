"""What an LLM alias costs to load: the one-time GGUF conversion, then the cached copy.

    nice -n 5 .venv/bin/python benchmarks/gguf_load.py [--alias smollm2-135m] [--later 3] [--direct]

Each measurement is its own subprocess with a fresh interpreter: ``first`` loads the alias into
an empty ``$TUNEFORGE_CACHE`` (a temporary folder, removed afterwards: the machine's own cache is
not touched), so it converts; ``later`` loads it again from the copy ``first`` made (sha256 of
every file verified, then ``from_pretrained`` on safetensors); ``--direct`` is transformers reading
the GGUF itself each time (what a load would cost without the cache). Each child reports the
seconds of its ``load_model`` call (imports excluded; they are reported apart), the share of that
spent in the cache lookup and checksum, and its own peak RSS (``ru_maxrss``). The load average
before and after and the CPU model go into the result file
(``benchmarks/results/gguf-load-<alias>-<stamp>.json``), because the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import torch, transformers  # noqa: F401
from tuneforge.models import load_model
from tuneforge.models import gguf_cache
imports = time.perf_counter() - t0
mode, alias = sys.argv[1], sys.argv[2]
spent = {"cache": 0.0}
real = gguf_cache.cached_model_dir
def timed(*a, **k):
    t = time.perf_counter(); out = real(*a, **k); spent["cache"] += time.perf_counter() - t; return out
gguf_cache.cached_model_dir = timed
t = time.perf_counter()
if mode == "direct":
    from transformers import AutoModelForCausalLM
    from tuneforge.models.aliases import smollm2_source
    path = smollm2_source().files[0]
    AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
else:
    load_model(alias, causal_lm=True)
seconds = time.perf_counter() - t
print("RESULT " + json.dumps({"mode": mode, "load_s": round(seconds, 2), "imports_s": round(imports, 2),
      "cache_lookup_and_checksum_s": round(spent["cache"], 2),
      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}), flush=True)
"""


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def run(mode: str, alias: str, cache: Path) -> dict:
    env = dict(os.environ, TUNEFORGE_CACHE=str(cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(ROOT / "src"), TQDM_DISABLE="1")
    before = loadavg()
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, alias], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    result.update(wall_s=round(wall, 2), loadavg_before=before, loadavg_after=loadavg())
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--alias", default="smollm2-135m")
    p.add_argument("--later", type=int, default=3, help="loads from the cached copy after the first")
    p.add_argument("--direct", action="store_true", help="also time transformers reading the GGUF (SmolLM2 only)")
    args = p.parse_args()
    if args.direct and args.alias != "smollm2-135m":
        raise SystemExit("--direct reads one GGUF file: only for smollm2-135m")
    cache = Path(tempfile.mkdtemp(prefix="tuneforge-gguf-bench-"))
    try:
        rows = [run("first", args.alias, cache)]
        rows += [run("later", args.alias, cache) for _ in range(args.later)]
        if args.direct:
            rows.append(run("direct", args.alias, cache))
        entry = next(p for p in (cache / "models").iterdir() if not p.name.startswith("."))
        manifest = json.loads((entry / "tuneforge-gguf.json").read_text())
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    out = {"alias": args.alias, "cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
           "conversion": manifest["conversion"], "versions": manifest["versions"],
           "weights_bytes": manifest["files"]["model.safetensors"]["size"], "rows": rows,
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    dest = ROOT / "benchmarks" / "results" / f"gguf-load-{args.alias}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(f"-> {dest}")


if __name__ == "__main__":
    main()
