"""The training loop: byte windows in, a trained causal LM and its training record out.

Dimension legend: B batch, S sequence (bytes), V vocabulary (256), L MoE layers, E experts.

Every step draws ``B`` windows of ``S + 1`` bytes at offsets from a ``numpy`` generator seeded
by the run's seed (the same windows on every machine), and minimises the next-byte cross
entropy plus, for the MoE, ``aux_loss_coef`` x transformers' load-balancing loss (Switch
style, over every layer's router logits). AdamW, bf16 autocast on CUDA, gradient clipping,
and a warmup-stable-decay learning rate: linear warmup, constant, then a linear decay over the
last ``decay_frac`` of the steps to ``min_lr_frac`` x the peak. Because the schedule's first
part does not depend on the step count, ``steps = 0`` lets the loop time its first steps and
then fix as many steps as fit ``time_budget_s``; the count is recorded, and rerunning with
``--steps`` that count repeats the run (exactly on a CPU; on a GPU up to the nondeterminism
of its atomic adds).

Recorded for the MoE (for the router-norm allocation and the profiles): every router row's l2
norm at initialisation and every ``record_every`` steps, and the tokens routed to each expert
in each interval (top-k of the router logits).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from moebits.runtime.hf import set_experts_implementation
from moebits.train.model import DEFAULT, SMOKE, ModelSize
from tqdm import tqdm

LN2 = math.log(2.0)


@dataclass(frozen=True)
class TrainConfig:
    """How ``moebits train fit`` trains (see the module docstring)."""

    size: ModelSize = DEFAULT
    seq_len: int = 512
    batch: int = 64
    steps: int = 0  # 0: as many as fit time_budget_s
    time_budget_s: float = 150.0
    lr: float = 3e-3
    min_lr_frac: float = 0.1
    warmup_steps: int = 100
    decay_frac: float = 0.2
    weight_decay: float = 0.1
    aux_loss_coef: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    record_every: int = 50
    eval_bytes: int = 0  # 0: the whole evaluation split
    experts_impl: str = "auto"  # transformers experts implementation; auto: the fastest that works

    def __post_init__(self) -> None:
        if min(self.seq_len, self.batch, self.record_every, self.warmup_steps) <= 0 or self.steps < 0:
            raise ValueError("seq_len, batch, record_every and warmup_steps must be > 0 and steps >= 0")
        if not 0.0 <= self.decay_frac < 1.0:
            raise ValueError(f'"decay_frac" must be in [0, 1), got {self.decay_frac}')
        if self.steps == 0 and self.time_budget_s <= 0:
            raise ValueError('"time_budget_s" must be > 0 when "steps" is 0 (auto)')


SMOKE_TRAIN = TrainConfig(size=SMOKE, seq_len=64, batch=4, steps=8, warmup_steps=2, record_every=4,
                          eval_bytes=2048, experts_impl="eager")


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Warmup-stable-decay learning rate of ``step`` (0-based) out of ``total``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_start = int(total * (1.0 - cfg.decay_frac))
    if step < decay_start or total <= decay_start:
        return cfg.lr
    frac = (step - decay_start) / max(total - decay_start, 1)
    return cfg.lr * (1.0 - (1.0 - cfg.min_lr_frac) * frac)


class Windows:
    """Seeded random windows of ``S + 1`` bytes of one split: ``next()`` -> ``[B, S + 1]`` int64."""

    def __init__(self, data: np.ndarray, seq_len: int, batch: int, seed: int) -> None:
        if len(data) <= seq_len + 1:
            raise ValueError(f"the split has {len(data)} bytes, fewer than one window of {seq_len + 1}")
        self.data, self.seq_len, self.batch = data, seq_len, batch
        self.rng = np.random.default_rng(seed)

    def next(self) -> torch.Tensor:
        starts = self.rng.integers(0, len(self.data) - self.seq_len - 1, size=self.batch)
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]          # [B, S + 1]
        return torch.from_numpy(self.data[idx].astype(np.int64))


def routers(model: Any) -> list[torch.Tensor]:
    """Each MoE layer's router weight ``[E, H]`` (empty for a dense model)."""
    out = []
    for layer in model.model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and getattr(gate, "weight", None) is not None and gate.weight.dim() == 2 \
                and hasattr(layer.mlp, "experts"):
            out.append(gate.weight)
    return out


def router_norms(model: Any) -> np.ndarray:
    """l2 norm of every router row: ``[L, E]``."""
    with torch.no_grad():
        return np.stack([w.float().norm(dim=1).cpu().numpy() for w in routers(model)]).astype(np.float64)


@dataclass
class TrainRecord:
    """What one training run leaves besides the weights."""

    kind: str
    steps: int
    tokens: int
    wall_s: float
    experts_impl: str
    record_steps: list[int] = field(default_factory=list)
    train_bpb: list[float] = field(default_factory=list)      # mean over each record interval
    router_norms: list[list[list[float]]] = field(default_factory=list)  # [R][L][E], R = len(record_steps)
    load: list[list[list[int]]] = field(default_factory=list)  # [R-1][L][E] tokens routed per interval
    eval_bpb: dict[str, float] = field(default_factory=dict)


def _step_loss(model: Any, x: torch.Tensor, cfg: TrainConfig, moe: bool,
               load: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to minimise, cross entropy in nats) of one batch ``x [B, S + 1]``."""
    kw = {"output_router_logits": True} if moe else {}
    out = model(input_ids=x[:, :-1], use_cache=False, **kw)
    logits = out.logits.float()                                                # [B, S, V]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    if not moe:
        return ce, ce
    if load is not None:
        for i, rl in enumerate(out.router_logits):                             # [B * S, E] per layer
            top = rl.topk(cfg.size.top_k, dim=-1).indices.reshape(-1)
            load[i] += torch.bincount(top, minlength=load.shape[1])
    return ce + cfg.aux_loss_coef * out.aux_loss, ce


def _optimizer(model: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    keep = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": keep, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


def _autocast(device: torch.device) -> Any:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def train(model: Any, data: np.ndarray, cfg: TrainConfig, device: torch.device, kind: str,
          steps: int | None = None, progress: bool = True) -> TrainRecord:
    """Train ``model`` in place on ``data`` (uint8 bytes); ``steps`` overrides ``cfg.steps``."""
    moe = kind == "moe"
    model.to(device).train()
    opt = _optimizer(model, cfg)
    batches = Windows(data, cfg.seq_len, cfg.batch, cfg.seed + 1)
    total = steps if steps is not None else cfg.steps
    rec = TrainRecord(kind=kind, steps=0, tokens=0, wall_s=0.0, experts_impl=_impl(model))
    load = torch.zeros((len(routers(model)), cfg.size.experts), dtype=torch.int64, device=device) if moe else None
    ce_sum, ce_n = torch.zeros((), device=device), 0
    if moe:
        rec.record_steps.append(0)
        rec.router_norms.append(router_norms(model).tolist())
    t0, timed_from = time.perf_counter(), 0.0
    bar = tqdm(desc=f"train {kind}", total=total or None, disable=not progress, unit="step")
    step = 0
    while total == 0 or step < total:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, max(total, step + 1) if total else 10**9, cfg)
        x = batches.next().to(device, non_blocking=True)
        with _autocast(device):
            loss, ce = _step_loss(model, x, cfg, moe, load)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ce_sum += ce.detach()
        ce_n += 1
        step += 1
        bar.update(1)
        if total == 0:
            total, timed_from = _plan(step, cfg, device, t0, timed_from)
            bar.total = total or None
        if step % cfg.record_every == 0 or step == total:
            _record(rec, model, step, ce_sum, ce_n, load, moe)
            ce_sum, ce_n = torch.zeros((), device=device), 0
            bar.set_postfix(bpb=f"{rec.train_bpb[-1]:.3f}")
    bar.close()
    _sync(device)
    rec.steps, rec.tokens, rec.wall_s = step, step * cfg.batch * cfg.seq_len, time.perf_counter() - t0
    return rec


def _plan(step: int, cfg: TrainConfig, device: torch.device, t0: float, timed_from: float) -> tuple[int, float]:
    """Auto step count: time steps 10..30 (after warm-up), then fix how many fit the budget."""
    if step == 10:
        _sync(device)
        return 0, time.perf_counter()
    if step == 30:
        _sync(device)
        per_step = (time.perf_counter() - timed_from) / 20
        spent = time.perf_counter() - t0
        return max(step + 1, int(step + (cfg.time_budget_s - spent) / per_step)), timed_from
    return 0, timed_from


def _record(rec: TrainRecord, model: Any, step: int, ce_sum: torch.Tensor, ce_n: int,
            load: torch.Tensor | None, moe: bool) -> None:
    rec.train_bpb.append(float(ce_sum) / max(ce_n, 1) / LN2)
    if moe and load is not None:
        rec.record_steps.append(step)
        rec.router_norms.append(router_norms(model).tolist())
        rec.load.append(load.cpu().tolist())
        load.zero_()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _impl(model: Any) -> str:
    return str(getattr(model.config, "_experts_implementation", None) or "eager")


@torch.no_grad()
def bits_per_byte(model: Any, data: np.ndarray, seq_len: int, batch: int, device: torch.device,
                  max_bytes: int = 0) -> float:
    """Mean next-byte cross entropy in bits over ``data`` (its first ``max_bytes``; 0 all), in
    consecutive windows of ``seq_len + 1`` bytes that overlap by one (each byte after a window's
    first is predicted once)."""
    data = data[:max_bytes] if max_bytes else data
    n = (len(data) - 1) // seq_len
    if n == 0:
        raise ValueError(f"{len(data)} bytes are fewer than one window of {seq_len + 1}")
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]   # [n, S + 1]
    model.to(device).eval()
    total, count = 0.0, 0
    for i in range(0, n, batch):
        x = torch.from_numpy(data[idx[i : i + batch]].astype(np.int64)).to(device)
        with _autocast(device):
            logits = model(input_ids=x[:, :-1], use_cache=False).logits.float()  # [B, S, V]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
        count += x[:, 1:].numel()
    return total / count / LN2


def pick_experts_impl(make: Callable[[], Any], data: np.ndarray, cfg: TrainConfig, device: torch.device,
                      candidates: tuple[str, ...] = ("grouped_mm", "eager")) -> tuple[str, dict[str, float]]:
    """The fastest transformers experts implementation that trains here (3 timed steps each on a
    throwaway model from ``make()``), and the seconds per step of each (inf: failed)."""
    timings: dict[str, float] = {}
    for name in candidates:
        model = make()
        set_experts_implementation(model, name)
        small = TrainConfig(**{**cfg.__dict__, "steps": 4, "record_every": 10**6})
        try:
            train(model, data, small, device, "moe", steps=1, progress=False)  # warm-up
            rec = train(model, data, small, device, "moe", steps=3, progress=False)
            timings[name] = rec.wall_s / 3
        except Exception as exc:  # an implementation this torch/device lacks: skip it
            timings[name] = math.inf
            print(f"experts implementation {name}: unavailable ({type(exc).__name__}: {str(exc)[:120]})")
        del model
    best = min(timings, key=lambda k: timings[k])
    if math.isinf(timings[best]):
        raise RuntimeError("no transformers experts implementation trains on this machine")
    return best, timings
