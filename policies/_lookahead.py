"""Look-ahead helpers shared by the prefetching seed policies (dymoe, hobbit).

:class:`NextLayerPredictor` guesses the experts of the next layer step from the experts of
this one, with a layer-l -> l+1 co-occurrence table learned from a profiling trace: for
each layer ``l`` and expert ``e``, ``P(j | e)`` = the share of profile layer steps at ``l``
routing ``e`` whose next layer step (same batch, layer ``l+1``, or layer 0 of the next pass
after the last layer) routes ``j``. Only the ``top_m`` most likely successors of each ``e``
are kept. A prediction scores ``j`` by ``sum_e w_e * P(j | e)`` over this step's experts
(``w_e`` = their gate weight) and fills up with the next layer's most routed experts of the
profile. Fitting is numpy (CSR outer products, sparse counts); the table is dense
(``layers * experts**2`` float32: 3 MB for Qwen3-30B, 50 MB for Qwen3-Next) so that a
prediction is one mat-vec over the needed experts' rows.

:class:`PrefetchStats` counts what a policy prefetched and how much of it was used, for a
policy's ``metrics()``: a prefetch *hits* when its expert is needed by the step it was aimed
at (the next step of its layer); one not needed then counts as a miss even if it is used
later.
"""

from __future__ import annotations

from enum import Enum

import numpy as np
from moebits.core.routing import LayerSteps


class Predictor(Enum):
    """How a prefetching policy guesses the next layer's experts: the profile's co-occurrence
    table (:class:`NextLayerPredictor`), or the same expert ids as this step."""

    COOCCURRENCE = "cooccurrence"
    SAME_EXPERTS = "same_experts"


def _successor_pairs(profile: LayerSteps, layers: int, decode_only: bool) -> np.ndarray:
    """Indices ``i`` of layer steps whose successor ``i+1`` is the same batch's next layer."""
    lay = profile.ls_layer.astype(np.int64)
    bat = profile.ls_batch.astype(np.int64)
    if lay.shape[0] < 2:
        return np.zeros(0, dtype=np.int64)
    ok = (bat[1:] == bat[:-1]) & (lay[1:] == (lay[:-1] + 1) % layers)
    if decode_only and bool((profile.ls_pass > 0).any()):
        ok &= profile.ls_pass[:-1] > 0
    return np.flatnonzero(ok)


def _entries_of(off: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Entry indices (into the ``ex_*`` arrays) of the given layer steps, concatenated."""
    n = off[steps + 1] - off[steps]
    starts = np.cumsum(n) - n
    which = np.repeat(np.arange(steps.shape[0]), n)
    return off[steps][which] + np.arange(int(n.sum()), dtype=np.int64) - starts[which]


def _pair_entries(profile: LayerSteps, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All (source entry, successor entry) index combinations of the given step pairs."""
    off = profile.offsets.astype(np.int64)
    n_a = off[pairs + 1] - off[pairs]
    n_b = off[pairs + 2] - off[pairs + 1]
    combos = n_a * n_b
    starts = np.cumsum(combos) - combos
    which = np.repeat(np.arange(pairs.shape[0]), combos)
    local = np.arange(int(combos.sum()), dtype=np.int64) - starts[which]
    src = off[pairs][which] + local // n_b[which]
    dst = off[pairs + 1][which] + local % n_b[which]
    return src, dst


class NextLayerPredictor:
    """Predicts the next layer step's experts from this one's; see the module docstring.

    ``succ[layer]`` is a dense ``[experts, experts]`` float32 matrix of ``P(j | e)`` with
    only each row's ``top_m`` entries kept, so a prediction is one small mat-vec."""

    def __init__(self, layers: int, experts: int, succ: np.ndarray, popular: list[list[int]]) -> None:
        self.layers = layers
        self.experts = experts
        self.succ = succ  # [layer, expert, next expert]
        self.popular = popular  # [layer] -> experts, most routed first

    @classmethod
    def fit(cls, profile: LayerSteps, layers: int, experts: int, top_m: int,
            decode_only: bool = True) -> NextLayerPredictor:
        """Learn the co-occurrence table from ``profile`` (numpy; see the module docstring)."""
        if top_m < 1:
            raise ValueError(f'"top_m" must be >= 1, got {top_m}.')
        if profile.layer_steps and int(profile.ls_layer.max()) >= layers:
            raise ValueError(f"the profiling trace names layer {int(profile.ls_layer.max())}, "
                             f"outside the model's {layers} layers")
        pairs = _successor_pairs(profile, layers, decode_only)
        src, dst = _pair_entries(profile, pairs)
        ex = profile.ex_expert.astype(np.int64)
        lay = np.repeat(profile.ls_layer.astype(np.int64), np.diff(profile.offsets))
        source_key = lay[src] * experts + ex[src]
        flat = source_key * experts + ex[dst]
        keys, counts = np.unique(flat, return_counts=True)
        src_entries = _entries_of(profile.offsets.astype(np.int64), pairs)  # each source once per pair
        n_src = np.bincount(lay[src_entries] * experts + ex[src_entries], minlength=layers * experts)
        return cls(layers, experts, _top_successors(keys, counts, n_src, layers, experts, top_m),
                   _popular(profile, layers, experts))

    def predict(self, layer: int, experts: np.ndarray, weights: np.ndarray, count: int) -> list[int]:
        """The ``count`` experts most likely needed by the step after one at ``layer`` that
        routed ``experts`` with gate ``weights`` (ties: lower id)."""
        w = np.maximum(np.asarray(weights, dtype=np.float32), 1e-9)
        scores = w @ self.succ[layer].take(experts, axis=0)  # [E]
        ranked = [j for j in np.argsort(-scores, kind="stable")[:count].tolist() if scores[j] > 0]
        if len(ranked) < count:
            seen = set(ranked)
            nxt = (layer + 1) % self.layers
            ranked += [j for j in self.popular[nxt] if j not in seen][: count - len(ranked)]
        return ranked


def _top_successors(keys: np.ndarray, counts: np.ndarray, n_src: np.ndarray, layers: int,
                    experts: int, top_m: int) -> np.ndarray:
    """``[L, E, E]`` conditional probabilities, each row keeping only its ``top_m`` largest."""
    out = np.zeros((layers * experts, experts), dtype=np.float32)
    source = keys // experts
    order = np.lexsort((keys % experts, -counts, source))  # by source, then count desc, then id
    source, nxt = source[order], (keys % experts)[order]
    prob = counts[order] / np.maximum(n_src[source], 1)
    rank = np.arange(source.shape[0]) - np.searchsorted(source, source, side="left")
    keep = rank < top_m
    out[source[keep], nxt[keep]] = prob[keep]
    return out.reshape(layers, experts, experts)


def _popular(profile: LayerSteps, layers: int, experts: int) -> list[list[int]]:
    """Per layer, experts by tokens routed in the profile, most first (ties: lower id)."""
    counts = profile.counts(layers, experts)
    return [np.argsort(-counts[layer], kind="stable").tolist() for layer in range(layers)]


class PrefetchStats:
    """Counters of prefetches issued and used; see the module docstring."""

    def __init__(self, layers: int) -> None:
        self.issued = 0
        self.hits = 0
        self._pending: list[set[int]] = [set() for _ in range(layers)]  # per target layer: flat ids

    def on_issue(self, layer: int, k: int) -> None:
        self.issued += 1
        self._pending[layer].add(k)

    def on_refused(self, layer: int, k: int) -> None:
        self.issued -= 1
        self._pending[layer].discard(k)

    def on_step(self, layer: int, needed: set[int]) -> None:
        """A step of ``layer`` needs ``needed``: settle the prefetches aimed at it."""
        pending = self._pending[layer]
        if pending:
            self.hits += len(pending & needed)
            pending.clear()

    def metrics(self) -> dict[str, float]:
        rate = self.hits / self.issued if self.issued else 0.0
        return {"prefetch_issued": float(self.issued), "prefetch_hits": float(self.hits),
                "prefetch_hit_rate": rate}
