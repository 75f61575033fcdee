"""A GGUF file (llama.cpp's format) -> a plain Hugging Face safetensors directory.

Transformers reads GGUF itself (``from_pretrained(dir, gguf_file=...)``, with the ``gguf`` and
``accelerate`` packages) and dequantises every tensor to fp32. What it loads cannot be saved
(``save_pretrained`` refuses: "quantized with gguf and is not serializable"), so
:func:`convert_gguf` rebuilds a clean model from the same config without its
``quantization_config``, loads the state dict into it, ties the embeddings only where the file
has no separate ``output.weight``, and saves that with its tokenizer (the chat template
embedded in the file included). Before it returns it reloads what it wrote and checks that its
next-token logits on a probe prompt equal those of the model transformers read from the GGUF.
``models/gguf_cache.py`` decides when to convert and where the copy lives.

:func:`read_header` is our own reader of the file's header. ``gguf.GGUFReader`` (the library's)
maps every array element as its own numpy view and took 5.4 s on SmolLM2-135M's 98 MB file
(49,152 tokens and 48,900 merges) on the 2-core EPYC here; the checks that must run before a
one-minute conversion (is it GGUF at all, which architecture, is there a tokenizer) need only
the scalar keys and the tensor names, which this reads in milliseconds, skipping arrays.
"""

from __future__ import annotations

import copy
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TuneforgeError

MAGIC = b"GGUF"
# GGUF value types (gguf spec, "gguf_metadata_value_type"): struct format of the scalars.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# The prompt whose logits the conversion compares (and records, for the tests and later checks).
PROBE_TEXT = "The capital of France is Paris. What is 12 + 30? The answer is"


@dataclass
class GgufHeader:
    """What the header of a GGUF file says: scalar metadata, array lengths, tensor names and types."""

    path: Path
    version: int
    metadata: dict = field(default_factory=dict)  # scalars and strings; arrays as {"array": length}
    tensors: dict = field(default_factory=dict)  # name -> ggml type id

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def chat_template(self) -> str | None:
        value = self.metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) else None

    @property
    def tokenizer_model(self) -> str | None:
        value = self.metadata.get("tokenizer.ggml.model")
        return value if isinstance(value, str) else None

    def type_names(self) -> str:
        """The tensor types in the file, most frequent first (e.g. ``Q4_1 ×211, F32 ×61``)."""
        counts: dict[int, int] = {}
        for t in self.tensors.values():
            counts[t] = counts.get(t, 0) + 1
        return ", ".join(f"{_type_name(t)} ×{n}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _type_name(ggml_type: int) -> str:
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(ggml_type).name
    except (ImportError, ValueError):
        return f"type {ggml_type}"


def is_gguf(path: str | Path) -> bool:
    """Does the file start with the GGUF magic bytes?"""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


class _Cursor:
    def __init__(self, f, size: int, path: Path):
        self.f, self.size, self.path = f, size, path

    def take(self, fmt: str):
        n = struct.calcsize(fmt)
        raw = self.f.read(n)
        if len(raw) != n:
            raise TuneforgeError(f"{self.path} ends inside its GGUF header (truncated or damaged file); "
                                 "copy or download it again")
        return struct.unpack(fmt, raw)[0]

    def string(self) -> str:
        n = self.take("<Q")
        if n > self.size:
            raise TuneforgeError(f"{self.path}: a GGUF header string claims {n} bytes, more than the file holds "
                                 "(damaged file); copy or download it again")
        return self.f.read(n).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        self.f.seek(self.take("<Q"), 1)

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.take("<I"), self.take("<Q")
            if count > self.size:
                raise TuneforgeError(f"{self.path}: a GGUF array claims {count} items (damaged file)")
            if item in _SCALARS:
                self.f.seek(struct.calcsize(_SCALARS[item]) * count, 1)
            elif item == _STRING:
                for _ in range(count):
                    self.skip_string()
            else:  # arrays of arrays: read each element's header
                for _ in range(count):
                    self.value(item)
            return {"array": count}
        raise TuneforgeError(f"{self.path}: unknown GGUF value type {kind} (damaged file, or a GGUF version newer "
                             "than this reader); re-export it with a current llama.cpp")


def read_header(path: str | Path) -> GgufHeader:
    """The header of a GGUF file, or a :class:`TuneforgeError` saying what the file is instead."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
        if head != MAGIC:
            raise TuneforgeError(
                f"{path} is not a GGUF file (it starts with {head!r}, a GGUF starts with b'GGUF'); model.name may be "
                "a .gguf file from llama.cpp, a model directory (config.json + weights + tokenizer), an alias (see "
                "`tuneforge models`) or a timm architecture with model.weights set to this file")
        cur = _Cursor(f, size, path)
        version = cur.take("<I")
        if version not in (2, 3):
            raise TuneforgeError(f"{path} is GGUF version {version}; transformers reads versions 2 and 3: convert it "
                                 "again with a current llama.cpp (convert_hf_to_gguf.py)")
        n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
        if n_tensors > size or n_kv > size:
            raise TuneforgeError(f"{path}: the GGUF header claims {n_tensors} tensors and {n_kv} keys (damaged file)")
        header = GgufHeader(path, version)
        for _ in range(n_kv):
            key = cur.string()
            header.metadata[key] = cur.value(cur.take("<I"))
        for _ in range(n_tensors):
            name = cur.string()
            cur.f.seek(8 * cur.take("<I"), 1)  # the dimensions
            header.tensors[name] = cur.take("<I")
            cur.take("<Q")  # offset
    return header


def supported_architectures() -> list[str]:
    """GGUF architectures this transformers version reads (both its loaders), as llama.cpp names them."""
    names: set[str] = set()
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        names.update(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
    except ImportError:
        pass
    try:  # transformers >= 5.x: the loader that keeps blocks packed has its own table
        from transformers.integrations.gguf import GGUF_ARCHS

        names.update(GGUF_ARCHS)
    except ImportError:
        pass
    return sorted(names)


def check_readable(header: GgufHeader) -> None:
    """Refuse, before any conversion, a file transformers cannot turn into a model and tokenizer."""
    path, arch = header.path, header.architecture
    if not arch:
        raise TuneforgeError(f"{path} has no general.architecture key, so nothing can tell which model it holds; "
                             "re-export it with a current llama.cpp")
    supported = supported_architectures()
    # transformers maps llama.cpp's names with underscores/dashes as it reads (qwen2moe -> qwen2_moe)
    if supported and arch not in supported and arch.replace("-", "_") not in supported \
            and arch.replace("moe", "_moe") not in supported:
        raise TuneforgeError(
            f"{path} holds a '{arch}' model, which transformers cannot read from GGUF (it reads: {', '.join(supported)}); "
            "use a GGUF of one of those, or the original Hugging Face directory of the model as model.name")
    if header.tokenizer_model is None or not header.metadata.get("tokenizer.ggml.tokens"):
        raise TuneforgeError(
            f"{path} carries no tokenizer (no tokenizer.ggml.model / tokenizer.ggml.tokens keys), and tuneforge needs "
            "one to read text; use a GGUF written with its tokenizer (llama.cpp's convert_hf_to_gguf.py embeds it), "
            "or the original Hugging Face directory as model.name")


def _gguf_kwargs() -> dict:
    """Ask for a dense model: transformers >= 5.x keeps blocks packed when a matmul kernel exists, and a
    packed model is neither trainable nor what we save."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantise
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, *, header: GgufHeader | None = None,
                 log: Callable[[str], None] = print) -> dict:
    """Write the model and tokenizer of ``gguf_path`` into ``out_dir`` (created) as fp32 safetensors.

    Returns what was measured: timings, the logit check, and the probe (input ids and the logits of
    the model as transformers read it from the GGUF, saved as ``probe.safetensors`` in ``out_dir``)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    header = header or read_header(gguf_path)
    check_readable(header)
    out_dir.mkdir(parents=True, exist_ok=True)
    where = dict(pretrained_model_name_or_path=str(gguf_path.parent), gguf_file=gguf_path.name)
    t0 = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(**where)
        log(f"  [1/4] reading and dequantising {len(header.tensors)} tensors ({header.type_names()}) ...")
        source = AutoModelForCausalLM.from_pretrained(**where, **{_dtype_kwarg(): torch.float32}, **_gguf_kwargs())
    except ImportError as e:
        raise TuneforgeError(f"reading GGUF needs the packages gguf and accelerate: pip install 'tuneforge[gguf]' "
                             f"({e})") from e
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as e:
        raise TuneforgeError(f"transformers could not read {gguf_path} ({header.architecture}, {header.type_names()}): "
                             f"{e}; use the model's Hugging Face directory instead, or a GGUF of another quantisation")
    source.eval()
    t_read = time.perf_counter() - t0
    log(f"  [1/4] read in {t_read:.1f} s")

    t1 = time.perf_counter()
    config = copy.deepcopy(source.config)  # the GGUF model keeps its own (it computes the probe below)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the copy is a plain fp32 model
    config.tie_word_embeddings = "output.weight" not in header.tensors  # llama.cpp writes output.weight iff untied
    clean = AutoModelForCausalLM.from_config(config).float()
    result = clean.load_state_dict(source.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise TuneforgeError(f"{gguf_path}: the weights transformers read do not fit a clean {type(clean).__name__} "
                             f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}); this GGUF cannot be "
                             "converted by this transformers version — use the model's Hugging Face directory")
    if config.tie_word_embeddings:
        clean.tie_weights()
    clean.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    del clean
    t_write = time.perf_counter() - t1
    log(f"  [2/4] wrote a clean {type(source).__name__} and its tokenizer in {t_write:.1f} s")

    # The check: the copy, loaded the way every later load will load it, against the GGUF's model.
    t2 = time.perf_counter()
    written = AutoModelForCausalLM.from_pretrained(out_dir, use_safetensors=True,
                                                   **{_dtype_kwarg(): torch.float32}).eval()
    reloaded_tok = AutoTokenizer.from_pretrained(out_dir)
    ids = torch.tensor([tokenizer(PROBE_TEXT)["input_ids"]])
    with torch.no_grad():
        expected, got = source(input_ids=ids).logits[0].float(), written(input_ids=ids).logits[0].float()
    diff = float((expected - got).abs().max())
    if not torch.equal(expected, got):
        raise TuneforgeError(f"converting {gguf_path}: the written copy's logits differ from the GGUF model's by up to "
                             f"{diff:.3g} on a probe prompt, so the conversion is wrong for this file "
                             f"({header.architecture}); nothing was cached. Use the model's Hugging Face directory")
    template = header.chat_template
    if template is not None and reloaded_tok.chat_template != template:
        raise TuneforgeError(f"converting {gguf_path}: the chat template embedded in the file did not survive saving "
                             "the tokenizer; nothing was cached. Please report this with your transformers version")
    if reloaded_tok(PROBE_TEXT)["input_ids"] != ids[0].tolist():
        raise TuneforgeError(f"converting {gguf_path}: the saved tokenizer splits text differently from the GGUF's; "
                             "nothing was cached. Use the model's Hugging Face directory")
    save_file({"input_ids": ids[0].contiguous(), "logits": expected.contiguous()}, str(out_dir / "probe.safetensors"))
    t_check = time.perf_counter() - t2
    log(f"  [3/4] checked: the copy's logits on a probe prompt equal the GGUF model's (max |diff| {diff:.1g}); "
        f"chat template {'kept' if template else 'none in the file'} ({t_check:.1f} s)")
    params = sum(p.numel() for p in written.parameters())
    return {"read_s": round(t_read, 2), "write_s": round(t_write, 2), "check_s": round(t_check, 2),
            "architecture": header.architecture, "model_type": config.model_type, "parameters": params,
            "tied_embeddings": bool(config.tie_word_embeddings), "tensor_types": header.type_names(),
            "chat_template": template is not None, "probe_max_abs_diff": diff}


def _dtype_kwarg() -> str:
    from .hf import _dtype_kwarg as kwarg

    return kwarg()
