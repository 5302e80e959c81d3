"""Measurement forwards of a transformers MoE with each routed (token, expert) served at a chosen
weight variant, from dequantized copies (CPU reference math, not the runtime's kernels).

Dimension legend: T tokens, k experts per token, H hidden, I expert intermediate, E experts,
V weight variants, L MoE layers.

:class:`Variants` holds every layer's expert weights dequantized to fp32 per *variant*: bf16
(index 0, the model as trained), each precision of :data:`core.precision.PRECISIONS` quantized
by the runtime's quantizers (:func:`runtime.quant.quantize_stack`, RTN), and channel mixes
(:class:`core.precision.ChannelMix`: the ``low`` copy with its ``fraction`` most significant
intermediate channels, the gate and up rows and the down column of each, taken from the
``high`` copy; significance per channel is given, e.g. the mean |activation| on calibration
text, :func:`channel_significance`).

:func:`install` points every experts module of the model at a :class:`Served` context through
transformers' ``ExpertsInterface`` (implementation ``"moebits_measure"``). Per forward the
context may *force* the routing (each layer's top-k ids and gates, e.g. those of the bf16 model
on the same text: then only expert precision differs between runs) and assign each routed
(token, slot) a variant (default 0: bf16); ``capture`` keeps each layer's expert inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from moebits.core.precision import ChannelMix, get_channel_mix, get_precision
from moebits.runtime.hf import expert_weights, experts_modules, set_experts_implementation
from moebits.runtime.quant import quantize_stack

IMPL = "moebits_measure"


def dequantized(w: torch.Tensor, precision: str) -> torch.Tensor:
    """``w [E, N, K]`` through the runtime's quantizer for ``precision`` and back to fp32."""
    get_precision(precision)
    return quantize_stack(w.float(), precision).dequantize().float()


def mix_weights(low: tuple[torch.Tensor, torch.Tensor], high: tuple[torch.Tensor, torch.Tensor],
                significance: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A channel mix: ``low`` weights with the top ``fraction`` of each expert's intermediate
    channels by ``significance [E, I]`` taken from ``high``. Weights are ``(gate_up [E, 2I, H], down [E, H, I])``."""
    gu, dn = low[0].clone(), low[1].clone()
    e, i = significance.shape
    n = max(1, round(fraction * i))
    top = significance.topk(n, dim=1).indices                                   # [E, n]
    rows = torch.cat([top, top + i], dim=1)                                     # gate rows, then up rows
    ar = torch.arange(e)[:, None]
    gu[ar, rows] = high[0][ar, rows]
    dn[ar, :, top] = high[1][ar, :, top]
    return gu, dn


@dataclass
class Variants:
    """Per layer, fp32 weights of every variant: ``gate_up [V, E, 2I, H]``, ``down [V, E, H, I]``."""

    names: list[str]
    gate_up: list[torch.Tensor]
    down: list[torch.Tensor]

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"no weight variant {name!r}; have {', '.join(self.names)}") from None


def build_variants(model: Any, names: Sequence[str], significance: torch.Tensor | None = None) -> Variants:
    """Variants ``names`` (bf16 first, added if missing) of every MoE layer of ``model``.

    A channel-mix name (registered with :func:`core.precision.register_channel_mix`) needs
    ``significance [L, E, I]``."""
    names = ["bf16", *[n for n in dict.fromkeys(names) if n != "bf16"]]
    gus, dns = [], []
    for layer, mod in enumerate(experts_modules(model)):
        gu, dn = (t.float() for t in expert_weights(mod))
        plain: dict[str, tuple[torch.Tensor, torch.Tensor]] = {"bf16": (gu.to(torch.bfloat16).float(),
                                                                        dn.to(torch.bfloat16).float())}
        out = []
        for name in names:
            mix = get_channel_mix(name)
            if mix is None:
                plain.setdefault(name, (dequantized(gu, name), dequantized(dn, name)))
                out.append(plain[name])
            else:
                out.append(_mix(mix, plain, gu, dn, significance, layer))
        gus.append(torch.stack([w for w, _ in out]))
        dns.append(torch.stack([w for _, w in out]))
    return Variants(names, gus, dns)


def _mix(mix: ChannelMix, plain: dict[str, tuple[torch.Tensor, torch.Tensor]], gu: torch.Tensor, dn: torch.Tensor,
         significance: torch.Tensor | None, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    if significance is None:
        raise ValueError(f"channel mix {mix.low}+{mix.high} needs channel significance")
    for p in (mix.low, mix.high):
        plain.setdefault(p, (dequantized(gu, p), dequantized(dn, p)))
    return mix_weights(plain[mix.low], plain[mix.high], significance[layer], mix.fraction)


@dataclass
class Served:
    """What the next forward serves (see the module docstring); ``captured[l]`` = (x [T, H], ids, gates)."""

    variants: Variants
    forced: list[tuple[torch.Tensor, torch.Tensor]] | None = None   # per layer (ids [T, k], gates [T, k])
    assign: list[torch.Tensor] | None = None                        # per layer variant index [T, k]
    capture: bool = False
    captured: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.forced is not None:
            ids, w = self.forced[layer]
        if self.capture:
            self.captured.append((x.detach().float(), ids.detach(), w.detach().float()))
        a = self.assign[layer] if self.assign is not None else torch.zeros_like(ids)
        return serve(x, ids, w, a, self.variants.gate_up[layer], self.variants.down[layer]).to(x.dtype)


def serve(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, assign: torch.Tensor,
          gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Experts' output ``[T, H]``: each (token, slot) through expert ``ids`` at variant ``assign``."""
    t, k = ids.shape
    e = gate_up.shape[1]
    tok = torch.arange(t, device=x.device).repeat_interleave(k)                  # [T k]
    key = (assign.reshape(-1).long() * e + ids.reshape(-1).long())                # [T k]
    gate = w.reshape(-1).float()
    order = torch.argsort(key, stable=True)
    keys, counts = torch.unique_consecutive(key[order], return_counts=True)
    out = torch.zeros((t, x.shape[1]), dtype=torch.float32, device=x.device)
    xf = x.float()
    start = 0
    for kv, n in zip(keys.tolist(), counts.tolist(), strict=True):
        sel = order[start : start + n]
        start += n
        v, ex = divmod(kv, e)
        rows = tok[sel]
        h = F.linear(xf[rows], gate_up[v, ex])                                   # [n, 2I]
        g, u = h.chunk(2, dim=-1)
        y = F.linear(F.silu(g) * u, down[v, ex])                                 # [n, H]
        out.index_add_(0, rows, y * gate[sel, None])
    return out


def _experts(module: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
             top_k_weights: torch.Tensor) -> torch.Tensor:
    served, layer = module.__dict__["_moebits_measure"]
    return served.forward(layer, hidden_states, top_k_index, top_k_weights)


def install(model: Any, served: Served) -> None:
    """Serve every experts module of ``model`` through ``served`` (implementation ``"moebits_measure"``)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPL, _experts)
    for layer, m in enumerate(experts_modules(model)):
        m.__dict__["_moebits_measure"] = (served, layer)
    set_experts_implementation(model, IMPL)


@torch.no_grad()
def logits(model: Any, tokens: torch.Tensor, served: Served) -> torch.Tensor:
    """Next-token logits ``[B, S, V]`` (fp32) of a teacher-forced forward over ``tokens [B, S]``."""
    served.captured = []
    return model(input_ids=tokens, use_cache=False).logits.float()


@torch.no_grad()
def channel_significance(captured: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                         variants: Variants) -> torch.Tensor:
    """Mean |intermediate activation| per (layer, expert, channel) on captured bf16 inputs: ``[L, E, I]``."""
    out = []
    for layer, (x, ids, _) in enumerate(captured):
        gu = variants.gate_up[layer][0]                                           # [E, 2I, H]
        e, i2, _ = gu.shape
        sig = torch.zeros((e, i2 // 2))
        for ex in range(e):
            rows = (ids == ex).any(dim=1).nonzero().flatten()
            if len(rows):
                g, u = F.linear(x[rows], gu[ex]).chunk(2, dim=-1)
                sig[ex] = (F.silu(g) * u).abs().mean(0)
        out.append(sig)
    return torch.stack(out)
