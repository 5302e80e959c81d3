"""Hotness bookkeeping shared by the seed policies: a lazy per-layer EMA and a per-layer
top-n resident set with anti-thrash rules.

:class:`LayerEma` keeps ``S(t) = alpha * S(t-1) + (1 - alpha) * g(t)`` per expert, where ``t``
counts the layer steps *of that layer* and ``g`` is 0 for experts not routed in the step.
Updating every expert of a layer each step would cost O(experts); instead all scores of a
layer share one scale: ``S_e(t) = alpha**t * V_e`` with ``V_e += (1 - alpha) * g * alpha**-t``
for the routed experts only. Within a layer the stored ``V`` compare exactly like the true
scores, so ranking costs nothing; ``value()`` gives the true EMA. When ``alpha**-t`` grows
past 1e100 the layer is renormalized (O(experts), rare) and its ``epoch`` ticks so that
cached comparisons (the heap of :class:`LayerTopN`) know to rebuild.

:class:`LayerTopN` holds, per layer, at most ``slots`` experts (e.g. the ones with a high-
precision copy). A routed expert outside the set (a challenger) takes a free slot, or
replaces the weakest member when its score exceeds ``hysteresis`` times the member's
(anti-thrash margin) and that member has been in the set for at least ``min_residency``
steps of its layer. Only routed experts' scores rise, so only they can change the top-n.
The weakest member comes from a min-heap of members keyed by score whose entries are
re-keyed lazily, when a stale one reaches the top: within an epoch a layer's scores only grow
(gate weights are non-negative; a negative one ticks the epoch), so every entry is a lower
bound of its member's score and a fresh entry on top is the true minimum. The work per step
is O(routed) plus O(log slots) per entry re-keyed or dropped.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

_RENORM_AT = 1e100


class LayerEma:
    """Per-layer exponential moving averages of a per-expert signal, updated lazily."""

    def __init__(self, layers: int, experts: int, alpha: float) -> None:
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f'"alpha" must be in [0, 1), got {alpha}.')
        self.alpha = alpha
        self.v = [[0.0] * experts for _ in range(layers)]
        self.scale = [1.0] * layers  # alpha ** -t
        self.sum_v = [0.0] * layers
        self.steps = [0] * layers
        self.epoch = [0] * layers

    def update(self, layer: int, experts: list[int], values: list[float]) -> None:
        """One step of ``layer``: ``experts`` got ``values``, every other expert 0."""
        alpha = self.alpha
        self.steps[layer] += 1
        if alpha == 0.0:  # no memory: the score is the last step's value
            row = self.v[layer]
            for e in range(len(row)):
                row[e] = 0.0
            for e, g in zip(experts, values, strict=True):
                row[e] = g
            self.sum_v[layer] = float(sum(values))
            self.epoch[layer] += 1
            return
        s = self.scale[layer] / alpha
        if s > _RENORM_AT:
            self._renormalize(layer)
            s = 1.0 / alpha
        self.scale[layer] = s
        row, w = self.v[layer], (1.0 - alpha) * s
        added = 0.0
        for e, g in zip(experts, values, strict=True):
            x = w * g
            row[e] += x
            added += x
        self.sum_v[layer] += added
        if values and min(values) < 0.0:  # a score fell: cached comparisons must rebuild
            self.epoch[layer] += 1

    def seed(self, layer: int, values: list[float]) -> None:
        """Start ``layer`` from the given true EMA values (one per expert)."""
        s = self.scale[layer] if self.alpha > 0.0 else 1.0
        self.v[layer] = [x * s for x in values]
        self.sum_v[layer] = float(sum(self.v[layer]))
        self.epoch[layer] += 1

    def score(self, layer: int, expert: int) -> float:
        """A value that ranks like the EMA within one layer (not across layers)."""
        return self.v[layer][expert]

    def value(self, layer: int, expert: int) -> float:
        """The true EMA of ``expert`` in ``layer`` after the layer's last step."""
        return self.v[layer][expert] / self.scale[layer]

    def mean_score(self, layer: int) -> float:
        """Mean :meth:`score` over the layer's experts (O(1))."""
        return self.sum_v[layer] / len(self.v[layer])

    def _renormalize(self, layer: int) -> None:
        s = self.scale[layer]
        self.v[layer] = [x / s for x in self.v[layer]]
        self.sum_v[layer] = float(sum(self.v[layer]))
        self.scale[layer] = 1.0
        self.epoch[layer] += 1


class LayerTopN:
    """Per layer, a set of at most ``slots`` experts kept near the top of a :class:`LayerEma`.

    ``members[layer]`` maps each member to the layer step (of its layer) it joined at.
    """

    def __init__(self, ema: LayerEma, slots: int, hysteresis: float, min_residency: int) -> None:
        if slots < 0:
            raise ValueError(f'"slots" must be >= 0, got {slots}.')
        if hysteresis < 1.0:
            raise ValueError(f'"hysteresis" must be >= 1 (a factor on the weakest score), got {hysteresis}.')
        if min_residency < 0:
            raise ValueError(f'"min_residency" must be >= 0, got {min_residency}.')
        self.ema = ema
        self.slots = slots
        self.hysteresis = hysteresis
        self.min_residency = min_residency
        layers = len(ema.v)
        self.members: list[dict[int, int]] = [{} for _ in range(layers)]
        self._heap: list[list[tuple[float, int]]] = [[] for _ in range(layers)]
        self._epoch = list(ema.epoch)

    def add(self, layer: int, expert: int) -> None:
        """Make ``expert`` a member (a promotion was issued)."""
        self.members[layer][expert] = self.ema.steps[layer]
        heapq.heappush(self._heap[layer], (self.ema.score(layer, expert), expert))

    def discard(self, layer: int, expert: int) -> None:
        """Drop ``expert`` from the set (demoted, or its promotion was refused)."""
        self.members[layer].pop(expert, None)

    def touch(self, layer: int, experts: list[int]) -> list[int]:
        """Call after :meth:`LayerEma.update`: rebuilds the layer's heap when the EMA's epoch
        moved on (members are re-keyed lazily otherwise, see :meth:`weakest_beaten_by`);
        returns the routed ``experts`` outside the set, in their order (for :meth:`strongest`)."""
        members = self.members[layer]
        if self._epoch[layer] != self.ema.epoch[layer] or len(self._heap[layer]) > 4 * len(members) + 16:
            self._rebuild(layer)
        return [e for e in experts if e not in members]

    def challengers(self, layer: int, experts: list[int], eligible: Callable[[int], bool] | None = None,
                    limit: int | None = None) -> list[int]:
        """Routed ``experts`` outside the set and ``eligible`` (default: all), strongest first
        (ties: lower id); only the first ``limit`` when given (a partial selection, same order)."""
        members = self.members[layer]
        if eligible is None:
            out = [e for e in experts if e not in members]
        else:
            out = [e for e in experts if e not in members and eligible(e)]
        return self.strongest(layer, out, limit)

    def strongest(self, layer: int, outside: list[int], limit: int | None = None) -> list[int]:
        """``outside`` (experts outside the set, e.g. from :meth:`touch`; sorted in place)
        strongest first (ties: lower id); only the first ``limit`` when given."""
        # key (-score, id) as two stable C-level sorts (no per-element Python key): ids ascending,
        # then by score descending (reverse=True keeps equal scores in id order)
        outside.sort()
        outside.sort(key=self.ema.v[layer].__getitem__, reverse=True)
        return outside if limit is None else outside[:limit]

    def has_free_slot(self, layer: int) -> bool:
        return len(self.members[layer]) < self.slots

    def weakest_beaten_by(self, layer: int, challenger: int, droppable: Callable[[int], bool]) -> int | None:
        """The weakest member old enough and ``droppable`` if ``challenger`` beats it by the
        hysteresis factor, else None. The member stays in the set (call :meth:`discard`)."""
        heap, members, row = self._heap[layer], self.members[layer], self.ema.v[layer]  # row[e]: ema.score
        oldest_ok = self.ema.steps[layer] - self.min_residency
        skipped: list[tuple[float, int]] = []
        found: int | None = None
        while heap:
            s, e = heap[0]
            if e not in members:
                heapq.heappop(heap)  # a member no more
                continue
            if s != row[e]:  # re-key lazily: within an epoch scores only grow, so a stale entry
                heapq.heapreplace(heap, (row[e], e))  # is a lower bound and a fresh top is the true min
                continue
            if members[e] <= oldest_ok and droppable(e):
                found = e
                break
            skipped.append(heapq.heappop(heap))
        for item in skipped:
            heapq.heappush(heap, item)
        if found is None:
            return None
        c = row[challenger]
        return found if c > 0.0 and c > self.hysteresis * row[found] else None

    def _rebuild(self, layer: int) -> None:
        score = self.ema.score
        self._heap[layer] = [(score(layer, e), e) for e in self.members[layer]]
        heapq.heapify(self._heap[layer])
        self._epoch[layer] = self.ema.epoch[layer]
