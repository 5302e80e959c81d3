"""What ``moebits train fit`` trains: a byte-level Qwen3-MoE causal LM and its dense twin.

Sizes (the default, :data:`DEFAULT`): 8 decoder layers, every one an MoE block of 32 routed
experts, top-4, hidden 128, expert intermediate 128, 4 query heads and 1 KV head of dim 32,
tied byte embeddings (vocab 256). 128 is the smallest hidden and expert intermediate size the
runtime's quantizers accept (groups of 128 weights along the input dimension), so the expert
weights alone are 8 x 32 x 3 x 128 x 128 x 2 bytes = 25.2 MB in bf16; the whole checkpoint is
26.0 MB = 24.8 MiB (the card states it). The *dense* comparison model has the same active
size: the same attention, embeddings and layers, and one SwiGLU FFN of intermediate
``top_k x expert_intermediate`` (= the FLOPs of the k routed experts a token uses).
:data:`SMOKE` is a 2-layer, 8-expert size that trains in seconds on a CPU (tests).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VOCAB = 256  # bytes
DEFAULT_DIR = Path(__file__).resolve().parent / "data" / "model"  # the embedded default model (package data)


@dataclass(frozen=True)
class ModelSize:
    """The shape of the MoE (and, through :meth:`dense_intermediate`, of its dense twin)."""

    layers: int = 8
    experts: int = 32
    top_k: int = 4
    hidden: int = 128
    expert_intermediate: int = 128
    heads: int = 4
    kv_heads: int = 1
    head_dim: int = 32
    max_positions: int = 2048

    def __post_init__(self) -> None:
        if min(self.layers, self.experts, self.top_k, self.hidden, self.expert_intermediate) <= 0:
            raise ValueError("model sizes must be > 0")
        if self.top_k > self.experts:
            raise ValueError(f'"top_k" ({self.top_k}) must be <= "experts" ({self.experts})')
        if self.heads % self.kv_heads:
            raise ValueError(f'"heads" ({self.heads}) must be a multiple of "kv_heads" ({self.kv_heads})')

    @property
    def dense_intermediate(self) -> int:
        return self.top_k * self.expert_intermediate


DEFAULT = ModelSize()
SMOKE = ModelSize(layers=2, experts=8, top_k=2, max_positions=256)


def _common(size: ModelSize) -> dict[str, Any]:
    return dict(vocab_size=VOCAB, hidden_size=size.hidden, num_hidden_layers=size.layers,
                num_attention_heads=size.heads, num_key_value_heads=size.kv_heads, head_dim=size.head_dim,
                max_position_embeddings=size.max_positions, tie_word_embeddings=True, initializer_range=0.02,
                rope_theta=10000.0, pad_token_id=None, bos_token_id=None, eos_token_id=None, use_cache=True)


def moe_config(size: ModelSize, aux_loss_coef: float) -> Any:
    """A ``Qwen3MoeConfig``: every layer sparse, load-balancing loss ``aux_loss_coef`` in training."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**_common(size), num_experts=size.experts, num_experts_per_tok=size.top_k,
                          moe_intermediate_size=size.expert_intermediate, intermediate_size=size.dense_intermediate,
                          decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
                          output_router_logits=False, router_aux_loss_coef=aux_loss_coef)


def dense_config(size: ModelSize) -> Any:
    """A ``Qwen3Config`` of the MoE's active size (see the module docstring)."""
    from transformers import Qwen3Config

    return Qwen3Config(**_common(size), intermediate_size=size.dense_intermediate)


def build(config: Any, seed: int) -> Any:
    """A freshly initialised causal LM for ``config``, deterministic in ``seed`` (fp32, CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def param_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def size_from_dict(d: dict[str, Any]) -> ModelSize:
    """A :class:`ModelSize` from a dict (unknown keys are an error)."""
    names = {f.name for f in dataclasses.fields(ModelSize)}
    bad = sorted(set(d) - names)
    if bad:
        raise ValueError(f"unknown model size field(s) {bad}; known: {sorted(names)}")
    return ModelSize(**d)
