"""HardwareProfile: what a machine costs in time, as plain data.

A profile holds the numbers an engine needs to price a replay, nothing model-specific except
the optional measured kernel tables (keyed by the expert shape they were measured at):

- ``h2d`` / ``d2h``: one PCIe direction each, ``t(bytes) = latency_s + bytes / bandwidth(bytes)``
  with the bandwidth interpolated (in log bytes) from measured points, clamped at both ends;
- HBM: capacity and effective streaming-read bandwidth;
- dense peak throughput per precision (formats without an entry run at the ``bf16`` rate,
  i.e. dequantize-then-GEMM);
- ``launch_s``: one kernel launch; a grouped expert launch costs ``expert_launch_ops`` of them,
  the non-MoE part of a layer (attention, norms, router, shared experts) ``non_moe_launches``;
- ``kernel_tables``: measured per-expert time of a grouped launch, by precision and tokens per
  expert, at one expert shape (hidden, intermediate); where none matches, a roofline stands in;
- a host (CPU) model for experts computed on the host (``MissRule.HOST``);
- optional, written by calibration against a graph-captured runtime (absent = the model above,
  unchanged): ``non_moe_table`` (measured seconds of a layer's non-MoE block by tokens of the
  pass, replacing launches + roofline), ``fused_moe`` (all precision classes of a layer step in
  one launch: the expert launch cost is paid once per layer step, not once per class) and
  ``step_overhead_s`` (fixed cost of every forward pass: embedding and head, graph launch,
  residency-table updates, the routing read-back);
- optional, written by the whole-pass calibration (:mod:`runtime.pass_designs`): ``graph_tables``
  (:class:`GraphPassTable`: a whole captured step priced by rows, KV position and the precision
  mix, per model shape; when one matches the model it replaces the three fields above) and
  ``layer_sync_s`` (the host turnaround of a per-layer graph step: routing read-back, the
  host's decisions, the next graph's launch; charged per layer step on the per-layer seam) and
  ``stall_sync_s`` (the host's extra turnaround when a step waits for a copy: issue, wait, table
  write; charged per waiting layer step);
- optional, fitted to synthetic runs of a graph runtime (:mod:`analysis.hostcost`): ``pass_io_s``
  (the device time of a pass's own copies outside its captured graph: the inputs uploaded before
  it, the routing read back after it) and ``host_costs``
  (:class:`HostCosts`: the controller's own host work, which a pass waits for when it is longer
  than the device's work: per pass, per copy, per expert of a per-layer step, and per policy
  the cost of observing a layer step);
- ``calibration``: provenance of a measured profile (gpu, driver, torch, date, runtime path).

Presets are YAML files of this schema under ``conf/hardware/``; runtime calibration writes
more of them. ``from_dict``/``to_dict`` are the file edge. Units are in the names: ``_s``
seconds, ``_gbps`` GB/s (1e9 bytes), ``_gb`` GB (1e9 bytes), ``_tflops`` 1e12 FLOP/s.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from moebits.core.model_spec import ModelSpec


@dataclass
class LinkCurve:
    """One PCIe direction: ``latency_s`` plus bytes over a size-dependent bandwidth.

    ``sizes_bytes`` (ascending) and ``gbps`` are measured points; between them the bandwidth
    is interpolated linearly in log(bytes), outside them it is clamped.
    """

    latency_s: float
    sizes_bytes: list[float]
    gbps: list[float]

    def __post_init__(self) -> None:
        if self.latency_s < 0:
            raise ValueError(f'"latency_s" must be >= 0, got {self.latency_s}.')
        if not self.sizes_bytes or len(self.sizes_bytes) != len(self.gbps):
            raise ValueError('"sizes_bytes" and "gbps" must be non-empty and of equal length.')
        if any(b <= a for a, b in zip(self.sizes_bytes, self.sizes_bytes[1:], strict=False)):
            raise ValueError(f'"sizes_bytes" must be strictly ascending, got {self.sizes_bytes}.')
        if min(self.sizes_bytes) <= 0 or min(self.gbps) <= 0:
            raise ValueError('"sizes_bytes" and "gbps" must be > 0.')

    def bandwidth_gbps(self, nbytes: float) -> float:
        """Bandwidth at a transfer of ``nbytes`` (log-linear interpolation, clamped)."""
        x = math.log(max(nbytes, 1.0))
        return float(np.interp(x, np.log(self.sizes_bytes), self.gbps))

    def time_s(self, nbytes: float) -> float:
        """Seconds to move ``nbytes`` one way (0 bytes cost nothing)."""
        if nbytes <= 0:
            return 0.0
        return self.latency_s + nbytes / (self.bandwidth_gbps(nbytes) * 1e9)


@dataclass
class KernelTable:
    """Measured per-expert seconds of a grouped expert launch (launch overhead excluded).

    Valid for experts of shape ``hidden`` x ``intermediate`` in ``precision``; ``tokens`` are
    tokens per expert (ascending), ``seconds`` the time each expert adds to the launch.
    """

    precision: str
    hidden: int
    intermediate: int
    tokens: list[float]
    seconds: list[float]

    def __post_init__(self) -> None:
        if not self.tokens or len(self.tokens) != len(self.seconds):
            raise ValueError(f'kernel table {self.precision}: "tokens" and "seconds" must be non-empty and of equal length.')
        if any(b <= a for a, b in zip(self.tokens, self.tokens[1:], strict=False)) or self.tokens[0] <= 0:
            raise ValueError(f'kernel table {self.precision}: "tokens" must be positive and strictly ascending.')
        if min(self.seconds) < 0:
            raise ValueError(f'kernel table {self.precision}: "seconds" must be >= 0.')

    def per_expert_s(self, tokens: np.ndarray) -> np.ndarray:
        """Per-expert seconds at ``tokens`` per expert: interpolated inside the table,
        continued along the last segment's slope above it (proportionally for one point)."""
        xs, ys = np.asarray(self.tokens, float), np.asarray(self.seconds, float)
        t = np.asarray(tokens, float)
        out = np.interp(t, xs, ys)
        if xs.size == 1:
            slope = ys[0] / xs[0]
        else:
            slope = max((ys[-1] - ys[-2]) / (xs[-1] - xs[-2]), 0.0)
        above = t > xs[-1]
        return np.where(above, ys[-1] + (t - xs[-1]) * slope, out)


@dataclass
class HostCosts:
    """The controller's host work on a graph-captured runtime, which the device waits for whenever it is
    longer than the device's own work (Python decisions, bookkeeping, launches).

    ``pass_s``: per pass on the per-pass seam (inputs, graph launch, routing read-back, table snapshot);
    ``copy_s``: per copy a policy issues (promotion or prefetch: slab bookkeeping, the copy's launch, table
    writes); ``stage_s``: per expert streamed through a staging slab on the per-layer seam (its copy and its
    launch, both issued by the host; 0: ``copy_s``); ``entry_s``: per distinct expert of a layer step on the per-layer seam (the miss rule, the
    record; on top of ``HardwareProfile.layer_sync_s``); ``layer_s``: per policy, ``[seconds per layer step,
    seconds per distinct expert]`` of host work on the per-layer seam beyond a static policy's (the miss rule's
    lookups, records; either may be negative: a difference of two fits); ``pass_own_s``: per policy, seconds of
    host work per pass on the per-pass seam beyond a static policy's ``pass_s`` (its boundary: decisions, the
    driver's bookkeeping, outside its observation and copies; may be negative); ``layer_copy_s``: on the
    per-layer seam, ``[seconds per layer step that issues copies, seconds per copy]`` (a step's copies share
    one issue: 46 us per issuing step + 33 us per copy fitted on the H200 host, session 8; empty: ``copy_s`` per copy);
    ``observe_s``: per policy (its registry name),
    ``[seconds per observed layer step, seconds per observed expert]`` of ``Driver.observe`` (a policy
    not listed observes for free); ``fit``: how they were fitted, for the record; ``probe_s``: the host speed
    they hold at (``runtime.host_log.host_probe_s`` seconds; 0: unknown, never rescaled); ``speed_exponent``:
    on a host whose probe reads ``p``, every cost is ``(p / probe_s) ** speed_exponent`` times longer (1: in
    proportion; below 1: part of the host work, driver calls and syncs, does not follow the CPU's speed).
    """

    pass_s: float = 0.0
    copy_s: float = 0.0
    entry_s: float = 0.0
    observe_s: dict[str, list[float]] = field(default_factory=dict)
    fit: dict[str, float] = field(default_factory=dict)
    probe_s: float = 0.0
    speed_exponent: float = 1.0
    stage_s: float = 0.0
    layer_s: dict[str, list[float]] = field(default_factory=dict)
    pass_own_s: dict[str, float] = field(default_factory=dict)
    layer_copy_s: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("pass_s", "copy_s", "entry_s", "probe_s", "speed_exponent", "stage_s"):
            if getattr(self, name) < 0:
                raise ValueError(f'host costs: "{name}" must be >= 0, got {getattr(self, name)}')
        if not isinstance(self.observe_s, dict):
            raise ValueError(f"host costs: observe_s must map a policy name to [seconds per step, seconds per "
                             f"expert]; got {self.observe_s!r}")
        for policy, c in self.observe_s.items():
            if not isinstance(c, (list, tuple)) or len(c) != 2 or min(c) < 0:
                raise ValueError(f"host costs: observe_s[{policy!r}] must be [seconds per step, seconds per expert], "
                                 f"both >= 0; got {c}")
        if not isinstance(self.layer_s, dict):
            raise ValueError(f"host costs: layer_s must map a policy name to [seconds per layer step, seconds per "
                             f"expert]; got {self.layer_s!r}")
        for policy, c in self.layer_s.items():
            if not isinstance(c, (list, tuple)) or len(c) != 2 or not all(np.isfinite(c)):
                raise ValueError(f"host costs: layer_s[{policy!r}] must be [seconds per layer step, seconds per expert] "
                                 f"(finite); got {c}")
        if len(self.layer_copy_s) not in (0, 2) or any(not np.isfinite(c) or c < 0 for c in self.layer_copy_s):
            raise ValueError(f"host costs: layer_copy_s must be [] or [seconds per layer step that issues copies, "
                             f"seconds per copy], both >= 0; got {self.layer_copy_s!r}")
        if not isinstance(self.pass_own_s, dict) or not all(
                isinstance(c, (int, float)) and np.isfinite(c) for c in self.pass_own_s.values()):
            raise ValueError(f"host costs: pass_own_s must map a policy name to seconds per pass (finite); "
                             f"got {self.pass_own_s!r}")

    def observe(self, policy: str) -> tuple[float, float]:
        """(seconds per observed layer step, per observed expert) of ``policy``."""
        c = self.observe_s.get(policy)
        return (c[0], c[1]) if c else (0.0, 0.0)

    def layer(self, policy: str) -> tuple[float, float]:
        """(seconds per layer step, per distinct expert) of ``policy``'s per-layer host work beyond a static one's."""
        c = self.layer_s.get(policy)
        return (c[0], c[1]) if c else (0.0, 0.0)

    def pass_work(self, policy: str) -> float:
        """Seconds of ``policy``'s host work per pass on the per-pass seam, before copies and observation."""
        return max(0.0, self.pass_s + self.pass_own_s.get(policy, 0.0))

    def layer_copy(self) -> tuple[float, float]:
        """(seconds per layer step that issues copies, per copy) on the per-layer seam."""
        return (self.layer_copy_s[0], self.layer_copy_s[1]) if self.layer_copy_s else (0.0, self.copy_s)

    def speed_factor(self, probe_s: float) -> float:
        """How many times longer every cost is on a host whose probe reads ``probe_s``."""
        return (probe_s / self.probe_s) ** self.speed_exponent

    def scaled(self, factor: float, probe_s: float | None = None) -> HostCosts:
        """Every cost ``factor`` times longer (now held at ``probe_s``, when given)."""
        return dataclasses.replace(self, pass_s=self.pass_s * factor, copy_s=self.copy_s * factor,
                                   stage_s=self.stage_s * factor, entry_s=self.entry_s * factor, probe_s=self.probe_s if probe_s is None else probe_s,
                                   observe_s={p: [c[0] * factor, c[1] * factor] for p, c in self.observe_s.items()},
                                   layer_s={p: [c[0] * factor, c[1] * factor] for p, c in self.layer_s.items()},
                                   pass_own_s={p: c * factor for p, c in self.pass_own_s.items()},
                                   layer_copy_s=[c * factor for c in self.layer_copy_s])


@dataclass
class NonMoeTable:
    """Measured seconds of one layer's non-MoE block (attention, norms, router) by tokens of the pass.

    Interpolated inside the table, continued along the last segment's slope above it (like
    :class:`KernelTable`); ``context`` is the KV-cache length it was measured at.
    """

    tokens: list[float]
    seconds: list[float]
    context: int = 0
    hidden: int = 0     # the model width it was measured at (0: any); another width prices by roofline

    def __post_init__(self) -> None:
        if not self.tokens or len(self.tokens) != len(self.seconds):
            raise ValueError('non-MoE table: "tokens" and "seconds" must be non-empty and of equal length.')
        if any(b <= a for a, b in zip(self.tokens, self.tokens[1:], strict=False)) or self.tokens[0] <= 0:
            raise ValueError('non-MoE table: "tokens" must be positive and strictly ascending.')
        if min(self.seconds) < 0:
            raise ValueError('non-MoE table: "seconds" must be >= 0.')

    def layer_s(self, tokens: np.ndarray) -> np.ndarray:
        """Seconds per layer at passes of ``tokens`` tokens (array)."""
        xs, ys = np.asarray(self.tokens, float), np.asarray(self.seconds, float)
        t = np.asarray(tokens, float)
        slope = 0.0 if xs.size == 1 else max((ys[-1] - ys[-2]) / (xs[-1] - xs[-2]), 0.0)
        return np.where(t > xs[-1], ys[-1] + (t - xs[-1]) * slope, np.interp(t, xs, ys))


@dataclass
class GraphPassTable:
    """Whole-step graph cost of one model shape (a graph-captured runtime), fitted to timed synthetic
    passes (:mod:`runtime.pass_designs`); ``prefill`` tables price prefill passes (T rows of one
    sequence), the others decode passes.

    Per rows ``T`` of a pass (interpolated linearly between the measured ``rows``, held beyond
    them) a pass costs ``fixed_s(T)`` plus, per layer step, ``layer_s(T) + context * layer_ctx_s(T)
    + sum_p (tok_p * token_s[p](T) + cnt_p * expert_s[p](T))``: ``tok_p`` the (row, expert) pairs
    served in precision ``p``, ``cnt_p`` the distinct experts, ``context`` the KV-cache position.
    ``classes``: the precisions the measured pool held (the kernels are specialised on them).
    """

    hidden: int
    intermediate: int
    experts: int
    top_k: int
    prefill: bool
    rows: list[float]
    fixed_s: list[float]
    layer_s: list[float]
    layer_ctx_s: list[float]
    token_s: dict[str, list[float]]
    expert_s: dict[str, list[float]]
    fit: dict[str, float] = field(default_factory=dict)   # fit quality (e.g. cross-validated error), for the record
    classes: list[str] = field(default_factory=list)       # the pool's precisions it was measured with ([]: any)

    def __post_init__(self) -> None:
        n = len(self.rows)
        cols = [self.fixed_s, self.layer_s, self.layer_ctx_s, *self.token_s.values(), *self.expert_s.values()]
        if not n or any(len(c) != n for c in cols) or any(b <= a for a, b in zip(self.rows, self.rows[1:], strict=False)):
            raise ValueError("graph pass table: every column needs one value per row count, rows strictly ascending")
        if set(self.token_s) != set(self.expert_s):
            raise ValueError("graph pass table: token_s and expert_s must name the same precisions")

    def matches(self, spec: ModelSpec) -> bool:
        return (self.hidden, self.intermediate, self.experts, self.top_k) == (
            spec.hidden, spec.expert_intermediate, spec.experts, spec.top_k)

    def at(self, column: list[float], rows: Any) -> np.ndarray:
        """``column`` interpolated at ``rows`` (array)."""
        return np.interp(np.asarray(rows, float), np.asarray(self.rows, float), np.asarray(column, float))


@dataclass
class HardwareProfile:
    """A machine's cost model; see the module docstring for every field's meaning."""

    name: str
    hbm_capacity_gb: float
    hbm_gbps: float
    h2d: LinkCurve
    d2h: LinkCurve
    peak_tflops: dict[str, float]
    launch_s: float
    expert_launch_ops: int = 3
    non_moe_launches: int = 8
    expert_overhead_s: float = 0.0
    kernel_tables: list[KernelTable] = field(default_factory=list)
    host_gflops: float = 1000.0
    host_gbps: float = 80.0
    host_overhead_s: float = 10e-6
    source: str = ""
    non_moe_table: NonMoeTable | None = None
    fused_moe: bool = False
    step_overhead_s: float = 0.0
    graph_tables: list[GraphPassTable] = field(default_factory=list)
    layer_sync_s: float = 0.0
    stall_sync_s: float = 0.0
    pass_io_s: float = 0.0
    host_costs: HostCosts | None = None
    calibration: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("hbm_capacity_gb", "hbm_gbps", "host_gflops", "host_gbps"):
            if getattr(self, name) <= 0:
                raise ValueError(f'"{name}" must be > 0 in hardware profile {self.name!r}.')
        for name in ("launch_s", "expert_overhead_s", "host_overhead_s", "expert_launch_ops", "non_moe_launches",
                     "step_overhead_s", "layer_sync_s", "stall_sync_s", "pass_io_s"):
            if getattr(self, name) < 0:
                raise ValueError(f'"{name}" must be >= 0 in hardware profile {self.name!r}.')
        if self.peak_tflops.get("bf16", 0) <= 0:
            raise ValueError(f'"peak_tflops" needs a positive "bf16" entry in hardware profile {self.name!r}.')
        keys = [(t.precision, t.hidden, t.intermediate) for t in self.kernel_tables]
        if len(set(keys)) != len(keys):
            raise ValueError(f"hardware profile {self.name!r} has two kernel tables for one (precision, shape)")

    @property
    def hbm_capacity_bytes(self) -> int:
        return int(self.hbm_capacity_gb * 1e9)

    def peak_flops(self, precision: str) -> float:
        """Dense FLOP/s for GEMMs on weights in ``precision`` (bf16 rate when not listed)."""
        return self.peak_tflops.get(precision, self.peak_tflops["bf16"]) * 1e12

    def kernel_table(self, precision: str, hidden: int, intermediate: int) -> KernelTable | None:
        """The measured table for this precision and expert shape, or None (roofline)."""
        for t in self.kernel_tables:
            if (t.precision, t.hidden, t.intermediate) == (precision, hidden, intermediate):
                return t
        return None

    def at_host_speed(self, probe_s: float | None) -> HardwareProfile:
        """This profile on a host whose speed probe reads ``probe_s`` (``runtime.host_log.host_probe_s``): the
        host-side costs (``host_costs``, ``layer_sync_s``, ``stall_sync_s``) scaled by
        :meth:`HostCosts.speed_factor`; the device side (``pass_io_s`` included) unchanged. Unchanged when either
        probe is unknown."""
        hc = self.host_costs
        if hc is None or not hc.probe_s or not probe_s:
            return self
        f = hc.speed_factor(probe_s)
        return dataclasses.replace(self, host_costs=hc.scaled(f, probe_s), layer_sync_s=self.layer_sync_s * f,
                                   stall_sync_s=self.stall_sync_s * f)

    def graph_table(self, spec: ModelSpec, prefill: bool, classes: list[str] | None = None) -> GraphPassTable | None:
        """The whole-step graph table of ``spec``'s shape for prefill or decode passes, or None. The
        fused kernels are compiled for the precisions a pool holds, so a table measured with exactly
        ``classes`` is preferred, else the one measured with the fewest precisions that include them."""
        fits = [t for t in self.graph_tables if t.prefill == prefill and t.matches(spec)
                and (classes is None or not t.classes or set(classes) <= set(t.classes))]
        if not fits:
            return None
        return min(fits, key=lambda t: (len(t.classes) if t.classes else 1 << 10))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (the YAML schema of ``conf/hardware/``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HardwareProfile:
        """Inverse of :meth:`to_dict`; unknown keys are an error that names them."""
        body = dict(data)
        _check_keys(cls, body, "hardware profile")
        for side in ("h2d", "d2h"):
            if isinstance(body.get(side), dict):
                _check_keys(LinkCurve, body[side], f"hardware profile {side}")
                body[side] = LinkCurve(**body[side])
        tables = []
        for t in body.get("kernel_tables", []) or []:
            _check_keys(KernelTable, t, "kernel table")
            tables.append(KernelTable(**t))
        body["kernel_tables"] = tables
        if isinstance(body.get("non_moe_table"), dict):
            _check_keys(NonMoeTable, body["non_moe_table"], "non-MoE table")
            body["non_moe_table"] = NonMoeTable(**body["non_moe_table"])
        graphs = []
        for t in body.get("graph_tables", []) or []:
            _check_keys(GraphPassTable, t, "graph pass table")
            graphs.append(GraphPassTable(**t))
        body["graph_tables"] = graphs
        if isinstance(body.get("host_costs"), dict):
            _check_keys(HostCosts, body["host_costs"], "host costs")
            body["host_costs"] = HostCosts(**body["host_costs"])
        try:
            return cls(**body)
        except TypeError as exc:
            raise ValueError(f"hardware profile {body.get('name', '?')!r}: {exc}") from None


def _check_keys(cls: type, body: dict[str, Any], what: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(body) - names)
    if unknown:
        raise ValueError(f"unknown {what} field(s) {unknown}; known: {sorted(names)}")


def expert_time_s(hw: HardwareProfile, spec: ModelSpec, precision: str, tokens_per_expert: Any) -> np.ndarray:
    """Seconds one ``spec`` expert in ``precision`` adds to a grouped launch at ``tokens_per_expert``
    (array): the profile's measured kernel table for this shape, else the roofline
    ``expert_overhead_s + max(bytes / hbm, flops / peak)``. The simulator's kernel model
    (:mod:`sim.kernels`) times with it, and so do policies that weigh kernel cost (mxmoe)."""
    m = np.asarray(tokens_per_expert, dtype=np.float64)
    table = hw.kernel_table(precision, spec.hidden, spec.expert_intermediate)
    if table is not None:
        return table.per_expert_s(m)
    mem = spec.expert_bytes(precision) / (hw.hbm_gbps * 1e9)
    comp = m * float(spec.expert_flops_per_token()) / hw.peak_flops(precision)
    return hw.expert_overhead_s + np.maximum(mem, comp)

