"""Hugging Face transformers' layout (``SwinForImageClassification``, ``Swinv2ForImageClassification``,
their base models and backbones).

Weights sit under ``swin.`` / ``swinv2.`` (base models and backbone files without the prefix);
a block is ``encoder.layers.{i}.blocks.{j}`` with ``layernorm_before`` / ``layernorm_after``, the
MLP as ``intermediate.dense`` / ``output.dense`` and q, k, v as three linears:
``attention.self.{query,key,value}`` in the files ``save_pretrained`` writes, ``attention.{q,k,v}_proj``
in the modules of transformers 5 (and its renamed MLP ``mlp.fc1`` / ``mlp.fc2``). Both load;
exports use the saved names, which every transformers version reads. V2 has no k bias (so
q / v biases are swinkit's ``q_bias`` / ``v_bias``) and calls the CPB MLP
``continuous_position_bias_mlp``. Backbones keep a LayerNorm per output stage,
``hidden_states_norms.stage{i+1}`` (swinkit's ``norm{i}``).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..variants import SwinConfig
from . import buffers
from .formats import require_representable
from .io import StateDict

_PREFIXES = ("swin.", "swinv2.")
_BLOCK = re.compile(r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.*)$")
# Top-level names: swinkit <- HF (saved names first; the first is what exports write).
_TOP = {
    "patch_embed.proj.": ("embeddings.patch_embeddings.projection.",),
    "patch_embed.norm.": ("embeddings.norm.",),
    "absolute_pos_embed": ("embeddings.position_embeddings",),
    "norm.": ("layernorm.",),
    "head.": ("classifier.",),
}
# Inside a block: swinkit <- HF, saved names first, then transformers 5's module names.
_INNER = {
    "norm1.": ("layernorm_before.",),
    "norm2.": ("layernorm_after.",),
    "mlp.fc1.": ("intermediate.dense.", "mlp.fc1."),
    "mlp.fc2.": ("output.dense.", "mlp.fc2."),
    "attn.proj.": ("attention.output.dense.", "attention.o_proj."),
    "attn.relative_position_bias_table": (
        "attention.self.relative_position_bias_table",
        "attention.relative_position_bias.relative_position_bias_table",
    ),
    "attn.logit_scale": ("attention.self.logit_scale", "attention.logit_scale"),
    "attn.cpb_mlp.": ("attention.self.continuous_position_bias_mlp.", "attention.continuous_position_bias_mlp."),
    "attn.q.": ("attention.self.query.", "attention.q_proj."),
    "attn.k.": ("attention.self.key.", "attention.k_proj."),
    "attn.v.": ("attention.self.value.", "attention.v_proj."),
}
_DERIVED = ("relative_position_index", "relative_coords_table")
# Exports: swinkit name -> the saved HF name.
_TOP_OUT = {names[0]: (new,) for new, names in _TOP.items()}
_INNER_OUT = {names[0]: (new,) for new, names in _INNER.items()}


def _rename(text: str, table: dict[str, tuple[str, ...]]) -> str | None:
    for new, olds in table.items():
        for old in olds:
            if text == old or (old.endswith(".") and text.startswith(old)):
                return new + text[len(old) :]
    return None


def _key_to_swinkit(key: str) -> str | None:
    """One HF key -> swinkit's (q/k/v as ``attn.q`` / ``attn.k`` / ``attn.v``); None for derived buffers."""
    if key.rsplit(".", 1)[-1] in _DERIVED:
        return None
    match = _BLOCK.match(key)
    if match:
        inner = _rename(match.group(3), _INNER)
        return f"layers.{match.group(1)}.blocks.{match.group(2)}.{inner}" if inner else key
    stage_norm = re.match(r"^hidden_states_norms\.stage(\d+)\.(.*)$", key)
    if stage_norm:
        return f"norm{int(stage_norm.group(1)) - 1}.{stage_norm.group(2)}"
    downsample = re.match(r"^encoder\.layers\.(\d+)\.downsample\.(.*)$", key)
    if downsample:
        return f"layers.{downsample.group(1)}.downsample.{downsample.group(2)}"
    return _rename(key, _TOP) or key


def to_swinkit(state_dict: StateDict) -> StateDict:
    """HF keys (either generation, with or without the ``swin.`` / ``swinv2.`` prefix) -> swinkit keys."""
    out: StateDict = {}
    for key, value in state_dict.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        new = _key_to_swinkit(key)
        if new is not None:
            out[new] = value
    for prefix in sorted({k[: -len("q.weight")] for k in out if k.endswith(".attn.q.weight")}):
        parts = [out.pop(f"{prefix}{name}.weight") for name in "qkv"]
        out[prefix + "qkv.weight"] = torch.cat(parts)
        biases = {name: out.pop(f"{prefix}{name}.bias", None) for name in "qkv"}
        if biases["k"] is not None:
            out[prefix + "qkv.bias"] = torch.cat([biases["q"], biases["k"], biases["v"]])
        elif biases["q"] is not None:  # V2: no k bias
            out[prefix + "q_bias"], out[prefix + "v_bias"] = biases["q"], biases["v"]
    return out


def from_swinkit(state_dict: StateDict, config: SwinConfig) -> StateDict:
    """swinkit keys -> the names ``save_pretrained`` writes, for :func:`architecture`'s class."""
    v2 = config.family == "v2"
    clamped = buffers.clamped_stages(config)
    require_representable(
        "hf",
        {
            "transformers' Swin always has the patch-embedding LayerNorm (patch_norm=False)": not config.patch_norm,
            "transformers' Swin V2 absolute position embedding has a different shape (ape=True)": v2 and config.ape,
            "transformers' Swin V2 backbone has no per-stage output norms (stage_norms=True)": v2
            and config.features_only
            and config.stage_norms,
            f"transformers 5 builds every V1 stage's bias table for window {config.window_size}, but stages "
            f"{clamped} of this model are clamped at img_size {config.img_size}": not v2 and bool(clamped),
        },
    )
    prefix = "" if config.features_only or config.num_classes == 0 else ("swinv2." if v2 else "swin.")
    out: StateDict = {}
    for key, value in state_dict.items():
        match = re.match(r"^layers\.(\d+)\.blocks\.(\d+)\.(.*)$", key)
        if match:
            block = f"encoder.layers.{match.group(1)}.blocks.{match.group(2)}."
            out.update({prefix + block + k: v for k, v in _block_from_swinkit(match.group(3), value).items()})
            continue
        stage_norm = re.match(r"^norm(\d+)\.(.*)$", key)
        if stage_norm:
            out[f"hidden_states_norms.stage{int(stage_norm.group(1)) + 1}.{stage_norm.group(2)}"] = value
        elif key.startswith("layers."):
            out[prefix + "encoder." + key] = value
        else:
            new = _rename(key, _TOP_OUT) or key
            out[new if new.startswith("classifier.") else prefix + new] = value
    return out


def _block_from_swinkit(name: str, value: torch.Tensor) -> StateDict:
    """One swinkit key inside a block -> its HF key(s): ``qkv`` splits into query, key and value."""
    if name in ("attn.qkv.weight", "attn.qkv.bias"):
        kind = name.rsplit(".", 1)[1]
        return {f"{_INNER[f'attn.{part}.'][0]}{kind}": chunk for part, chunk in zip("qkv", value.chunk(3), strict=True)}
    if name in ("attn.q_bias", "attn.v_bias"):
        return {_INNER[f"attn.{name[5]}."][0] + "bias": value}
    return {(_rename(name, _INNER_OUT) or name): value}


def architecture(config: SwinConfig) -> str:
    """The transformers class a swinkit model corresponds to."""
    base = "Swinv2" if config.family == "v2" else "Swin"
    if config.features_only:
        return base + "Backbone"
    return base + ("Model" if config.num_classes == 0 else "ForImageClassification")


def config_dict(config: SwinConfig, class_names: list[str] | None = None) -> dict[str, Any]:
    """The ``config.json`` of a transformers ``SwinConfig`` / ``Swinv2Config`` for ``config``."""
    v2 = config.family == "v2"
    values: dict[str, Any] = {
        "architectures": [architecture(config)],
        "model_type": "swinv2" if v2 else "swin",
        "image_size": config.img_size,
        "patch_size": config.patch_size,
        "num_channels": config.in_chans,
        "embed_dim": config.embed_dim,
        "depths": list(config.depths),
        "num_heads": list(config.num_heads),
        "window_size": config.window_size,
        "mlp_ratio": config.mlp_ratio,
        "qkv_bias": config.qkv_bias,
        "hidden_act": "gelu",
        "use_absolute_embeddings": config.ape,
        "layer_norm_eps": 1e-5,
        "drop_path_rate": config.drop_path_rate,
        "hidden_dropout_prob": config.drop_rate,
        "attention_probs_dropout_prob": config.attn_drop_rate,
    }
    if v2:
        values["pretrained_window_sizes"] = list(config.pretrained_window_sizes)
    if config.features_only:
        values["out_features"] = [f"stage{i + 1}" for i in config.out_indices]
        values["out_indices"] = [i + 1 for i in config.out_indices]
    elif config.num_classes > 0:
        names = list(class_names) if class_names else [f"LABEL_{i}" for i in range(config.num_classes)]
        values["id2label"] = {str(i): name for i, name in enumerate(names)}
        values["label2id"] = {name: i for i, name in enumerate(names)}
    return values


def config_hints(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The :class:`SwinConfig` fields a transformers ``config.json`` fixes beyond what the weights show."""
    hints: dict[str, Any] = {}
    size = hf_config.get("image_size")
    if isinstance(size, int):
        hints["img_size"] = size
    elif isinstance(size, list | tuple) and len(set(size)) == 1:
        hints["img_size"] = int(size[0])
    if isinstance(hf_config.get("window_size"), int):
        hints["window_size"] = hf_config["window_size"]
    if hf_config.get("model_type") == "swinv2" and hf_config.get("pretrained_window_sizes"):
        hints["pretrained_window_sizes"] = tuple(hf_config["pretrained_window_sizes"])
    if any(name.endswith("Backbone") for name in hf_config.get("architectures") or []):
        hints["always_shift"] = True  # transformers' backbones always partition and shift
        if hf_config.get("out_indices"):
            hints["out_indices"] = tuple(i - 1 for i in hf_config["out_indices"] if i > 0)
    return hints


def class_names(hf_config: dict[str, Any]) -> list[str] | None:
    """The label names of a transformers config, unless they are the placeholder ``LABEL_i``."""
    labels = hf_config.get("id2label") or {}
    names = [labels[key] for key in sorted(labels, key=int)]
    return None if not names or names == [f"LABEL_{i}" for i in range(len(names))] else names
