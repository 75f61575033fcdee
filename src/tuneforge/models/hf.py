"""Load a Hugging Face text backbone from a local directory (or the local hub cache).

Nothing here downloads: a hub id only resolves when its snapshot is already in
the local cache (``local_files_only=True``). ``trust_remote_code`` is passed on
exactly as the caller gave it, never turned on by us.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import TuneforgeError
from .info import FAMILIES, LoadedModel, ModelInfo, check_groups, lora_targets_for, transformer_groups

# Text inputs longer than this cost quadratic attention time for little gain in
# classification; tasks may still lower it.
MAX_TEXT_LENGTH = 512


def _listing(path: Path, limit: int = 20) -> str:
    files = sorted(p.name for p in path.iterdir())
    more = f", ... ({len(files) - limit} more)" if len(files) > limit else ""
    return ", ".join(files[:limit]) + more if files else "(empty)"


def _weight_format(path: Path) -> str | None:
    """'safetensors', 'bin', or None when the directory carries no weights."""
    names = [p.name for p in path.iterdir()]
    if any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
        return "safetensors"
    if any(n.startswith("pytorch_model") and n.endswith((".bin", ".bin.index.json")) for n in names):
        return "bin"
    return None


def hf_cache_dir(name: str) -> Path | None:
    """The cached snapshot directory of hub id ``name``, or None; never touches the network."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=name, local_files_only=True))
    except Exception:  # not cached, or not a valid repo id at all
        return None


def _dtype_kwarg() -> str:
    # transformers renamed ``torch_dtype`` to ``dtype`` in 4.56 and made "auto"
    # the default in 5.x; we ask for float32 explicitly (precision is the engine's job).
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def load_hf(
    path: str | Path, *, label: str | None = None, trust_remote_code: bool = False, pretrained: bool = True,
    causal_lm: bool = False,
    load_in_4bit: bool = False,
) -> LoadedModel:
    """AutoModel + fast AutoTokenizer from a model directory.

    ``pretrained=False`` builds the architecture from ``config.json`` with random
    weights (used to rebuild a fine-tuned run whose weights come from elsewhere).
    """
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    if causal_lm:
        AutoModel = AutoModelForCausalLM  # noqa: N806 - the same calls, with the LM head
    path = Path(path).expanduser()
    label = label or str(path)
    if not path.is_dir():
        raise TuneforgeError(f"model directory {path} does not exist; set model.name to a Hugging Face model directory")
    if not (path / "config.json").is_file():
        raise TuneforgeError(
            f"{path} has no config.json, so it is not a Hugging Face model directory (it has: {_listing(path)}); "
            "save the model with model.save_pretrained(DIR) and set model.name to that directory"
        )
    fmt = _weight_format(path)
    if pretrained and fmt is None:
        raise TuneforgeError(
            f"{path} has no weight files (*.safetensors or pytorch_model.bin); it has: {_listing(path)}. "
            "Copy the weights next to config.json (model.save_pretrained(DIR, safe_serialization=True)), "
            "or set model.name to the directory that holds them"
        )
    quantized = _four_bit_kwargs() if load_in_4bit and pretrained else {}
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        if pretrained:
            model = AutoModel.from_pretrained(
                path,
                trust_remote_code=trust_remote_code,
                use_safetensors=(fmt == "safetensors"),  # never unpickle .bin when safetensors exist
                **{_dtype_kwarg(): torch.float32},
                **quantized,
            )
            if quantized:
                from peft import prepare_model_for_kbit_training

                # norms in fp32, input grads on: what peft's QLoRA recipe does before adding adapters
                model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        else:
            model = AutoModel.from_config(config, trust_remote_code=trust_remote_code).float()
    except (OSError, ValueError, KeyError) as e:
        hint = "" if trust_remote_code else " If the model needs custom code, set model.trust_remote_code: true."
        if causal_lm:
            hint = (" causal-lm and preference tasks need a decoder language model (Llama, Qwen, GPT-2, ...); "
                    "an encoder such as BERT belongs in a text-classification recipe." + hint)
        raise TuneforgeError(f"could not load the Hugging Face model in {path}: {e}.{hint}") from e
    model.eval()
    tokenizer = _load_tokenizer(path, trust_remote_code)
    if causal_lm:
        # the decoder and its vocabulary projection as separate parts (same modules, not copies),
        # so strategies see a backbone as for every other task
        lm, model = model, model.base_model
        info = text_info(model, tokenizer, source=label, config_dir=path.resolve(), trust_remote_code=trust_remote_code)
        info.spec["causal_lm"] = True
        return LoadedModel(backbone=model, info=info, tokenizer=tokenizer, lm_head=lm.get_output_embeddings(), lm=lm)
    info = text_info(model, tokenizer, source=label, config_dir=path.resolve(), trust_remote_code=trust_remote_code)
    return LoadedModel(backbone=model, info=info, tokenizer=tokenizer)


def _four_bit_kwargs() -> dict:
    """QLoRA loading (Dettmers et al. 2023): NF4 weights, double quantisation, bf16 compute."""
    import torch

    if not torch.cuda.is_available():
        raise TuneforgeError("model.load_in_4bit needs a CUDA GPU (bitsandbytes' 4-bit kernels are CUDA only); on "
                             "this machine set model.load_in_4bit: false and train LoRA on the bf16/fp32 model")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TuneforgeError("model.load_in_4bit needs bitsandbytes: pip install 'tuneforge[qlora]'") from None
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_use_double_quant=True,
                                                      bnb_4bit_compute_dtype=torch.bfloat16),
            "device_map": {"": torch.cuda.current_device()}}


def _load_tokenizer(path: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    fix = (
        f"{path} needs tokenizer files (tokenizer.json, or vocab.txt + tokenizer_config.json); "
        "save them there with tokenizer.save_pretrained(DIR)"
    )
    names = {p.name for p in path.iterdir()}
    known = {"tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
             "sentencepiece.bpe.model", "tokenizer.model"}
    if not names & known:
        raise TuneforgeError(f"no tokenizer found: {fix} (it has: {_listing(path)})")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # tokenizer loading raises many types (OSError, ValueError, TypeError)
        raise TuneforgeError(f"could not load the tokenizer: {e}; {fix}") from e
    if getattr(tok, "pad_token", None) is None and getattr(tok, "eos_token", None) is not None:
        # decoder tokenizers ship without a pad token; batching needs one and the
        # attention mask hides it anyway
        tok.pad_token = tok.eos_token
    return tok


def text_info(
    model,
    tokenizer=None,
    *,
    source: str = "",
    config_dir: str | Path | None = None,
    trust_remote_code: bool = False,
    family: str | None = None,
) -> ModelInfo:
    """``ModelInfo`` for a Hugging Face backbone; ``family`` overrides ``config.model_type``
    when picking the row of ``FAMILIES``."""
    config = model.config
    family = family or getattr(config, "model_type", None) or type(model).__name__.lower()
    path = Path(config_dir or getattr(config, "_name_or_path", "") or ".")
    meta = FAMILIES.get(family)
    groups = transformer_groups(model, meta.layers if meta else ())
    check_groups(model, groups)
    feature_dim = next(
        (getattr(config, k) for k in ("hidden_size", "d_model", "n_embd", "dim") if isinstance(getattr(config, k, None), int)),
        None,
    )
    if feature_dim is None:
        raise TuneforgeError(f"cannot tell the hidden size of the model from {path} (config has no hidden_size)")
    positions = next(
        (getattr(config, k) for k in ("max_position_embeddings", "n_positions") if isinstance(getattr(config, k, None), int)),
        MAX_TEXT_LENGTH,
    )
    tok_max = getattr(tokenizer, "model_max_length", MAX_TEXT_LENGTH) or MAX_TEXT_LENGTH
    return ModelInfo(
        family=family,
        modality="text",
        layer_groups=groups,
        feature_dim=int(feature_dim),
        lora_targets=lora_targets_for(model, family, groups),
        source=source or str(path),
        preprocessing={"max_length": int(min(positions, tok_max, MAX_TEXT_LENGTH))},
        spec={"kind": "hf", "config_dir": str(path), "model_type": getattr(config, "model_type", family),
              "trust_remote_code": bool(trust_remote_code)},
    )
