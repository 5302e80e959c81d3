"""The simulated HBM slab pool: a :class:`core.slabs.SlabLedger` plus copy completion times.

The ledger keeps the books (slab classes sized from the policy's plan within the budget,
deterministic lowest-id allocation, no fragmentation, refusals instead of overflow). This
class adds what time means to them:

- a load reserves a slab at once (LOADING) and queues its copy on the host-to-device link;
  the copy's completion time is known in closed form (see :mod:`sim.link`), and the slab turns
  READY when the engine's clock passes it (:meth:`SimPool.advance`, called lazily: only when
  the engine next looks at the pool and the earliest pending copy is due), never earlier, so
  no step can serve a half-copied slab. The link is one FIFO, so copies complete in the order
  they were queued: the pending loads are a deque, not a heap;
- mirrors of the ledger's state as per-expert bitmasks (bit ``p`` = precision index ``p`` in
  :attr:`SimPool.precisions`, highest precision first) so the engine's inner loop reads
  residency with two list lookups instead of building keys; and the completion time of each
  LOADING copy in a flat list (:attr:`SimPool.done_at`, index ``(layer * experts + expert) *
  P + p``).

:meth:`SimPool.apply` carries out a whole list of policy actions in one call (the hot path:
a thrashing cache issues a DEMOTE/PROMOTE pair per miss, so it binds everything it needs
once per call, not per action).

Slab fences (the per-pass seam, :mod:`sim.passes`; ``fences`` not None): a slab a DEMOTE frees
may still be read by passes already enqueued, so the next copy into it starts no earlier than
``fence_s`` as it was when the slab was freed (the end of the last pass enqueued), as the
graph runtime's copy stream waits for its fence event (:mod:`runtime.expert_mover`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

from moebits.core.keys import ExpertKey
from moebits.core.model_spec import ModelSpec
from moebits.core.slabs import Refusal, SlabLedger
from moebits.drive.context import precision_order
from moebits.policies.base import Action, ActionKind
from moebits.sim.link import Link

_DEMOTE, _PREFETCH = ActionKind.DEMOTE, ActionKind.PREFETCH


class SimPool:
    """A slab ledger whose loads take time on ``h2d``; see the module docstring."""

    def __init__(self, ledger: SlabLedger, spec: ModelSpec, h2d: Link) -> None:
        self.ledger = ledger
        self.h2d = h2d
        self.precisions = precision_order(ledger.precisions())
        self.index = {p: i for i, p in enumerate(self.precisions)}
        self._P = len(self.precisions)
        self.slab_bytes = [ledger.classes[p].slab_bytes for p in self.precisions]
        self.layers, self.experts = spec.layers, spec.experts
        self.ready = [[0] * spec.experts for _ in range(spec.layers)]
        self.loading = [[0] * spec.experts for _ in range(spec.layers)]
        self.done_at = [0.0] * (spec.layers * spec.experts * self._P)  # valid while the copy is LOADING
        self.pending: deque[tuple[float, int, int, int, int]] = deque()  # (done, slab, layer, expert, p), FIFO
        self.peak_bytes = ledger.used_bytes
        self.loaded_bytes = 0
        # precision -> (index p, bit 1 << p, slab bytes, mask clearing the bit), for apply()
        self._info = {n: (p, 1 << p, self.slab_bytes[p], ~(1 << p)) for p, n in enumerate(self.precisions)}
        self.fences: dict[int, float] | None = None   # slab -> earliest start of its next copy (per-pass seam)
        self.fence_s = 0.0                              # the fence a DEMOTE sets now
        self.issue_s = 0.0                              # host seconds to issue one copy (HostCosts.copy_s)
        self.issue_first_s = 0.0                        # and once before a batch's first (HostCosts.layer_copy_s)

    def place(self, key: ExpertKey, precision: str) -> int | Refusal:
        """An untimed initial load: the copy is READY at once and moves no counted bytes."""
        slab = self.ledger.begin_load(key, precision)
        if isinstance(slab, Refusal):
            return slab
        self.ledger.finish_load(slab)
        self.ready[key.layer][key.expert] |= 1 << self.index[precision]
        self.peak_bytes = max(self.peak_bytes, self.ledger.used_bytes)
        return slab

    def evict(self, key: ExpertKey, precision: str) -> int | Refusal:
        """Drop a READY copy (the ledger refuses LOADING or absent ones)."""
        slab = self.ledger.evict(key, precision)
        if slab.__class__ is not Refusal:
            self.ready[key[0]][key[1]] &= ~(1 << self.index[precision])
        return slab

    def apply(self, actions: Sequence[Action], now_s: float, counts: dict[str, int],
              refused: Callable[[Action, Refusal], None], bad_key: Callable[[ExpertKey], None],
              accepted: Callable[[Action, float, float], None] | None = None) -> None:
        """Carry out ``actions`` in order at ``now_s``: DEMOTE drops a READY copy as
        :meth:`evict` does, PROMOTE and PREFETCH reserve a slab and queue the copy on the link.
        Accepted ones count in ``counts`` (``promotions``, ``prefetches``, ``demotions``) and go
        to ``accepted(action, now_s, done_s)`` if given (``done_s`` = when the copy is READY, or
        ``now_s`` for a demote); each refusal goes to ``refused`` at once; a key outside the
        model goes to ``bad_key`` (which raises)."""
        ledger, info = self.ledger, self._info
        evict, begin_load, submit = ledger.evict, ledger.begin_load, self.h2d.submit
        ready, loading, done_at, pending = self.ready, self.loading, self.done_at, self.pending
        L, E, P = self.layers, self.experts, self._P
        peak, loaded = self.peak_bytes, 0
        fences, issue_s, first_s = self.fences, self.issue_s, self.issue_first_s
        n_promote = n_prefetch = n_demote = 0
        for a in actions:
            kind, key, precision = a
            layer, expert = key
            if not (0 <= layer < L and 0 <= expert < E):
                bad_key(key)
            if kind is _DEMOTE:
                slab = evict(key, precision)
                if slab.__class__ is Refusal:
                    refused(a, slab)  # type: ignore[arg-type]
                    continue
                ready[layer][expert] &= info[precision][3]
                if fences is not None:
                    fences[slab] = self.fence_s  # type: ignore[index]
                n_demote += 1
                if accepted is not None:
                    accepted(a, now_s, now_s)
                continue
            slab = begin_load(key, precision)
            if slab.__class__ is Refusal:
                refused(a, slab)  # type: ignore[arg-type]
                continue
            p, bit, nbytes, _ = info[precision]
            start = now_s + first_s + issue_s * (n_promote + n_prefetch + 1) if issue_s or first_s else now_s   # one by one
            done = submit(start if fences is None else max(start, fences.pop(slab, start)), nbytes)  # type: ignore[call-overload]
            loaded += nbytes
            loading[layer][expert] |= bit
            done_at[(layer * E + expert) * P + p] = done
            pending.append((done, slab, layer, expert, p))  # type: ignore[arg-type]
            if ledger.used_bytes > peak:
                peak = ledger.used_bytes
            if kind is _PREFETCH:
                n_prefetch += 1
            else:
                n_promote += 1
            if accepted is not None:
                accepted(a, now_s, done)
        self.peak_bytes, self.loaded_bytes = peak, self.loaded_bytes + loaded
        if n_promote:
            counts["promotions"] += n_promote
        if n_prefetch:
            counts["prefetches"] += n_prefetch
        if n_demote:
            counts["demotions"] += n_demote

    def advance(self, now_s: float) -> None:
        """Every copy whose completion time is ``<= now_s`` turns READY, in completion order."""
        pending, ready, loading = self.pending, self.ready, self.loading
        done: list[int] = []
        while pending and pending[0][0] <= now_s:
            _, slab, layer, expert, p = pending.popleft()
            done.append(slab)
            bit = 1 << p
            loading[layer][expert] ^= bit  # set while LOADING
            ready[layer][expert] |= bit
        self.ledger.finish_loads(done)

    def ready_time(self, layer: int, expert: int, p: int) -> float:
        """Completion time of the LOADING copy of (layer, expert) in precision index ``p``."""
        return self.done_at[(layer * self.experts + expert) * self._P + p]
