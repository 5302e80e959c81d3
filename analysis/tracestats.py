"""Why a cache policy wins on a workload: skew, reuse and reuse distance of the replayed steps.

Computed on exactly what the study replays (the ``conf/experiment/trace/<name>.yaml``
workload: its file, batch and ``max_seqs`` cap), from its layer steps (:mod:`core.routing`):
the accesses are the distinct experts each layer step needs, in replay order, keyed by
(layer, expert). Definitions:

- ``top10_share``: share of routed tokens taken by each layer's ceil(10%) most used experts
  (activation-weighted over layers; uniform routing gives ~0.1);
- ``step_reuse``: share of a layer step's experts that the previous step of the same layer
  also needed (in the same batch);
- stack (reuse) distance of an access: the number of *distinct other* experts, of any layer,
  accessed since the previous access to the same expert (cold: none). An LRU cache of C
  experts shared by all layers hits exactly the accesses with distance < C (Mattson et al.
  1970), so ``lru_hit@K`` is the LRU hit rate of a one-precision cache as large as budget K
  buys in bf16 slabs (the ``lru_offload`` setting of the study);
- ``freq_hit@K``: share of accesses to the C most accessed experts of the replay itself (a
  static cache that knows the frequencies: the in-sample bound of hotness-only caching);
  ``profile_hit@K``: the same with the C experts most used in the held-out profile (what a
  static frequency allocation can know);
- ``median_distance_frac``: median reuse distance over the model's layers x experts.

Frequency beating recency (``freq_hit`` > ``lru_hit``) says lasting hotness dominates; the
reverse says short-term locality does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from moebits.core.model_spec import ModelSpec
from moebits.core.routing import LayerSteps

# budget kinds as (precision, fraction): the budget, in bf16 slabs, of a one-precision bf16 cache
BUDGETS = {"all_int2": ("int2", 1.0), "all_int3": ("int3", 1.0), "bf16_25pct": ("bf16", 0.25),
           "all_int4": ("int4", 1.0), "bf16_50pct": ("bf16", 0.5)}


def accesses(view: LayerSteps, experts: int) -> np.ndarray:
    """Flat ids ``layer * experts + expert`` of every needed expert of every step, in order."""
    sizes = np.diff(np.asarray(view.offsets))
    layer = np.repeat(np.asarray(view.ls_layer, np.int64), sizes)
    return layer * experts + np.asarray(view.ex_expert, np.int64)


def stack_distances(keys: np.ndarray) -> np.ndarray:
    """Reuse distance of each access (distinct other keys since the last access; -1: cold).

    Fenwick tree over access times holding a mark at each key's latest access: O(N log N)."""
    n = len(keys)
    tree = [0] * (n + 1)
    out = np.full(n, -1, dtype=np.int64)
    last: dict[int, int] = {}

    def add(i: int, v: int) -> None:
        i += 1
        while i <= n:
            tree[i] += v
            i += i & -i

    def prefix(i: int) -> int:  # marks at positions < i
        s = 0
        while i > 0:
            s += tree[i]
            i -= i & -i
        return s

    for t, k in enumerate(keys.tolist()):
        p = last.get(k)
        if p is not None:
            out[t] = prefix(t) - prefix(p + 1)
            add(p, -1)
        add(t, 1)
        last[k] = t
    return out


def top_share(view: LayerSteps, layers: int, experts: int) -> float:
    """Activation-weighted mean over layers of the top-10% experts' share of routed tokens."""
    counts = view.counts(layers, experts).astype(np.float64)  # [L, E]
    total = counts.sum(axis=1)
    k = max(1, int(np.ceil(0.1 * experts)))
    top = -np.sort(-counts, axis=1)[:, :k].sum(axis=1)
    used = total > 0
    return float(top[used].sum() / total[used].sum()) if used.any() else float("nan")


def step_reuse(view: LayerSteps) -> float:
    """Share of a step's experts needed by the previous step of the same layer and batch."""
    off = np.asarray(view.offsets)
    ex = np.asarray(view.ex_expert)
    prev: dict[tuple[int, int], set[int]] = {}
    hit = total = 0
    for i, (b, layer) in enumerate(zip(np.asarray(view.ls_batch).tolist(), np.asarray(view.ls_layer).tolist(),
                                       strict=True)):
        cur = set(ex[off[i] : off[i + 1]].tolist())
        before = prev.get((b, layer))
        if before is not None:
            hit += len(cur & before)
            total += len(cur)
        prev[(b, layer)] = cur
    return hit / total if total else float("nan")


def _top_c_hit(counts: np.ndarray, keys: np.ndarray, c: int) -> float:
    top = np.argsort(-counts, kind="stable")[:c]
    return float(np.isin(keys, top).mean()) if len(keys) else float("nan")


def capacity(spec: ModelSpec, kind: str) -> int:
    """bf16 expert slabs that budget ``kind`` buys (the lru_offload cache size)."""
    precision, fraction = BUDGETS[kind]
    return int(fraction * spec.all_experts_bytes(precision)) // spec.expert_bytes("bf16")


@dataclass
class WorkloadStats:
    """The statistics of one replayed workload (see the module docstring)."""

    name: str
    values: dict[str, Any]


def workload_stats(name: str, view: LayerSteps, spec: ModelSpec, profile: LayerSteps | None) -> WorkloadStats:
    """All statistics of the module docstring for one replay view."""
    n = spec.layers * spec.experts
    keys = accesses(view, spec.experts)
    dist = stack_distances(keys)
    counts = np.bincount(keys, minlength=n)
    prof = np.bincount(accesses(profile, spec.experts), minlength=n) if profile is not None else None
    reuse = dist[dist >= 0]
    values: dict[str, Any] = {
        "model": spec.name, "layers_used": int(np.unique(np.asarray(view.ls_layer)).size), "experts": spec.experts,
        "top_k": spec.top_k, "layer_steps": view.layer_steps, "accesses": len(keys),
        "experts_touched_frac": float((counts > 0).mean()),
        "top10_share": top_share(view, spec.layers, spec.experts),
        "step_reuse": step_reuse(view),
        "cold_frac": float((dist < 0).mean()) if len(dist) else float("nan"),
        "median_distance_frac": float(np.median(reuse) / n) if len(reuse) else float("nan"),
    }
    for kind in BUDGETS:
        c = capacity(spec, kind)
        values[f"lru_hit@{kind}"] = float(((dist >= 0) & (dist < c)).mean()) if len(dist) else float("nan")
        values[f"freq_hit@{kind}"] = _top_c_hit(counts, keys, c)
        values[f"profile_hit@{kind}"] = _top_c_hit(prof, keys, c) if prof is not None else float("nan")
    return WorkloadStats(name, values)


def study_workload(name: str) -> tuple[LayerSteps, ModelSpec, LayerSteps | None]:
    """The replay view, model and profile of ``conf/experiment/trace/<name>.yaml``."""
    from hydra import compose, initialize_config_dir
    from moebits.sim.app import CONF_DIR
    from moebits.sim.config import RunConfig, register_configs
    from moebits.traces.workload import load_profile, load_workload
    from omegaconf import OmegaConf

    if not (CONF_DIR / "experiment" / "trace" / f"{name}.yaml").exists():
        known = sorted(p.stem for p in (CONF_DIR / "experiment" / "trace").glob("*.yaml"))
        raise ValueError(f"unknown study trace {name!r}; known: {', '.join(known)}")
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=[f"+experiment/trace={name}"]))
    assert isinstance(cfg, RunConfig)
    work = load_workload(cfg.workload, None, cfg.seed)
    prof_path = cfg.workload.profile_path
    profile = load_profile(prof_path, work.spec) if prof_path and Path(prof_path).expanduser().exists() else None
    return work.view, work.spec, profile


def study_traces() -> list[str]:
    """The study's trace names (``conf/experiment/trace/*.yaml``)."""
    from moebits.sim.app import CONF_DIR

    return sorted(p.stem for p in (CONF_DIR / "experiment" / "trace").glob("*.yaml"))


def stats_table(names: list[str], progress: bool = True) -> pd.DataFrame:
    """One row per study trace."""
    from tqdm import tqdm

    rows = []
    for name in tqdm(names, desc="trace stats", unit="trace", disable=not progress):
        view, spec, profile = study_workload(name)
        rows.append({"trace": name, **workload_stats(name, view, spec, profile).values})
    return pd.DataFrame(rows).set_index("trace")
