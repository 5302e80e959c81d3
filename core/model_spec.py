"""ModelSpec: the shape of an MoE model, and presets for public models.

Layer indices in moebits count MoE layers only (0..layers-1). Dense decoder layers (DeepSeek's
first layer, Llama-4's interleaved dense layers) are folded into the per-MoE-layer non-expert
cost, so a replay engine only ever walks MoE layers. Shapes come from each model's published
``config.json``; where the attention is not plain GQA (DeepSeek MLA, Qwen3-Next's hybrid
linear attention) ``attention_params`` is the per-layer parameter count worked out from the
config fields, noted beside the preset.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from moebits.core.precision import Precision, get_precision


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Shape of an MoE causal LM, as far as expert offloading cares.

    Attributes:
        name: preset name, e.g. ``"Qwen3-30B-A3B"``.
        layers: number of MoE layers.
        experts: routed experts per MoE layer.
        top_k: routed experts chosen per token.
        hidden: model hidden size H.
        expert_intermediate: routed expert intermediate size I (gate, up: H→I; down: I→H).
        shared_experts: always-active shared experts per MoE layer (not offloaded).
        shared_intermediate: total intermediate size of the shared expert(s) of one layer.
        attention_params: attention parameters of one MoE layer.
        dense_params: parameters of dense (non-MoE) decoder layers, whole model; amortized
            over the MoE layers in ``non_expert_params_per_layer``.
        vocab_size: vocabulary size (embedding and LM head).
    """

    name: str
    layers: int
    experts: int
    top_k: int
    hidden: int
    expert_intermediate: int
    shared_experts: int = 0
    shared_intermediate: int = 0
    attention_params: int = 0
    dense_params: int = 0
    vocab_size: int = 32000

    def __post_init__(self) -> None:
        for field in ("layers", "experts", "top_k", "hidden", "expert_intermediate"):
            if getattr(self, field) <= 0:
                raise ValueError(f'"{field}" must be > 0 in ModelSpec {self.name!r}.')
        if self.top_k > self.experts:
            raise ValueError(
                f'"top_k" ({self.top_k}) must be <= "experts" ({self.experts}) in {self.name!r}.'
            )

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert: gate and up [I, H] plus down [H, I]."""
        return 3 * self.hidden * self.expert_intermediate

    def expert_bytes(self, precision: Precision | str) -> int:
        """Bytes of one routed expert stored in ``precision`` (scales and zeros included)."""
        p = get_precision(precision) if isinstance(precision, str) else precision
        h, i = self.hidden, self.expert_intermediate
        return p.matrix_bytes(2 * i, h) + p.matrix_bytes(h, i)

    def all_experts_bytes(self, precision: Precision | str) -> int:
        """Bytes of every routed expert of every MoE layer in ``precision``."""
        return self.layers * self.experts * self.expert_bytes(precision)

    @property
    def non_expert_params_per_layer(self) -> int:
        """Attention, router, shared experts and amortized dense layers of one MoE layer."""
        router = self.hidden * self.experts
        shared = 3 * self.hidden * self.shared_intermediate
        return self.attention_params + router + shared + self.dense_params // self.layers

    @property
    def non_expert_bytes_per_layer(self) -> int:
        """Bytes of the non-expert weights of one MoE layer, kept resident in bf16."""
        return 2 * self.non_expert_params_per_layer

    @property
    def non_expert_flops_per_token_per_layer(self) -> int:
        """Matmul FLOPs per token of the non-expert weights of one MoE layer (2 per MAC)."""
        return 2 * self.non_expert_params_per_layer

    def expert_flops_per_token(self) -> int:
        """Matmul FLOPs of one routed expert for one token."""
        return 2 * self.expert_params

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, for trace metadata and result files."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        """Inverse of :meth:`to_dict`; unknown keys are an error that names them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown ModelSpec field(s) {unknown}; known: {sorted(names)}")
        return cls(**data)


def _gqa(hidden: int, q_heads: int, kv_heads: int, head_dim: int) -> int:
    """Parameters of a grouped-query attention block: q, k, v and o projections."""
    return 2 * hidden * q_heads * head_dim + 2 * hidden * kv_heads * head_dim


MODEL_PRESETS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec(
            "Qwen3-30B-A3B", layers=48, experts=128, top_k=8, hidden=2048,
            expert_intermediate=768, attention_params=_gqa(2048, 32, 4, 128),
            vocab_size=151936,
        ),
        # Qwen3-Next: 3 of 4 layers are Gated DeltaNet (qkvz 2048->12288, out 4096->2048),
        # every 4th is gated GQA (16 q heads x 256 with gate, 2 kv heads): mean ~32M per layer.
        ModelSpec(
            "Qwen3-Next-80B-A3B", layers=48, experts=512, top_k=10, hidden=2048,
            expert_intermediate=512, shared_experts=1, shared_intermediate=512,
            attention_params=32_000_000, vocab_size=151936,
        ),
        ModelSpec(
            "Mixtral-8x7B", layers=32, experts=8, top_k=2, hidden=4096,
            expert_intermediate=14336, attention_params=_gqa(4096, 32, 8, 128),
            vocab_size=32000,
        ),
        ModelSpec(
            "OLMoE-1B-7B", layers=16, experts=64, top_k=8, hidden=2048,
            expert_intermediate=1024, attention_params=_gqa(2048, 16, 16, 128),
            vocab_size=50304,
        ),
        # DeepSeek-V2-Lite: 27 decoder layers, layer 0 dense (intermediate 10944); MLA with
        # kv_lora_rank 512, 16 heads, qk 128+64, v 128: q 6.29M + kv_a 1.18M + kv_b 2.10M + o 4.19M.
        ModelSpec(
            "DeepSeek-V2-Lite", layers=26, experts=64, top_k=6, hidden=2048,
            expert_intermediate=1408, shared_experts=2, shared_intermediate=2816,
            attention_params=13_762_560, dense_params=3 * 2048 * 10944 + 13_762_560,
            vocab_size=102400,
        ),
        # Llama-4-Maverick: 48 decoder layers alternating dense (intermediate 16384) and MoE
        # (128 routed experts of 8192, top-1, one shared expert of 8192).
        ModelSpec(
            "Llama-4-Maverick", layers=24, experts=128, top_k=1, hidden=5120,
            expert_intermediate=8192, shared_experts=1, shared_intermediate=8192,
            attention_params=_gqa(5120, 40, 8, 128),
            dense_params=24 * (3 * 5120 * 16384 + _gqa(5120, 40, 8, 128)),
            vocab_size=202048,
        ),
        ModelSpec(
            "Qwen1.5-MoE-A2.7B", layers=24, experts=60, top_k=4, hidden=2048,
            expert_intermediate=1408, shared_experts=1, shared_intermediate=5632,
            attention_params=_gqa(2048, 16, 16, 128), vocab_size=151936,
        ),
        # the trained moebits MoE (train/model.py's default size), as its captured traces record it
        # (train/data/traces/*.parquet; tests check they agree): for synthetic workloads on its shape
        ModelSpec(
            "moebits-default", layers=8, experts=32, top_k=4, hidden=128, expert_intermediate=128,
            attention_params=40960, vocab_size=256,
        ),
    )
}


def preset_key(model_name: str) -> str:
    """The one preset name every CLI uses, the ``conf/model/`` file stem:
    ``Qwen1.5-MoE-A2.7B`` -> ``qwen15_moe_a27b``."""
    return model_name.lower().replace(".", "").replace("-", "_")


PRESET_KEYS: dict[str, str] = {preset_key(n): n for n in MODEL_PRESETS}


def find_preset(name: str) -> tuple[ModelSpec, str | None]:
    """A preset by its key (``qwen3_30b_a3b``) or its model name (``Qwen3-30B-A3B``); the second
    value is a hint naming the key when the other spelling was used. Unknown: ValueError."""
    if name in PRESET_KEYS:
        return MODEL_PRESETS[PRESET_KEYS[name]], None
    key = preset_key(name)
    if key in PRESET_KEYS:
        return MODEL_PRESETS[PRESET_KEYS[key]], f"model presets are named {key} (the conf/model/ name) in every command"
    raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESET_KEYS)}")


def get_model_spec(name: str) -> ModelSpec:
    """Look a preset up by key or model name, with a message that lists the known ones."""
    return find_preset(name)[0]
