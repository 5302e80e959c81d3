"""A :class:`core.model_spec.ModelSpec` from a Hugging Face ``config.json`` (``model=hf model.config=PATH``).

Reads the public config fields of the MoE families below with the standard library only
(no transformers), so any local checkpoint or a config.json alone sizes a simulation:

| family (``model_type``) | experts / top-k | expert size | which layers are MoE | shared experts | attention |
|---|---|---|---|---|---|
| Qwen2-MoE, Qwen3-MoE | ``num_experts``, ``num_experts_per_tok`` | ``moe_intermediate_size`` | ``decoder_sparse_step``, ``mlp_only_layers`` | ``shared_expert_intermediate_size`` | GQA |
| Qwen3-Next | same | same | same | same | 3 of 4 Gated DeltaNet (``linear_*``), every ``full_attention_interval``-th gated GQA |
| Mixtral, gpt-oss | ``num_local_experts`` | ``intermediate_size`` | all | none | GQA |
| OLMoE | ``num_experts`` | ``intermediate_size`` | all | none | GQA |
| DeepSeek-V2/V3, GLM-4-MoE | ``n_routed_experts`` | ``moe_intermediate_size`` | from ``first_k_dense_replace``, every ``moe_layer_freq`` | ``n_shared_experts`` x expert size | MLA (``kv_lora_rank``...) or GQA |
| Llama-4 (``text_config``) | ``num_local_experts`` | ``intermediate_size`` | ``moe_layers`` or every ``interleave_moe_layer_step``-th | one of the expert size | GQA |

Dense decoder layers (their MLP at ``intermediate_size``, or Llama-4's ``intermediate_size_mlp``,
plus their attention) go into ``dense_params``, as the presets do. Layer norms and biases
are left out (well under 0.1% of the bytes). A config that names no experts is refused.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from moebits.core.model_spec import ModelSpec

EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts")
TOP_K = ("num_experts_per_tok", "experts_per_token", "num_experts_per_token")


def _first(cfg: dict[str, Any], names: tuple[str, ...], default: Any = None) -> Any:
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    return default


def read_config(path: str | Path) -> tuple[dict[str, Any], str]:
    """The config dict of a ``config.json`` file or a model directory, and a model name for it."""
    p = Path(path).expanduser()
    file = p / "config.json" if p.is_dir() else p
    if not file.is_file():
        raise ValueError(f"model.config={path}: no such config.json (give the file or a local model directory)")
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"model.config={path}: not a readable JSON config ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"model.config={path}: a config.json holds one JSON object")
    if isinstance(data.get("text_config"), dict):  # Llama-4 and other multimodal wrappers
        data = {**data["text_config"], "model_type": data["text_config"].get("model_type", data.get("model_type"))}
    name = str(data.get("_name_or_path") or file.parent.name or data.get("model_type") or "hf")
    return data, Path(name).name


def moe_layers(cfg: dict[str, Any]) -> list[int]:
    """Indices of the decoder layers whose MLP is a routed MoE."""
    n = int(cfg["num_hidden_layers"])
    if isinstance(cfg.get("moe_layers"), list) and cfg["moe_layers"]:
        return sorted(int(i) for i in cfg["moe_layers"])
    if "first_k_dense_replace" in cfg or "moe_layer_freq" in cfg:
        k, freq = int(cfg.get("first_k_dense_replace") or 0), int(cfg.get("moe_layer_freq") or 1)
        return [i for i in range(n) if i >= k and i % freq == 0]
    if "interleave_moe_layer_step" in cfg:
        step = int(cfg["interleave_moe_layer_step"] or 1)
        return [i for i in range(n) if (i + 1) % step == 0]
    step, dense = int(cfg.get("decoder_sparse_step") or 1), set(cfg.get("mlp_only_layers") or [])
    return [i for i in range(n) if i not in dense and (i + 1) % step == 0]


def _gqa(cfg: dict[str, Any], gated: bool = False) -> int:
    h, q = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or q)
    hd = int(cfg.get("head_dim") or h // q)
    return h * q * hd * (2 if gated else 1) + 2 * h * kv * hd + q * hd * h


def _mla(cfg: dict[str, Any]) -> int:
    """DeepSeek's multi-head latent attention: q (through q_lora_rank if any), kv_a, kv_b, o."""
    h, q = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    nope, rope, v = int(cfg["qk_nope_head_dim"]), int(cfg["qk_rope_head_dim"]), int(cfg["v_head_dim"])
    lora, qr = int(cfg["kv_lora_rank"]), cfg.get("q_lora_rank")
    q_proj = h * int(qr) + int(qr) * q * (nope + rope) if qr else h * q * (nope + rope)
    return q_proj + h * (lora + rope) + lora * q * (nope + v) + q * v * h


def _deltanet(cfg: dict[str, Any]) -> int:
    """Qwen3-Next's Gated DeltaNet: qkvz and ba projections in, the output projection back."""
    h = int(cfg["hidden_size"])
    kh, kd = int(cfg["linear_num_key_heads"]), int(cfg["linear_key_head_dim"])
    vh, vd = int(cfg["linear_num_value_heads"]), int(cfg["linear_value_head_dim"])
    return h * (2 * kh * kd + 2 * vh * vd) + h * 2 * vh + vh * vd * h


def attention_per_layer(cfg: dict[str, Any]) -> list[int]:
    """Attention parameters of every decoder layer."""
    n = int(cfg["num_hidden_layers"])
    if cfg.get("kv_lora_rank"):
        return [_mla(cfg)] * n
    if "linear_num_key_heads" in cfg:
        types = cfg.get("layer_types")
        if not isinstance(types, list) or len(types) != n:
            every = int(cfg.get("full_attention_interval") or 4)
            types = ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(n)]
        return [_gqa(cfg, gated=True) if t == "full_attention" else _deltanet(cfg) for t in types]
    return [_gqa(cfg)] * n


def spec_from_config(cfg: dict[str, Any], name: str) -> ModelSpec:
    """The ModelSpec of an MoE config dict (see the module docstring)."""
    experts, top_k = _first(cfg, EXPERTS), _first(cfg, TOP_K)
    where = f"{name} ({cfg.get('model_type', '?')})"
    if not experts or not top_k:
        raise ValueError(f"{where}: the config names no routed experts ({' / '.join(EXPERTS)} and "
                         f"{' / '.join(TOP_K)}); is it an MoE model?")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads") if k not in cfg]
    if missing:
        raise ValueError(f"{where}: config.json lacks {', '.join(missing)}")
    hidden = int(cfg["hidden_size"])
    expert_i = int(_first(cfg, ("moe_intermediate_size", "intermediate_size")))
    moe = moe_layers(cfg)
    if not moe:
        raise ValueError(f"{where}: no decoder layer is an MoE layer by its config")
    attn = attention_per_layer(cfg)
    shared_i = int(cfg.get("shared_expert_intermediate_size") or 0)
    shared_n = 1 if shared_i else 0
    if cfg.get("n_shared_experts"):
        shared_n, shared_i = int(cfg["n_shared_experts"]), int(cfg["n_shared_experts"]) * expert_i
    elif str(cfg.get("model_type", "")).startswith("llama4"):
        shared_n, shared_i = 1, expert_i
    dense_i = int(_first(cfg, ("intermediate_size_mlp", "intermediate_size"), 0))
    dense = [i for i in range(len(attn)) if i not in set(moe)]
    dense_params = sum(3 * hidden * dense_i + attn[i] for i in dense)
    return ModelSpec(
        name, layers=len(moe), experts=int(experts), top_k=int(top_k), hidden=hidden,
        expert_intermediate=expert_i, shared_experts=shared_n, shared_intermediate=shared_i,
        attention_params=int(math.fsum(attn[i] for i in moe) / len(moe)), dense_params=dense_params,
        vocab_size=int(cfg.get("vocab_size") or 32000),
    )


def spec_from_hf(path: str | Path) -> ModelSpec:
    """The ModelSpec of a ``config.json`` (or a model directory holding one)."""
    cfg, name = read_config(path)
    return spec_from_config(cfg, name)
