"""``load_model``: turn ``model.name`` (+ source, weights, key_map) into a backbone.

Resolution for ``source="auto"``, first match wins:

1. a known alias (``known_aliases()``);
2. an existing directory with ``config.json`` -> Hugging Face; a GGUF file (llama.cpp) -> converted
   once to a Hugging Face directory in the cache (``gguf_cache``), then loaded from there;
3. a timm architecture name (``timm.list_models()``, optionally with a
   ``.pretrained_tag``) -> timm, weights from ``weights``;
4. a hub id already in the local Hugging Face cache -> Hugging Face.

Nothing is ever downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import TuneforgeError, suggest
from .aliases import ALIASES
from .info import LoadedModel

SOURCES = ("auto", "alias", "hf", "timm", "gguf")


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def _is_timm_arch(name: str) -> bool:
    # "efficientnet_lite0.ra_in1k" names an architecture plus a pretrained tag
    return name.split(".", 1)[0] in set(_timm_names())


def _unknown(name: str) -> TuneforgeError:
    aliases = ", ".join(sorted(ALIASES))
    hint = suggest(name, list(ALIASES) + _timm_names())
    return TuneforgeError(
        f"model '{name}' is not a known alias, a local directory, a timm architecture, or a model in the "
        f"local Hugging Face cache{hint}; known aliases: {aliases}. Set model.name to an alias, to a local "
        "directory holding a Hugging Face model (config.json + weights + tokenizer), to a local .gguf file, or to "
        "a timm architecture with model.weights pointing at a local weights file (tuneforge never downloads)"
    )


def load_model(
    name: str,
    *,
    source: str = "auto",
    weights: str | None = None,
    key_map: str | Callable | None = None,
    trust_remote_code: bool = False,
    pretrained: bool = True,
    causal_lm: bool = False,
    load_in_4bit: bool = False,
) -> LoadedModel:
    """Load a backbone without its head, plus its ``ModelInfo`` (and tokenizer for text).

    ``weights``/``key_map`` apply to timm architectures only (see ``timm_loader``).
    ``pretrained=False`` builds the same architecture with random weights.
    """
    from .hf import hf_cache_dir, load_hf
    from .timm_loader import load_timm

    if source not in SOURCES:
        raise TuneforgeError(f"unknown model.source '{source}'{suggest(source, SOURCES)}; use one of {', '.join(SOURCES)}")
    name = str(name)
    if source == "auto":
        source = _resolve_source(name)

    llm_alias = source == "alias" and name in ALIASES and ALIASES[name].is_llm
    if load_in_4bit and (source == "timm" or (source == "alias" and not llm_alias)):
        raise TuneforgeError(f"model.load_in_4bit applies to Hugging Face language models, not to '{name}'")
    if causal_lm and (source == "timm" or (source == "alias" and not llm_alias)):
        llms = ", ".join(n for n, a in ALIASES.items() if a.is_llm)
        raise TuneforgeError(
            f"'{name}' is not a causal language model; causal-lm and preference tasks need a decoder (Llama, Qwen, "
            f"GPT-2, ...): set model.name to an LLM alias ({llms}), a local Hugging Face directory or a .gguf file")
    if source == "timm":
        return load_timm(name, weights=weights, key_map=key_map, pretrained=pretrained)

    for field, value in (("model.weights", weights), ("model.key_map", key_map)):
        if value is not None:
            raise TuneforgeError(
                f"{field} only applies to timm architectures, but '{name}' is loaded as {source}: "
                f"remove {field} (this model carries its own weights)"
            )
    if source == "alias":
        if name not in ALIASES:
            raise TuneforgeError(
                f"unknown model alias '{name}'{suggest(name, ALIASES)}; known aliases: {', '.join(sorted(ALIASES))}"
            )
        if ALIASES[name].is_llm:
            return ALIASES[name].load(name, pretrained, causal_lm=causal_lm, load_in_4bit=load_in_4bit)
        return ALIASES[name].load(name, pretrained)
    if source == "gguf":
        return load_gguf_file(name, trust_remote_code=trust_remote_code, pretrained=pretrained, causal_lm=causal_lm,
                              load_in_4bit=load_in_4bit)
    # source == "hf": a directory, else a hub id that must already be cached
    path = Path(name).expanduser()
    if not path.exists():
        cached = hf_cache_dir(name)
        if cached is None:
            raise TuneforgeError(
                f"'{name}' is neither a local directory nor in the local Hugging Face cache, and tuneforge "
                "never downloads: set model.name to a directory holding config.json, the weights and the tokenizer"
            )
        return load_hf(cached, label=f"hf cache '{name}' ({cached})", trust_remote_code=trust_remote_code,
                       pretrained=pretrained, causal_lm=causal_lm, load_in_4bit=load_in_4bit)
    return load_hf(path, trust_remote_code=trust_remote_code, pretrained=pretrained, causal_lm=causal_lm,
                   load_in_4bit=load_in_4bit)


def _resolve_source(name: str) -> str:
    from .hf import hf_cache_dir

    if name in ALIASES:
        return "alias"
    path = Path(name).expanduser()
    if path.is_dir():
        return "hf"  # load_hf explains what a directory without config.json lacks
    if path.is_file():
        from .gguf_import import is_gguf

        if is_gguf(path) or path.suffix.lower() == ".gguf":
            return "gguf"  # a .gguf that is not one gets its own error when it loads
        raise TuneforgeError(
            f"model.name '{name}' is a file but not a GGUF one; for a timm model set model.name to its architecture "
            "(e.g. efficientnet_lite0) and model.weights to this file; for a Hugging Face model "
            "set model.name to the directory that holds config.json"
        )
    if _is_timm_arch(name):
        return "timm"
    if hf_cache_dir(name) is not None:
        return "hf"
    raise _unknown(name)


def load_gguf_file(name: str, *, trust_remote_code: bool = False, pretrained: bool = True, causal_lm: bool = False,
                   load_in_4bit: bool = False) -> LoadedModel:
    """A local GGUF file: checked (magic, architecture, tokenizer), converted once into the cache, loaded."""
    from .gguf_cache import GgufSource, cached_model_dir
    from .gguf_import import check_readable, read_header
    from .hf import load_hf

    path = Path(name).expanduser()
    if not path.is_file():
        raise TuneforgeError(f"GGUF file {path} does not exist; set model.name to the path of a .gguf file")
    check_readable(read_header(path))
    directory = cached_model_dir(GgufSource.file(path))
    loaded = load_hf(directory, label=f"GGUF {path.resolve()} (converted: {directory})",
                     trust_remote_code=trust_remote_code, pretrained=pretrained, causal_lm=causal_lm,
                     load_in_4bit=load_in_4bit)
    loaded.info.spec["gguf_source"] = str(path.resolve())
    return loaded


def from_spec(spec: dict, *, trust_remote_code: bool | None = None) -> LoadedModel:
    """Rebuild the architecture recorded in ``ModelInfo.spec`` with random weights
    (the caller then loads its fine-tuned state dict). A model converted from GGUF whose cached
    copy is gone is converted again from its alias or file."""
    kind = spec.get("kind")
    if kind == "hf" and spec.get("gguf_source") and not Path(spec["config_dir"]).is_dir():
        return load_model(spec["gguf_source"], pretrained=False)
    if kind == "timm":
        return load_model(spec["arch"], source="timm", pretrained=False)
    if kind == "hf":
        trc = spec.get("trust_remote_code", False) if trust_remote_code is None else trust_remote_code
        return load_model(spec["config_dir"], source="hf", pretrained=False, trust_remote_code=trc)
    raise TuneforgeError(f"model spec has unknown kind {kind!r}; expected 'hf' or 'timm' (spec: {spec})")


def build_model_info(backbone, family_hint: str | None = None, *, tokenizer=None, source: str = ""):
    """``ModelInfo`` for a backbone built elsewhere (an HF ``PreTrainedModel`` or a timm
    model); ``family_hint`` picks the ``FAMILIES`` row when the class name is not enough."""
    if hasattr(backbone, "config") and hasattr(backbone.config, "model_type"):
        from .hf import text_info

        return text_info(backbone, tokenizer, source=source, family=family_hint)
    if hasattr(backbone, "pretrained_cfg") and hasattr(backbone, "num_features"):
        from .timm_loader import timm_info

        arch = backbone.pretrained_cfg.get("architecture") or type(backbone).__name__
        return timm_info(backbone, arch, source or f"timm:{arch}", family=family_hint)
    raise TuneforgeError(
        f"cannot describe a {type(backbone).__name__}: tuneforge knows Hugging Face and timm backbones; "
        "load the model with tuneforge.models.load_model"
    )
