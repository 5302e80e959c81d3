"""A Qwen3-MoE decoder whose step is a fixed sequence of kernels over static buffers (graph-capturable).

Dimension legend: T rows of a step (one per sequence in batched decode, the chunk's tokens in
prefill), B sequences, Lc cache positions, L layers, E experts, k per token, H hidden,
Q/V query/kv heads, D head dim, I expert intermediate, N vocabulary.

Per layer, ten launches and no host synchronisation::

    xn  = rmsnorm(r, ln1)                      # r: the float32 residual stream [T, H]
    qkv = xn @ Wqkv^T                          # [T, (Q + 2V) D]
    q, cache[k, v] = qk_norm_rope(qkv)         # at (row_seq, row_pos)
    o   = attention(q, cache)                  # [T, Q D]
    r  += o @ Wo^T
    xn  = rmsnorm(r, ln2)
    ids, w = route(xn @ Wr^T)                  # [T, k] into the step's routing buffers [L, T, k]
    (ids, w = forced[layer] when replaying a trace's routing: FastModel.forced)
    r  += experts(xn, ids, w, table[layer])    # the residency table picks each expert's slab

The experts are read through :class:`runtime.residency.ResidencyTable`, so a promotion or
demotion changes a table entry and never the captured work. Every buffer a step touches lives
in :class:`StepBuffers` (one per row count), so a CUDA graph captured around :meth:`FastModel.step`
replays any position and any batch content. Weights come from a transformers model
(:meth:`FastWeights.from_hf`: the same function as the HF model) or are random.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from moebits.core.model_spec import ModelSpec
from moebits.runtime.fused_ops import AttnOps, MoeOps
from moebits.runtime.pool import DevicePool
from moebits.runtime.residency import ResidencyTable


@dataclass(frozen=True)
class AttnShape:
    """Attention geometry and constants (Qwen3: rotary theta 1e6, RMSNorm eps 1e-6)."""

    heads: int
    kv_heads: int
    head_dim: int
    theta: float = 1e6
    eps: float = 1e-6
    normalize_topk: bool = True

    @classmethod
    def from_hf_config(cls, c: Any) -> AttnShape:
        """The shape and constants of a transformers Qwen3-MoE config."""
        rope = getattr(c, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(c, "rope_theta", 1e6))
        return cls(c.num_attention_heads, c.num_key_value_heads, c.head_dim, float(theta),
                   float(c.rms_norm_eps), bool(getattr(c, "norm_topk_prob", True)))


@dataclass
class LayerWeights:
    """One decoder layer's non-expert weights (bf16)."""

    ln1: torch.Tensor       # [H]
    qkv: torch.Tensor       # [(Q + 2V) D, H]
    qk_norm: torch.Tensor   # [2, D]  q_norm, k_norm
    o: torch.Tensor         # [H, Q D]
    ln2: torch.Tensor       # [H]
    router: torch.Tensor    # [E, H]


@dataclass
class FastWeights:
    """Embedding, layers, final norm and LM head (bf16)."""

    embed: torch.Tensor     # [N, H]
    layers: list[LayerWeights]
    norm: torch.Tensor      # [H]
    lm_head: torch.Tensor   # [N, H]

    @classmethod
    def from_hf(cls, model: Any) -> FastWeights:
        """The non-expert weights of a transformers Qwen3-MoE model (shared, not copied, except qkv)."""
        inner = model.model
        layers = []
        for blk in inner.layers:
            at = blk.self_attn
            layers.append(LayerWeights(
                blk.input_layernorm.weight.detach(),
                torch.cat([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight]).detach(),
                torch.stack([at.q_norm.weight, at.k_norm.weight]).detach(),
                at.o_proj.weight.detach(), blk.post_attention_layernorm.weight.detach(),
                blk.mlp.gate.weight.detach()))
        return cls(inner.embed_tokens.weight.detach(), layers, inner.norm.weight.detach(),
                   model.lm_head.weight.detach())


class StepBuffers:
    """Every tensor one step of ``rows`` rows reads or writes (fixed addresses for graph capture)."""

    def __init__(self, rows: int, spec: ModelSpec, shape: AttnShape, device: torch.device) -> None:
        t, h, q, v, d = rows, spec.hidden, shape.heads, shape.kv_heads, shape.head_dim
        bf, f32, i32 = torch.bfloat16, torch.float32, torch.int32
        self.rows = t
        self.tokens = torch.zeros(t, dtype=torch.long, device=device)
        self.row_seq = torch.zeros(t, dtype=i32, device=device)
        self.row_pos = torch.zeros(t, dtype=i32, device=device)
        self.r = torch.zeros(t, h, dtype=f32, device=device)                      # residual stream
        self.xn = torch.zeros(t, h, dtype=bf, device=device)
        self.qkv = torch.zeros(t, (q + 2 * v) * d, dtype=bf, device=device)
        self.q = torch.zeros(t, q, d, dtype=bf, device=device)
        self.o = torch.zeros(t, q * d, dtype=bf, device=device)
        self.proj = torch.zeros(t, h, dtype=bf, device=device)
        self.router_logits = torch.zeros(t, spec.experts, dtype=bf, device=device)
        self.ids = torch.zeros(spec.layers, t, spec.top_k, dtype=i32, device=device)    # routing of the step
        self.weights = torch.zeros(spec.layers, t, spec.top_k, dtype=f32, device=device)
        self.h = torch.zeros(t * spec.top_k, spec.expert_intermediate, dtype=f32, device=device)
        self.logits = torch.zeros(t, spec.vocab_size, dtype=bf, device=device)
        self.forced_ids = torch.zeros_like(self.ids)          # replayed routing (FastModel.forced)
        self.forced_weights = torch.zeros_like(self.weights)

    def set_routing(self, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """A replayed step's routing ``ids``/``weights [L, T, k]`` (see :attr:`FastModel.forced`)."""
        self.forced_ids.copy_(ids, non_blocking=True)
        self.forced_weights.copy_(weights, non_blocking=True)

    def set_rows(self, tokens: torch.Tensor, row_seq: torch.Tensor, row_pos: torch.Tensor) -> None:
        """Load a step's inputs (copies into the fixed buffers; non-blocking from pinned memory)."""
        self.tokens.copy_(tokens, non_blocking=True)
        self.row_seq.copy_(row_seq, non_blocking=True)
        self.row_pos.copy_(row_pos, non_blocking=True)


class FastModel:
    """The decoder over a slab pool and residency table; see the module docstring."""

    def __init__(self, weights: FastWeights, spec: ModelSpec, shape: AttnShape, pool: DevicePool,
                 table: ResidencyTable, use_triton: bool, max_seqs: int, max_len: int,
                 moe_cfg: Any | None = None) -> None:
        self.w, self.spec, self.shape, self.table = weights, spec, shape, table
        self.device = weights.embed.device
        self.attn = AttnOps(use_triton)
        self.moe = MoeOps(pool, use_triton, moe_cfg)
        kv_shape = (spec.layers, max_seqs, max_len, shape.kv_heads, shape.head_dim)
        self.k_cache = torch.zeros(kv_shape, dtype=torch.bfloat16, device=self.device)   # [L, B, Lc, V, D]
        self.v_cache = torch.zeros(kv_shape, dtype=torch.bfloat16, device=self.device)
        self.max_len = max_len
        # forced: each layer's routing is overwritten by the step's replayed routing (a trace's,
        # StepBuffers.set_routing) after the router ran: the router's cost stays, its choice does not.
        # Set before capturing graphs.
        self.forced = False

    def buffers(self, rows: int) -> StepBuffers:
        return StepBuffers(rows, self.spec, self.shape, self.device)

    def embed(self, b: StepBuffers) -> None:
        b.r.copy_(self.w.embed.index_select(0, b.tokens))

    def layer(self, i: int, b: StepBuffers) -> None:
        """Enqueue layer ``i`` (attention block, then the MoE block) on the current stream."""
        self.attend_route(i, b)
        self.experts(i, b)

    def attend_route(self, i: int, b: StepBuffers) -> None:
        """Layer ``i`` up to its routing (``b.ids[i]``, ``b.weights[i]``): where a STALL policy splits the step."""
        lw, sh = self.w.layers[i], self.shape
        self.attn.rmsnorm(b.r, lw.ln1, b.xn, sh.eps)
        torch.mm(b.xn, lw.qkv.t(), out=b.qkv)
        self.attn.qk_rope_cache(b.qkv, lw.qk_norm, b.row_seq, b.row_pos, b.q, self.k_cache[i], self.v_cache[i],
                                sh.eps, sh.theta)
        self.attn.attention(b.q, self.k_cache[i], self.v_cache[i], b.row_seq, b.row_pos, b.o)
        torch.mm(b.o, lw.o.t(), out=b.proj)
        b.r.add_(b.proj)
        self.attn.rmsnorm(b.r, lw.ln2, b.xn, sh.eps)
        torch.mm(b.xn, lw.router.t(), out=b.router_logits)
        self.moe.route(b.router_logits, b.ids[i], b.weights[i], sh.normalize_topk)
        if self.forced:
            b.ids[i].copy_(b.forced_ids[i])
            b.weights[i].copy_(b.forced_weights[i])

    def experts(self, i: int, b: StepBuffers) -> None:
        """Layer ``i``'s routed experts, added into the residual stream."""
        self.moe.experts(b.xn, b.ids[i], b.weights[i], self.table.codes[i], b.r, b.h, zero_out=False)

    def staged_experts(self, i: int, b: StepBuffers, codes: torch.Tensor) -> None:
        """Layer ``i``'s experts that ``codes [E]`` names (the others -1: they add nothing), added into the
        residual stream: a bypassed expert served from a staging slot, before the layer's own experts."""
        self.moe.experts(b.xn, b.ids[i], b.weights[i], codes, b.r, b.h, zero_out=False)

    def head(self, b: StepBuffers) -> None:
        """Final norm and LM head -> ``b.logits [T, N]``."""
        self.attn.rmsnorm(b.r, self.w.norm, b.xn, self.shape.eps)
        torch.mm(b.xn, self.w.lm_head.t(), out=b.logits)

    def step(self, b: StepBuffers) -> None:
        """One whole step: embedding, every layer, head."""
        self.embed(b)
        for i in range(self.spec.layers):
            self.layer(i, b)
        self.head(b)
