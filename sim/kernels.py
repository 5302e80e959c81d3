"""The kernel-time model: expert launches, the non-MoE part of a layer, and host experts.

Expert compute on the device is one grouped launch per precision class of a layer step:

    group_s(p, tokens, n) = launch_s * expert_launch_ops + n * per_expert_s(p, tokens / n)

with ``per_expert_s`` from the profile's measured table for (p, this model's expert shape),
or else the roofline ``expert_overhead_s + max(bytes_p / hbm, flops(m) / peak_p)``. Using
the mean tokens per expert is an approximation: kernels with uneven groups are costed as if
the tokens were spread evenly.

The non-MoE part of a layer (attention, norms, router, shared experts, amortized dense layers)
costs ``launch_s * non_moe_launches + max(bytes / hbm, tokens * flops / peak_bf16)``: its
weights are read once per pass, its FLOPs scale with the pass's tokens. KV-cache reads are
not modelled.

A profile calibrated against a graph-captured runtime may replace parts of this (all absent in
the datasheet presets, which then cost exactly as above): ``non_moe_table`` gives the non-MoE
seconds per layer measured by tokens (instead of launches + roofline); ``fused_moe`` makes all
precision classes of a layer step one launch, so the expert launch cost is charged once per
layer step (with the non-MoE part) and not per class; ``step_overhead_s`` is charged once per
forward pass, at its first layer step (embedding and head, graph launch, table updates,
routing read-back).

Host experts (``MissRule.HOST``) run from the bf16 host copy: per expert
``host_overhead_s + max(bytes_bf16 / host_bw, flops(m) / host_flops)``.

A profile with a whole-pass graph table for the model's shape (:class:`core.hardware.GraphPassTable`,
fitted to timed synthetic passes of the graph-captured runtime) prices every layer step from it
instead (:meth:`KernelModel.graph_steps`): rows, KV position and the served precision mix
(a channel mix's per-token and per-expert costs composed from its two precisions' columns).

A channel mix (:class:`core.precision.ChannelMix`, a low copy plus a fraction of channels at
a higher precision) is two launches, its per-expert time ``mix.kernel_time_s(low, high)``
from the two precisions' per-expert times.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
from moebits.core.hardware import GraphPassTable, HardwareProfile, KernelTable, expert_time_s
from moebits.core.model_spec import ModelSpec
from moebits.core.precision import ChannelMix, get_channel_mix


class KernelModel:
    """Kernel times for one model on one machine, for the precisions of one slab plan.

    Precisions are addressed by their index in ``precisions`` (the engine's order)."""

    def __init__(self, hw: HardwareProfile, spec: ModelSpec, precisions: list[str]) -> None:
        self.hw = hw
        self.spec = spec
        self.precisions = list(precisions)
        self.launch_group_s = hw.launch_s * hw.expert_launch_ops
        self._flops_per_token = float(spec.expert_flops_per_token())
        self._mixes: list[ChannelMix | None] = [get_channel_mix(p) for p in precisions]
        per_class = 0.0 if hw.fused_moe else self.launch_group_s
        self._launches = [per_class * (1 if m is None else 2) for m in self._mixes]
        self._memo: dict[tuple[int, int, int], float] = {}
        base = sorted({n for p, m in zip(self.precisions, self._mixes, strict=True)
                       for n in ((p,) if m is None else (m.low, m.high))})
        # (decode, prefill): a table measured with the pool's own classes (a channel mix as one) first, else one
        # that has the mix's two parts (composed, ChannelMix.kernel_time_s)
        self.graph = tuple(hw.graph_table(spec, pre, self.precisions) or hw.graph_table(spec, pre, base)
                           for pre in (False, True))
        self.graphed = any(t is not None for t in self.graph)

    def graph_steps(self, tokens: np.ndarray, prefill: np.ndarray, context: np.ndarray,
                    pass_first: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per layer step, from the profile's :class:`core.hardware.GraphPassTable`: seconds outside
        the experts (the layer's share plus the pass's fixed part at its first step) and the
        per-token and per-expert seconds of each precision ``[S, P]``."""
        S, P = len(tokens), len(self.precisions)
        base, tok_s, cnt_s = np.zeros(S), np.zeros((S, P)), np.zeros((S, P))
        for is_pre, table in ((False, self.graph[0]), (True, self.graph[1])):
            sel = np.flatnonzero(np.asarray(prefill, bool) == is_pre)
            if not sel.size:
                continue
            if table is None:
                raise ValueError(f"hardware profile {self.hw.name!r} has no graph table for {'prefill' if is_pre else 'decode'} "
                                 f"passes of {self.spec.name}; run moebits runtime calibrate --runtime graph for this model")
            missing = sorted({n for j in range(P) for n in self._names(j, table) if n not in table.token_s})
            if missing:
                raise ValueError(f"hardware profile {self.hw.name!r}: graph table has no {missing}; calibrate those precisions")
            T = np.asarray(tokens, float)[sel]
            base[sel] = (table.at(table.layer_s, T) + np.asarray(context, float)[sel] * table.at(table.layer_ctx_s, T)
                         + np.where(np.asarray(pass_first, bool)[sel], table.at(table.fixed_s, T), 0.0))
            for j in range(P):
                tok_s[sel, j] = self._graph_column(j, table.token_s, table, T)
                cnt_s[sel, j] = self._graph_column(j, table.expert_s, table, T)
        return base, tok_s, cnt_s

    def _names(self, p: int, table: GraphPassTable | None = None) -> list[str]:
        """The precisions precision ``p`` is priced with: itself, or a channel mix's two parts where ``table``
        has no column of the mix itself."""
        mix, name = self._mixes[p], self.precisions[p]
        return [name] if mix is None or (table is not None and name in table.token_s) else [mix.low, mix.high]

    def _graph_column(self, p: int, column: dict[str, list[float]], table: GraphPassTable, rows: np.ndarray) -> np.ndarray:
        """Precision ``p``'s graph-table cost at ``rows``; a channel mix the table has no column for composes
        its two precisions' costs as the per-class model does (``mix.kernel_time_s``)."""
        mix = self._mixes[p]
        if mix is None or self.precisions[p] in column:
            return table.at(column[self.precisions[p]], rows)
        low, high = table.at(column[mix.low], rows), table.at(column[mix.high], rows)
        return np.asarray(mix.kernel_time_s(cast(Any, low), cast(Any, high)))  # elementwise on arrays

    def _table(self, name: str) -> KernelTable | None:
        return self.hw.kernel_table(name, self.spec.hidden, self.spec.expert_intermediate)

    def source(self, p: int) -> str:
        """Where precision ``p``'s per-expert time comes from (for the run's log)."""
        return "+".join("table" if self._table(n) is not None else "roofline" for n in self._names(p))

    def _base_per_expert_s(self, name: str, m: np.ndarray) -> np.ndarray:
        return expert_time_s(self.hw, self.spec, name, m)

    def per_expert_s(self, p: int, tokens_per_expert: np.ndarray) -> np.ndarray:
        """Seconds one expert adds to a grouped launch at ``tokens_per_expert`` (array)."""
        m = np.asarray(tokens_per_expert, dtype=np.float64)
        mix = self._mixes[p]
        if mix is None:
            return self._base_per_expert_s(self.precisions[p], m)
        low, high = self._base_per_expert_s(mix.low, m), self._base_per_expert_s(mix.high, m)
        return np.asarray(mix.kernel_time_s(cast(Any, low), cast(Any, high)))  # elementwise on arrays

    def group_s_vec(self, p: int, tokens: np.ndarray, n: np.ndarray) -> np.ndarray:
        """Seconds of one grouped launch per row (0 where ``n`` is 0)."""
        tokens = np.asarray(tokens, dtype=np.float64)
        n = np.asarray(n, dtype=np.float64)
        safe_n = np.where(n > 0, n, 1.0)
        t = self._launches[p] + n * self.per_expert_s(p, tokens / safe_n)
        return np.where(n > 0, t, 0.0)

    def group_s(self, p: int, tokens: int, n: int) -> float:
        """Scalar :meth:`group_s_vec`, memoized (bit-identical to the vector form)."""
        key = (p, tokens, n)
        t = self._memo.get(key)
        if t is None:
            t = self._memo[key] = float(self.group_s_vec(p, np.array([tokens]), np.array([n]))[0])
        return t

    def non_moe_s(self, tokens: np.ndarray, pass_first: np.ndarray | None = None) -> np.ndarray:
        """Seconds of the non-MoE part of one layer for passes of ``tokens`` tokens; where
        ``pass_first`` (bool per step) is true, plus the profile's per-pass ``step_overhead_s``."""
        spec, hw = self.spec, self.hw
        tokens = np.asarray(tokens, dtype=np.float64)
        if hw.non_moe_table is not None and hw.non_moe_table.hidden in (0, spec.hidden):
            out = hw.non_moe_table.layer_s(tokens)
        else:
            mem = spec.non_expert_bytes_per_layer / (hw.hbm_gbps * 1e9)
            comp = tokens * spec.non_expert_flops_per_token_per_layer / hw.peak_flops("bf16")
            out = hw.launch_s * hw.non_moe_launches + np.maximum(mem, comp)
        if hw.fused_moe:
            out = out + self.launch_group_s  # the one expert launch of every layer step
        if pass_first is not None and hw.step_overhead_s > 0:
            out = out + np.where(np.asarray(pass_first, bool), hw.step_overhead_s, 0.0)
        return out

    def host_expert_s(self, tokens_per_expert: int) -> float:
        """Seconds the host takes for one expert (bf16 weights) at ``tokens_per_expert``."""
        hw = self.hw
        mem = self.spec.expert_bytes("bf16") / (hw.host_gbps * 1e9)
        comp = tokens_per_expert * self._flops_per_token / (hw.host_gflops * 1e9)
        return hw.host_overhead_s + max(mem, comp)

    def activation_bytes(self, tokens: int) -> int:
        """Bytes of ``tokens`` bf16 hidden states (what a host expert sends or receives)."""
        return 2 * self.spec.hidden * tokens
