"""TieredCache: least-recently-used books of a slab pool with one class per precision.

Shared by the caching seed policies (dymoe, hobbit). Experts are flat ids
``k = layer * experts + expert``; each class is an LRU list of the experts holding a copy
in it (READY or LOADING, as far as the policy's own actions go). :meth:`TieredCache.load`
places an expert into the first class of a preference order that has a free slab or an
evictable victim, appending DEMOTE/PROMOTE (or PREFETCH) actions. A victim is the least
recently used READY copy not excluded (the experts the current step needs, or the ones a
prefetch is about to bring). Free slabs are counted from the ledger once per layer step
(:meth:`begin_step`) and then tracked through the policy's own actions, since the ledger
shows a DEMOTE's freed slab only after the engine carries it out.
"""

from __future__ import annotations

from collections import OrderedDict

from moebits.core.keys import ExpertKey
from moebits.core.slabs import Refusal, SlabLedger
from moebits.policies._lookahead import PrefetchStats
from moebits.policies.base import Action, ActionKind
from moebits.policies.offload_cache import split_slots


class TieredCache:
    """LRU books of several slab classes; see the module docstring.

    ``layers`` > 1 keeps a cache per layer in every class (``experts`` per layer): each
    class's slots are split over the layers evenly, or by ``shares[class]`` (one weight per
    layer; :func:`policies.offload_cache.split_slots`), and an expert's copies live in, and
    take victims from, its own layer's books only. Free slots are then counted from the books
    (the ledger's free count is the class's, for all layers together)."""

    def __init__(self, capacity: dict[str, int], key_of: list[ExpertKey], bits: dict[str, float],
                 layers: int = 1, experts: int = 1, shares: dict[str, list[float]] | None = None) -> None:
        self.capacity = dict(capacity)
        self.key_of = key_of
        self.bits = bits
        self._E = experts if layers > 1 else 0
        shares = shares or {}
        self.cap = {p: split_slots(n, layers, experts, shares.get(p)) if layers > 1 else [n]
                    for p, n in capacity.items()}
        self.lru: dict[str, list[OrderedDict[int, None]]] = {p: [OrderedDict() for _ in c] for p, c in self.cap.items()}
        self._by_bits = [(p, self.lru[p]) for p in sorted(capacity, key=lambda p: -bits[p])]
        self._free: dict[str, list[int]] = {p: list(c) for p, c in self.cap.items()}

    def pool(self, k: int) -> int:
        """The pool of flat id ``k`` in every class: its layer (a cache per layer) or 0."""
        return k // self._E if self._E else 0

    def begin_step(self, res: SlabLedger) -> None:
        """Take the free-slab counts from the ledger, or per layer from the books (once per layer step)."""
        for p, pools in self.lru.items():
            if self._E:
                self._free[p] = [c - len(lru) for c, lru in zip(self.cap[p], pools, strict=True)]
            else:
                self._free[p][0] = res.free_slabs(p)

    def holds(self, k: int, p: str) -> bool:
        return k in self.lru[p][self.pool(k)]

    def best(self, k: int) -> str | None:
        """The highest-precision class holding ``k`` (READY or LOADING), if any."""
        i = self.pool(k)
        for p, pools in self._by_bits:
            if k in pools[i]:
                return p
        return None

    def touch(self, k: int) -> None:
        """``k`` was used (or is about to be): most recently used in every class holding it."""
        self.touch_best(k)

    def touch_best(self, k: int) -> str | None:
        """:meth:`touch` and :meth:`best` in one pass."""
        best = None
        i = k // self._E if self._E else 0
        for p, pools in self._by_bits:
            lru = pools[i]
            if k in lru:
                lru.move_to_end(k)
                best = best or p
        return best

    def add(self, k: int, p: str) -> None:
        """Book a copy placed outside :meth:`load` (initial loads)."""
        i = self.pool(k)
        self.lru[p][i][k] = None
        self._free[p][i] -= 1

    def forget(self, k: int, p: str) -> None:
        """Drop a copy from the books (its load was refused)."""
        self.lru[p][self.pool(k)].pop(k, None)

    def readd(self, k: int, p: str) -> None:
        """Book again a copy whose eviction was refused, as the least recently used."""
        lru = self.lru[p][self.pool(k)]
        lru[k] = None
        lru.move_to_end(k, last=False)

    def load(self, k: int, order: list[str], exclude: set[int], res: SlabLedger, actions: list[Action],
             kind: ActionKind = ActionKind.PROMOTE, evict: bool = True) -> str | None:
        """Place ``k`` in the first class of ``order`` with room in its pool (free slot, or a
        victim when ``evict``); append the actions and return the class, or None if none has room."""
        i = self.pool(k)
        for p in order:
            lru = self.lru[p][i]
            if k in lru:
                return p
            if self._free[p][i] > 0:
                self._free[p][i] -= 1
            elif not evict or not self._evict_one(lru, p, exclude, res, actions):
                continue
            lru[k] = None
            actions.append(Action(kind, self.key_of[k], p))
            return p
        return None

    def _evict_one(self, lru: OrderedDict[int, None], p: str, exclude: set[int], res: SlabLedger,
                   actions: list[Action]) -> bool:
        key_of = self.key_of
        for v in lru:
            if v not in exclude and res.is_ready(key_of[v], p):
                del lru[v]
                actions.append(Action(ActionKind.DEMOTE, key_of[v], p))
                return True
        return False

    def cached(self, p: str) -> list[int]:
        """Flat ids holding a copy in class ``p``, least recently used first (pool by pool)."""
        return [k for lru in self.lru[p] for k in lru]


class CachedPrefetchBooks:
    """Mixin for policies that keep a :class:`TieredCache` (``self.cache``) and prefetch
    counters (``self.stats``, a :class:`policies._lookahead.PrefetchStats`) over flat expert
    ids ``layer * self._E + expert``: keeps those books equal to the pool on refusals and
    reports the counters."""

    cache: TieredCache
    stats: PrefetchStats
    _E: int

    def on_refused(self, action: Action, reason: Refusal) -> None:
        """A refused load leaves no copy; a refused demotion leaves the copy (least recently
        used again)."""
        k = action.key.layer * self._E + action.key.expert
        if action.kind == ActionKind.DEMOTE:
            if reason != Refusal.NOT_PRESENT:
                self.cache.readd(k, action.precision)
            return
        if reason != Refusal.ALREADY_PRESENT and reason != Refusal.IN_FLIGHT:
            self.cache.forget(k, action.precision)
        if action.kind == ActionKind.PREFETCH:
            self.stats.on_refused(action.key.layer, k)

    @property
    def prefetch_issued(self) -> int:
        return self.stats.issued

    @property
    def prefetch_hits(self) -> int:
        return self.stats.hits

    def metrics(self) -> dict[str, float]:
        """Prefetch counters for the run summary (issued, hits, hit rate)."""
        return self.stats.metrics()
