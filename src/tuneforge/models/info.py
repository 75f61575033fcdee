"""What tuneforge knows about a backbone: ``ModelInfo`` and the per-family table.

Everything architecture-specific lives in ``FAMILIES`` (fastai's ``model_meta``,
PEFT's target-module mapping): strategies never special-case a model, they read
``ModelInfo.layer_groups`` and ``ModelInfo.lora_targets``. A family missing from
the table still works through generic fallbacks (largest ``nn.ModuleList`` of
blocks; every Linear/Conv leaf inside the blocks as a LoRA target).

Layer groups are lists of *names*. Almost always these are module names from
``backbone.named_modules()``; when a module holds parameters directly *and* has
children that belong to other groups (timm ViT keeps ``cls_token``/``pos_embed``
on the root), the direct parameters are listed by their parameter name instead.
Use :func:`group_param_names` to turn groups into parameter names rather than
calling ``get_submodule`` on every entry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass
class ModelInfo:
    """Facts about a loaded backbone that tasks and strategies need."""

    family: str  # "bert", "efficientnet", "vit", ... or the HF model_type / timm class as fallback
    modality: str  # "text" or "image"
    layer_groups: list[list[str]]  # stem -> top, head excluded; every backbone param in exactly one group
    feature_dim: int  # size of the pooled feature vector the head receives
    lora_targets: list[str]  # module-name suffixes for peft ``target_modules`` (Linear / Conv only)
    source: str  # human-readable origin: alias, directory or file
    preprocessing: dict = field(default_factory=dict)  # JSON-serialisable input recipe
    spec: dict = field(default_factory=dict)  # JSON-serialisable recipe to rebuild the architecture


@dataclass
class LoadedModel:
    """A backbone (no task head), what we know about it, and its tokenizer (text only)."""

    backbone: nn.Module
    info: ModelInfo
    tokenizer: Any | None = None
    # causal LMs (``load_model(..., causal_lm=True)``): the output projection to the vocabulary
    # and the whole Hugging Face ``*ForCausalLM`` module whose parts ``backbone``/``lm_head`` are
    lm_head: nn.Module | None = None
    lm: nn.Module | None = None


@dataclass(frozen=True)
class Family:
    """Per-family facts. ``layers``: dotted paths of the block ModuleList, tried in order
    (text models; timm models group themselves via ``group_matcher``).

    ``attn_out`` / ``mlp_out``: module-name suffixes of each block's attention-output and
    MLP-output projections, where bottleneck adapters go (Houlsby: both; Pfeiffer: MLP
    only). A module matching ``attn_out`` is never taken as an MLP output, so BERT's
    ``output.dense`` does not also catch ``attention.output.dense``.
    ``ia3_targets``: modules whose *output* IA3 rescales (keys and values); the MLP
    outputs are IA3's feed-forward modules (their *input* is rescaled, IA3 paper §3).
    ``unused``: backbone modules a task never calls (BERT's pooler: our classifier pools
    the token features itself), kept frozen so no strategy reports them as trained.
    """

    modality: str
    lora_targets: tuple[str, ...]
    layers: tuple[str, ...] = ()
    attn_out: tuple[str, ...] = ()
    mlp_out: tuple[str, ...] = ()
    ia3_targets: tuple[str, ...] = ()
    unused: tuple[str, ...] = ()


_BERT_LORA = ("query", "key", "value", "dense")
_DECODER_LORA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_BERT_PEFT = dict(attn_out=("attention.output.dense",), mlp_out=("output.dense",), ia3_targets=("key", "value"),
                  unused=("pooler",))
_DECODER_PEFT = dict(attn_out=("self_attn.o_proj",), mlp_out=("mlp.down_proj",), ia3_targets=("k_proj", "v_proj"))

# The one table of architecture facts. Keys are HF ``config.model_type`` values or
# the names ``timm_family`` derives from timm model classes.
FAMILIES: dict[str, Family] = {
    # --- text encoders (HF AutoModel) ---
    "bert": Family("text", _BERT_LORA, ("encoder.layer",), **_BERT_PEFT),
    "roberta": Family("text", _BERT_LORA, ("encoder.layer",), **_BERT_PEFT),
    "xlm-roberta": Family("text", _BERT_LORA, ("encoder.layer",), **_BERT_PEFT),
    "camembert": Family("text", _BERT_LORA, ("encoder.layer",), **_BERT_PEFT),
    "electra": Family("text", _BERT_LORA, ("encoder.layer",), **_BERT_PEFT),
    "distilbert": Family("text", ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"), ("transformer.layer",),
                         attn_out=("attention.out_lin",), mlp_out=("ffn.lin2",), ia3_targets=("k_lin", "v_lin")),
    "deberta": Family("text", ("in_proj", "dense"), ("encoder.layer",), **_BERT_PEFT),
    "deberta-v2": Family("text", ("query_proj", "key_proj", "value_proj", "dense"), ("encoder.layer",),
                         **{**_BERT_PEFT, "ia3_targets": ("key_proj", "value_proj")}),
    "mpnet": Family("text", ("q", "k", "v", "o", "dense"), ("encoder.layer",),
                    attn_out=("attention.attn.o",), mlp_out=("output.dense",), ia3_targets=("k", "v"),
                    unused=("pooler",)),
    # --- decoders (AutoModel gives the bare transformer) ---
    "gpt2": Family("text", ("c_attn", "c_proj", "c_fc"), ("h",),
                   attn_out=("attn.c_proj",), mlp_out=("mlp.c_proj",), ia3_targets=("c_attn",)),
    "llama": Family("text", _DECODER_LORA, ("layers",), **_DECODER_PEFT),
    "mistral": Family("text", _DECODER_LORA, ("layers",), **_DECODER_PEFT),
    "qwen2": Family("text", _DECODER_LORA, ("layers",), **_DECODER_PEFT),
    # --- image backbones (timm) ---
    # 1x1 convs only for EfficientNet: LoRA on depthwise / "same"-padded strided convs
    # would not reproduce the base conv's padding. Its "MLP output" is each inverted
    # residual's 1x1 projection (conv_pwl); adapters there act on channels.
    "efficientnet": Family("image", ("conv_pw", "conv_pwl", "conv_head"), mlp_out=("conv_pwl",),
                           ia3_targets=("conv_pw",)),
    "resnet": Family("image", ("conv1", "conv2", "conv3"), mlp_out=("conv3",), ia3_targets=("conv1",)),
    "vit": Family("image", ("qkv", "proj", "fc1", "fc2"), attn_out=("attn.proj",), mlp_out=("mlp.fc2",),
                  ia3_targets=("qkv",)),
    "convnext": Family("image", ("fc1", "fc2"), mlp_out=("mlp.fc2",)),
}

# timm model class -> family key above.
_TIMM_CLASS_FAMILY = {
    "EfficientNet": "efficientnet",
    "ResNet": "resnet",
    "VisionTransformer": "vit",
    "ConvNeXt": "convnext",
}


def timm_family(model: nn.Module) -> str:
    """Family name for a timm model: table name for known classes, else the class name."""
    name = type(model).__name__
    return _TIMM_CLASS_FAMILY.get(name, name.lower())


# ---------------------------------------------------------------------------
# layer groups


def cover_groups(model: nn.Module, group_of: Mapping[str, int]) -> list[list[str]]:
    """Compress a ``param name -> group index`` map into the fewest names per group.

    Walk modules top-down: a module whose parameters all fall in one group is named
    whole; a mixed module is descended into, and its direct parameters are named
    one by one. Groups come back ordered by index, empty ones dropped.
    """
    groups: dict[int, list[str]] = {}

    def params_under(prefix: str) -> list[str]:
        return [n for n in group_of if n.startswith(prefix)]

    def visit(module: nn.Module, name: str) -> None:
        prefix = f"{name}." if name else ""
        owned = {group_of[n] for n in params_under(prefix)}
        if len(owned) == 1 and name:
            groups.setdefault(owned.pop(), []).append(name)
            return
        for pname, _ in module.named_parameters(recurse=False):
            full = prefix + pname
            if full in group_of:
                groups.setdefault(group_of[full], []).append(full)
        for cname, child in module.named_children():
            if params_under(f"{prefix}{cname}."):
                visit(child, prefix + cname)

    visit(model, "")
    return [groups[k] for k in sorted(groups)]


def group_param_names(backbone: nn.Module, layer_groups: list[list[str]]) -> list[list[str]]:
    """Parameter names of each layer group (entries may be module or parameter names)."""
    names = [n for n, _ in backbone.named_parameters()]
    out = []
    for group in layer_groups:
        out.append([n for n in names if any(n == e or n.startswith(e + ".") for e in group)])
    return out


def find_layer_list(model: nn.Module, paths: tuple[str, ...] = ()) -> tuple[str, nn.ModuleList] | None:
    """The ModuleList of transformer blocks: a path from the family table, else the
    ModuleList holding the most parameters (the generic fallback)."""
    for path in paths:
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList) and len(mod):
            return path, mod
    best, best_n = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod):
            n = sum(p.numel() for p in mod.parameters())
            if n > best_n:
                best, best_n = (name, mod), n
    return best


def transformer_groups(model: nn.Module, paths: tuple[str, ...] = ()) -> list[list[str]]:
    """Embeddings, one group per block, and leftovers (pooler, final norm) on top."""
    found = find_layer_list(model, paths)
    names = [n for n, _ in model.named_parameters()]
    if found is None:  # nothing block-like: one group, all trainable together
        return cover_groups(model, {n: 0 for n in names})
    path, layers = found
    n_layers = len(layers)
    group_of: dict[str, int] = {}
    seen_block = False
    for n in names:
        if n.startswith(path + "."):
            idx = int(n[len(path) + 1 :].split(".", 1)[0])
            group_of[n] = idx + 1
            seen_block = True
        elif "embed" in n or not seen_block:
            # registered before the blocks (or named as embeddings): the stem
            group_of[n] = 0
        else:
            group_of[n] = n_layers  # pooler / final norm ride with the top block
    return cover_groups(model, group_of)


# ---------------------------------------------------------------------------
# LoRA targets


def _lora_capable(module: nn.Module) -> bool:
    # What peft's LoRA can wrap. Grouped (depthwise) convs are left out on purpose.
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    return isinstance(module, (nn.Linear, nn.Conv1d)) or type(module).__name__ == "Conv1D"


def valid_lora_targets(model: nn.Module, candidates: list[str] | tuple[str, ...]) -> list[str]:
    """Keep suffixes that match at least one module, all of them LoRA-capable
    (peft raises on the first unsupported match, e.g. a stem ``conv1`` that is a Sequential)."""
    modules = list(model.named_modules())
    keep = []
    for target in candidates:
        hits = [m for n, m in modules if n == target or n.endswith("." + target)]
        if hits and all(_lora_capable(m) for m in hits):
            keep.append(target)
    return keep


def generic_lora_targets(model: nn.Module, scope: list[str]) -> list[str]:
    """Leaf names of every LoRA-capable module under the ``scope`` prefixes."""
    found: list[str] = []
    for name, mod in model.named_modules():
        if any(name == s or name.startswith(s + ".") for s in scope) and _lora_capable(mod):
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in found and not leaf.isdigit():
                found.append(leaf)
    return valid_lora_targets(model, found)


def lora_targets_for(model: nn.Module, family: str, layer_groups: list[list[str]]) -> list[str]:
    """Family defaults that exist in this model, else the generic fallback over the blocks."""
    meta = FAMILIES.get(family)
    targets = valid_lora_targets(model, meta.lora_targets) if meta else []
    if not targets:
        blocks = layer_groups[1:] if len(layer_groups) > 1 else layer_groups
        targets = generic_lora_targets(model, [e for g in blocks for e in g])
    return targets


def check_groups(model: nn.Module, layer_groups: list[list[str]]) -> None:
    """Internal invariant: every parameter in exactly one group (a bug if violated)."""
    per_group = group_param_names(model, layer_groups)
    flat = [n for g in per_group for n in g]
    names = [n for n, _ in model.named_parameters()]
    if sorted(flat) != sorted(names):
        raise AssertionError("layer groups do not partition the backbone parameters")



# ---------------------------------------------------------------------------
# adapter / IA3 positions


def _matches(name: str, suffixes) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def unused_modules(model: nn.Module, family: str) -> list[str]:
    """Names of backbone modules the task never calls (``Family.unused``)."""
    meta = FAMILIES.get(family)
    return [n for n, _ in model.named_modules() if n and meta and _matches(n, meta.unused)]


def adapter_points(model: nn.Module, family: str) -> dict[str, list[str]]:
    """``{"attention": [...], "mlp": [...]}``: full module names of each block's
    attention-output and MLP-output projections (empty lists for an unknown family)."""
    meta = FAMILIES.get(family)
    points: dict[str, list[str]] = {"attention": [], "mlp": []}
    if meta is None:
        return points
    skip = unused_modules(model, family)
    for name, _ in model.named_modules():
        if not name or any(name == u or name.startswith(u + ".") for u in skip):
            continue
        if _matches(name, meta.attn_out):
            points["attention"].append(name)
        elif _matches(name, meta.mlp_out):
            points["mlp"].append(name)
    return points


def ia3_points(model: nn.Module, family: str) -> tuple[list[str], list[str]]:
    """(IA3 target modules, the feed-forward ones among them) as full module names."""
    meta = FAMILIES.get(family)
    if meta is None:
        return [], []
    skip = unused_modules(model, family)
    scaled = [n for n, _ in model.named_modules()
              if n and _matches(n, meta.ia3_targets) and not any(n.startswith(u + ".") for u in skip)]
    feedforward = adapter_points(model, family)["mlp"]
    return scaled + feedforward, feedforward
