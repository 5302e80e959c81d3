"""From a :class:`RuntimeRunConfig` to a finished live run: model, host store, engine, passes.

Two modes (``runtime.mode``):

- ``GENERATE``: a transformers model of the configured :class:`core.model_spec.ModelSpec` (random
  weights, or ``runtime.model_dir``) generates greedily with the moebits experts installed and
  the policy in the loop: ``workload.seqs`` prompts of ``workload.prompt_tokens`` random tokens,
  ``workload.batch`` at a time, ``workload.decode_tokens`` decode passes each. With
  ``runtime.kl`` each batch is then re-run through the exact bf16 experts (teacher forcing on
  the same tokens) and the KL divergence of every pass's next-token distribution is recorded.
- ``REPLAY``: a workload (``workload=default``, ``workload=file`` or ``workload=synth``, loaded
  by :mod:`traces.workload` as the simulator loads it) drives the engine layer step by layer
  step (:func:`runtime.replay.replay`), with random expert weights and activations.

A model too large for the machine is scaled down: ``runtime.layers`` MoE layers, hidden and
expert sizes times ``runtime.scale`` (rounded up to multiples of 128, the int4 group) and a
``runtime.vocab`` vocabulary; 0 picks defaults (everything on a GPU; 2 layers, 1/8 and 4096 on
a CPU). With ``runtime.scale_budget`` the expert budget shrinks with the experts (the budget is
resolved for the full model, then multiplied by the ratio of the scaled to the full model's
expert bytes), so a policy keeps the same share of experts resident.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from moebits.core.config import BaseRunConfig, budget_bytes
from moebits.core.model_spec import ModelSpec
from moebits.core.quality import SensitivityTable
from moebits.drive.context import policy_metrics, run_info
from moebits.drive.records import RunResult, summarize
from moebits.policies._tables import run_table
from moebits.policies.base import Policy, build_policy
from moebits.runtime.engine import RuntimeEngine
from moebits.runtime.host_store import HostStore, random_weights
from moebits.runtime.quant import QuantMethod
from moebits.runtime.replay import replay
from moebits.traces.format import read_trace
from moebits.traces.replay import ReplayView, build_view, calibration_profile, load_view
from moebits.traces.workload import first_layers, load_workload
from tqdm import tqdm

GROUP = 128  # hidden and intermediate sizes round up to this (the int4/int8 quantization group)


class Mode(Enum):
    """Live generation through a transformers model, or trace-driven replay."""

    GENERATE = "generate"
    REPLAY = "replay"


class EngineKind(Enum):
    """Which runtime replays a trace: the eager one (:class:`runtime.engine.RuntimeEngine`, MoE
    layers only, any policy) or the graph-captured one (:mod:`runtime.graph_run`: whole steps)."""

    EAGER = "eager"
    GRAPH = "graph"


@dataclass
class RuntimeConfig:
    """The runtime's own knobs (``runtime.*``); see the module docstring."""

    mode: Mode = Mode.GENERATE
    engine: EngineKind = EngineKind.EAGER
    device: str = "auto"
    layers: int = 0
    scale: float = 0.0
    vocab: int = 0
    arch: str = "auto"
    model_dir: str | None = None
    kl: bool = True
    quant: QuantMethod = QuantMethod.RTN
    scale_budget: bool = True


@dataclass
class RuntimeRunConfig(BaseRunConfig):
    """One live run: the simulator's shared fields plus ``runtime``."""

    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"runtime.device={name} but no CUDA device is available; use runtime.device=cpu")
    return torch.device(name)


def scaled_spec(spec: ModelSpec, rc: RuntimeConfig, device: torch.device) -> ModelSpec:
    """``spec`` with ``runtime.layers`` / ``scale`` / ``vocab`` applied (CPU defaults when 0)."""
    cpu = device.type == "cpu"
    layers = rc.layers or (min(2, spec.layers) if cpu else spec.layers)
    scale = rc.scale or (0.125 if cpu else 1.0)
    vocab = rc.vocab or (min(spec.vocab_size, 4096) if cpu else spec.vocab_size)
    if layers < 1 or layers > spec.layers or not 0 < scale <= 1 or vocab < 2:
        raise ValueError(f"runtime.layers must be in 1..{spec.layers}, runtime.scale in (0, 1] and runtime.vocab >= 2; "
                         f"got {layers}, {scale}, {vocab}")

    def size(n: int) -> int:
        return n if scale == 1.0 else max(GROUP, math.ceil(n * scale / GROUP) * GROUP)

    return dataclasses.replace(spec, layers=layers, hidden=size(spec.hidden),
                               expert_intermediate=size(spec.expert_intermediate),
                               attention_params=int(spec.attention_params * scale * scale), vocab_size=vocab,
                               dense_params=spec.dense_params * layers // spec.layers)


def resolve_budget(cfg: RuntimeRunConfig, full: ModelSpec, spec: ModelSpec) -> int:
    """Expert budget in bytes for the (possibly scaled) model ``spec``."""
    b = budget_bytes(cfg.budget_gb, cfg.budget, full)
    if cfg.runtime.scale_budget and spec != full:
        b = int(b * spec.all_experts_bytes("bf16") / full.all_experts_bytes("bf16"))
    return b


def sensitivity_table(cfg: RuntimeRunConfig, spec: ModelSpec) -> tuple[SensitivityTable | None, str]:
    """The run's sensitivity table, chosen as the simulator and runtime both do."""
    return run_table(cfg.quality_table, spec, cfg.seed)


# ---------------------------------------------------------------- workloads
def load_replay(cfg: RuntimeRunConfig, device: torch.device) -> tuple[ReplayView, ModelSpec, ModelSpec, str]:
    """The replayed view, the full and the (layer-truncated, size-scaled) model, and the source."""
    layers = cfg.runtime.layers or (2 if device.type == "cpu" else None)
    work = load_workload(cfg.workload, cfg.model.to_spec(), cfg.seed, layers=layers)
    full = work.spec
    spec = scaled_spec(full, dataclasses.replace(cfg.runtime, vocab=full.vocab_size), device)
    return work.view, full, spec, work.source


# ---------------------------------------------------------------- the run
def build_engine(cfg: RuntimeRunConfig, spec: ModelSpec, budget: int, store: HostStore, device: torch.device,
                 profile: Any, future: Any) -> tuple[RuntimeEngine, Policy, str]:
    policy = build_policy(cfg.policy)
    table, table_src = sensitivity_table(cfg, spec)
    if policy.needs_profile and profile is None:
        raise ValueError(f"policy {cfg.policy.name} needs a profiling trace: set workload.profile_path "
                         "(a trace of this model), or use runtime.mode=REPLAY")
    engine = RuntimeEngine(spec, policy, budget, store, device=device, seed=cfg.seed, sensitivity=table,
                           profile=profile, future=future, observe_lag=cfg.observe_lag, hardware=cfg.hardware)
    return engine, policy, table_src


def replay_profile(cfg: RuntimeRunConfig, view: ReplayView, src: str, policy: Policy) -> tuple[Any, str | None]:
    """The profiling trace a replayed run gives its policy, and where it came from (cut to the replayed
    view's layers when the replay runs fewer: ``runtime.layers``, or the CPU's default)."""
    layers = int(np.max(view.ls_layer, initial=0)) + 1
    profile = _profile_view(cfg.workload.profile_path, layers) if cfg.workload.profile_path else None
    profile_src = cfg.workload.profile_path
    cal = calibration_profile(view, src) if profile is None else None
    if cal is not None and policy.needs_profile:
        profile, profile_src = _profile_view(cal, layers), f"{cal} (the trace's CALIBRATION profile)"
    elif profile is None and policy.needs_profile:
        profile, profile_src = view, "in-sample (the replayed trace)"
    return profile, profile_src


def _profile_view(path: str | Path, layers: int) -> ReplayView:
    """The profiling trace at ``path`` as a view of its first ``layers`` MoE layers."""
    view = load_view(path, 1)
    if int(np.max(view.ls_layer, initial=0)) < layers:
        return view
    return build_view(first_layers(read_trace(path), layers), 1)


def run_replay(cfg: RuntimeRunConfig, device: torch.device) -> tuple[RunResult, dict[str, Any]]:
    if cfg.runtime.engine is EngineKind.GRAPH:
        return _graph_replay(cfg, device)
    if cfg.route_lag:
        raise ValueError(f"route_lag={cfg.route_lag} (the per-pass seam) needs the graph-captured runtime: set "
                         "runtime.engine=GRAPH, or route_lag=0")
    view, full, spec, src = load_replay(cfg, device)
    budget = resolve_budget(cfg, full, spec)
    store = HostStore(spec, method=cfg.runtime.quant, progress=cfg.progress)
    store.fill_bf16(random_weights(spec, cfg.seed, device))
    profile, profile_src = replay_profile(cfg, view, src, build_policy(cfg.policy))
    engine, policy, table_src = build_engine(cfg, spec, budget, store, device, profile, view)
    engine.warmup(sorted({int(t) for t in np.unique(view.ls_tokens)})[:4])
    result = replay(engine, view, seed=cfg.seed, progress=cfg.progress)
    return result, _info(cfg, engine, policy, full, spec, budget, src, profile_src, table_src, device)


def _graph_replay(cfg: RuntimeRunConfig, device: torch.device) -> tuple[RunResult, dict[str, Any]]:
    from moebits.runtime.graph_run import ReplaySetup, run_graph_replay

    view, full, spec, src = load_replay(cfg, device)
    budget = resolve_budget(cfg, full, spec)
    policy = build_policy(cfg.policy)
    table, table_src = sensitivity_table(cfg, spec)
    profile, profile_src = replay_profile(cfg, view, src, policy)

    def describe(name: str, precisions: list[str]) -> dict[str, Any]:
        return run_description(cfg, name, precisions, policy, full, spec, budget, src, profile_src, table_src, device)

    return run_graph_replay(cfg, device, ReplaySetup(view, full, spec, budget, policy, table, profile, describe))


def run_generate(cfg: RuntimeRunConfig, device: torch.device) -> tuple[RunResult, dict[str, Any]]:
    from moebits.runtime import hf

    if cfg.runtime.engine is EngineKind.GRAPH or cfg.route_lag:
        raise ValueError("runtime.engine=GRAPH and route_lag replay traces: set runtime.mode=REPLAY "
                         "(GENERATE runs the eager runtime inside a transformers model)")

    rc, w = cfg.runtime, cfg.workload
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if rc.model_dir:
        from moebits.traces.capture import load_model_dir, spec_from_hf_config

        model, _ = load_model_dir(rc.model_dir, dtype, "cpu")
        full = spec = spec_from_hf_config(model.config, name=Path(rc.model_dir).name)
        store = hf.store_from_model(model, spec, method=rc.quant, progress=cfg.progress)
    else:
        want = cfg.model.to_spec()
        if want is None:
            raise ValueError("model=trace needs a trace: use runtime.mode=REPLAY, or pick a model preset")
        full = want
        spec = scaled_spec(full, rc, device)
        model, weights = hf.build_random_model(spec, arch=rc.arch, device=device, dtype=dtype, seed=cfg.seed,
                                               full_hidden=full.hidden)
        store = HostStore(spec, method=rc.quant, progress=cfg.progress).fill_bf16(weights)
    budget = resolve_budget(cfg, full, spec)
    profile = load_view(cfg.workload.profile_path, 1) if cfg.workload.profile_path else None
    engine, policy, table_src = build_engine(cfg, spec, budget, store, device, profile, None)
    runtime = hf.HFRuntime(spec, store, engine, device)
    hf.install(model, runtime)
    model.to(device)
    if w.seqs < 1 or w.batch < 1 or w.prompt_tokens < 1 or w.decode_tokens < 0:
        raise ValueError("workload.seqs, workload.batch and workload.prompt_tokens must be >= 1")
    prompts = hf.random_prompts(w.seqs, w.prompt_tokens, spec.vocab_size, np.random.default_rng(cfg.seed))
    engine.warmup([w.batch, w.batch * w.prompt_tokens])
    if rc.kl:
        engine.rec.kl = {}
    engine.start()
    for b, first in enumerate(tqdm(range(0, w.seqs, w.batch), desc=f"generate {engine.name}", disable=not cfg.progress)):
        batch = torch.from_numpy(prompts[first : first + w.batch]).to(device)
        gen = hf.generate(model, engine, batch, w.decode_tokens, batch=b)
        if rc.kl:
            kl = hf.kl_divergence(hf.reference_logits(model, runtime, gen), gen.logits).mean(0)   # [N + 1]
            for p, v in enumerate(kl.tolist()):
                engine.rec.kl[(b, p)] = v  # type: ignore[index]
    result = engine.finish()
    src = f"generate(seqs={w.seqs}, prompt={w.prompt_tokens}, decode={w.decode_tokens}, random tokens)"
    return result, _info(cfg, engine, policy, full, spec, budget, src, cfg.workload.profile_path, table_src, device)


def run_description(cfg: RuntimeRunConfig, name: str, precisions: list[str], policy: Policy, full: ModelSpec,
                    spec: ModelSpec, budget: int, workload: str, profile: str | None, table_src: str,
                    device: torch.device) -> dict[str, Any]:
    """The summary's description of a live run: the simulator's keys plus the runtime's own."""
    return {
        **run_info(cfg, full.name, budget, workload, profile, table_src), "policy": name,
        "precisions": precisions, "policy_metrics": policy_metrics(policy),
        "engine": "runtime", "mode": cfg.runtime.mode.name, "device": _device_name(device),
        "runtime_model": spec.to_dict(),
    }


def _info(cfg: RuntimeRunConfig, engine: RuntimeEngine, policy: Policy, full: ModelSpec, spec: ModelSpec,
          budget: int, workload: str, profile: str | None, table_src: str, device: torch.device) -> dict[str, Any]:
    return {**run_description(cfg, engine.name, list(engine.precisions), policy, full, spec, budget, workload, profile,
                              table_src, device),
            "pool_bytes": engine.pool.nbytes, "host_store_bytes": engine.store.nbytes()}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def execute(cfg: RuntimeRunConfig) -> tuple[RunResult, dict[str, Any]]:
    """Run ``cfg``; returns the run's arrays and its summary."""
    device = pick_device(cfg.runtime.device)
    t0 = time.perf_counter()
    result, info = (run_replay if cfg.runtime.mode is Mode.REPLAY else run_generate)(cfg, device)
    info["setup_s"] = time.perf_counter() - t0 - result.wall_s
    result.info.update(info)
    return result, summarize(result)
