"""What a run depended on, written into its manifest: enough to repeat it, and an
honest list of what may still not repeat.

    packages        key versions (kept for a quick look) and ``lock``: every installed
                    distribution as ``name==version``, sorted (a pip-freeze-style lock)
    environment     Python, OS, CPU model and its bf16/AMX support, GPU, driver, CUDA,
                    cuDNN, torch threads
    seeds           which generators were seeded with what
    determinism     the settings actually in force (read back from torch, not the recipe)
    data, weights   sha256 of every data file and of the starting weights
    recipe          the resolved recipe, the recipe file's sha256, the command line
    git             commit and dirty state of the recipe's directory, when it is in a repository
    may_not_reproduce  [{what, why}]: bf16, non-deterministic kernels, threads, dirty tree ...
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path


def package_lock() -> list[str]:
    """Every installed distribution, ``name==version``, sorted case-insensitively."""
    seen = {}
    for dist in metadata.distributions():
        name = dist.metadata.get("Name")
        if name and name.lower() not in seen:
            seen[name.lower()] = f"{name}=={dist.version}"
    return [seen[k] for k in sorted(seen)]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device) -> dict:
    import torch

    from ..engine.precision import cpu_has_native_bf16

    env = {
        "python": sys.version.split()[0], "python_implementation": platform.python_implementation(),
        "os": platform.platform(), "kernel": platform.release(), "machine": platform.machine(),
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "cpu_native_bf16": cpu_has_native_bf16(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(), "device": str(device),
    }
    if torch.cuda.is_available():
        index = device.index if device.type == "cuda" and device.index is not None else 0
        env.update(gpu=torch.cuda.get_device_name(index), gpu_count=torch.cuda.device_count(),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), driver=_nvidia_driver(),
                   gpu_capability=".".join(map(str, torch.cuda.get_device_capability(index))))
    return env


def determinism() -> dict:
    """Read back from torch: what is in force, not what was asked for."""
    import torch

    return {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED"),
    }


def seeds(seed: int) -> dict:
    return {"python_random": seed, "numpy": seed % 2**32, "torch": seed, "data_order": seed,
            "validation_split": seed, "augmentation": f"per item from ({seed}, epoch, index)"}


def git_state(path: Path) -> dict | None:
    """Commit and dirty state of ``path``'s directory, or None outside a repository."""
    path = Path(path).resolve()
    folder = path if path.is_dir() else path.parent

    def git(*args) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None
    dirty = git("status", "--porcelain", "--", ".")
    return {"commit": commit, "directory": str(folder), "dirty": bool(dirty),
            "changed": dirty.splitlines()[:50] if dirty else []}


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")


def weight_files(recipe, source: str) -> list[Path]:
    """The files the starting weights were read from: model.weights, or the model directory
    (a path given as model.name, or the one an alias / cached hub name resolved to)."""
    if recipe.model.weights:
        return [Path(recipe.model.weights)]
    found = re.search(r"\(([^()]+)\)$", source or "")
    for candidate in ([found.group(1)] if found else []) + [recipe.model.name, source]:
        p = Path(candidate)
        if p.is_file():
            return [p]
        if p.is_dir():
            return sorted(f for f in p.iterdir() if f.suffix in _WEIGHT_SUFFIXES and f.is_file())
    return []


def weights_record(recipe, source: str, init_from: str | None) -> dict:
    from ..data.fingerprint import file_fingerprint

    out = {"source": source, "files": [file_fingerprint(f) for f in weight_files(recipe, source)]}
    if init_from:
        model_dir = Path(init_from) / "model"
        out["init_from"] = [file_fingerprint(f) for f in sorted(model_dir.glob("*.safetensors"))] or str(init_from)
    return out


def caveats(recipe, precision: str, device, det: dict, env: dict, git: dict | None) -> list[dict]:
    """The honest part: what may differ when this run is repeated, and why."""
    out = []
    if precision in ("bf16", "fp16"):
        out.append({"what": f"{precision} autocast", "why": (
            f"matmuls round their inputs to {precision} (8 mantissa bits for bf16); the result depends on "
            "the kernels this CPU/GPU and torch build choose, so another machine or library version changes "
            "the last bits, and a prediction near a decision boundary may flip. Use train.precision: fp32 and "
            "train.deterministic: true for bit-exact repeats")})
    if not det["deterministic_algorithms"]:
        out.append({"what": "non-deterministic kernels allowed", "why": (
            "train.deterministic is false: on GPU, kernels that add with atomics (index_add/scatter, embedding "
            "and some convolution backward passes) sum in a varying order; on CPU most kernels repeat for a "
            "fixed thread count but torch does not promise it")})
    elif det["deterministic_warn_only"]:
        out.append({"what": "deterministic mode is warn-only", "why": (
            "an operation without a deterministic implementation still runs (torch warns rather than stops), "
            "so such an operation may differ between repeats")})
    if env.get("torch_threads", 1) > 1:
        out.append({"what": f"{env['torch_threads']} torch threads", "why": (
            "parallel reductions split work by thread count, so a different thread count (or core count) "
            "changes the order of float additions; `tuneforge reproduce` sets the same count")})
    if device.type == "cuda":
        if det["cuda_matmul_allow_tf32"] or det["cudnn_allow_tf32"]:
            out.append({"what": "TF32 on GPU", "why": "fp32 matmuls/convolutions may run in TF32 (10-bit mantissa)"})
        if det["cudnn_benchmark"]:
            out.append({"what": "cudnn.benchmark", "why": "cuDNN times several algorithms and may pick another one next time"})
        out.append({"what": "GPU random streams", "why": (
            "CUDA's generator differs from the CPU's: the same seed gives other dropout masks on another device "
            "type, and other GPU models may pick other kernels")})
    workers = recipe.data.num_workers
    if recipe.task.type == "image-classification" and (workers is None or workers > 0):
        out.append({"what": "image loading in worker processes", "why": (
            "augmentation is seeded per item (seed, epoch, index), so worker scheduling does not change it; "
            "image decoding libraries (Pillow versions) may still decode a few pixels differently")})
    if git and git["dirty"]:
        out.append({"what": "uncommitted changes next to the recipe", "why": (
            f"{len(git['changed'])} file(s) in {git['directory']} differ from commit {git['commit'][:12]}; "
            "the recorded recipe is what ran, but the other files there may not be what is committed")})
    return out


def record(recipe, *, origin: str | None, argv, device, precision: str, source: str, init_from: str | None) -> dict:
    """The reproducibility block of the manifest (data fingerprints live in ``data``)."""
    env = environment(device)
    det = determinism()
    git = git_state(Path(origin)) if origin else None
    rec = {
        "lock": package_lock(), "environment": env, "seeds": seeds(recipe.train.seed), "determinism": det,
        "weights": weights_record(recipe, source, init_from), "recipe": recipe.dump(),
        "command": list(argv) if argv is not None else sys.argv, "git": git,
    }
    if origin and Path(origin).is_file():
        from ..data.fingerprint import file_fingerprint

        rec["recipe_file"] = file_fingerprint(origin)
    rec["may_not_reproduce"] = caveats(recipe, precision, device, det, env, git)
    return rec


def data_changes(manifest: dict) -> list[str]:
    """Data files whose content differs from what the run read (or that are gone)."""
    from ..data.fingerprint import file_fingerprint
    from ..errors import TuneforgeError

    changed = []
    for split, fp in (manifest.get("data") or {}).items():
        try:
            now = file_fingerprint(fp["path"])
        except (TuneforgeError, OSError):
            changed.append(f"{split}: {fp['path']} is gone")
            continue
        if now["sha256"] != fp["sha256"]:
            changed.append(f"{split}: {fp['path']} changed (sha256 {fp['sha256'][:12]} -> {now['sha256'][:12]})")
    return changed
