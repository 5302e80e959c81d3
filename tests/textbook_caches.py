"""Textbook caches, written apart from ``policies/`` on purpose: plain dicts and lists, no
shared helpers, no heaps, no cleverness. Each function replays one layer's steps (a list of
sets of expert ids, in replay order) through a cache of ``slots`` experts that starts empty,
and returns the number of requests that hit (a step requests each of its experts once).

Rules (the ones the policies state in their docstrings):

- every expert a step needs is served; a miss is copied in and either *admitted* (cached)
  or *bypassed* (used once, not cached);
- experts a step needs are never evicted during that step;
- LRU: a step's hits are used first (ascending id), then its misses (ascending id). Misses are
  admitted in ascending id while a free slot or an evictable expert is left, evicting the
  least recently used one not needed by the step; the rest are bypassed;
- LFU: use counts are kept for the whole replay (also while not cached, also after eviction);
  a step's experts are used in ascending id, each use one tick of a clock. Misses are
  admitted in ascending id while possible, evicting the expert not needed by the step with
  the fewest uses, ties to the least recently used; the rest are bypassed;
- Belady with bypass: an expert's *future* at step t is the list of later steps that need
  it; futures compare as lists (sooner first, element by element; a list that ends comes
  after any that goes on). Misses in order of their future (ties to the lower id) take a
  free slot, or replace the cached expert not needed by the step with the latest future
  (ties to the lower id) if that comes strictly after the miss's; otherwise that miss and
  all later ones are bypassed.
"""

from __future__ import annotations

from bisect import bisect_right
from itertools import combinations

INF = 10**18


def lru_hits(steps: list[list[int]], slots: int) -> int:
    cache: list[int] = []  # least recently used first
    hits = 0
    for step in steps:
        needed = sorted(set(step))
        step_hits = [e for e in needed if e in cache]
        misses = [e for e in needed if e not in cache]
        hits += len(step_hits)
        for e in step_hits:
            cache.remove(e)
            cache.append(e)
        for e in misses:
            if len(cache) < slots:
                cache.append(e)
                continue
            victim = None
            for c in cache:
                if c not in needed:
                    victim = c
                    break
            if victim is None:
                break  # this and the later misses are bypassed
            cache.remove(victim)
            cache.append(e)
    return hits


def lfu_hits(steps: list[list[int]], slots: int) -> int:
    uses: dict[int, int] = {}
    last: dict[int, int] = {}
    cache: list[int] = []
    clock = 0
    hits = 0
    for step in steps:
        needed = sorted(set(step))
        misses = [e for e in needed if e not in cache]
        hits += len(needed) - len(misses)
        for e in needed:
            clock += 1
            uses[e] = uses.get(e, 0) + 1
            last[e] = clock
        for e in misses:
            if len(cache) < slots:
                cache.append(e)
                continue
            candidates = [c for c in cache if c not in needed]
            if not candidates:
                break
            victim = candidates[0]
            for c in candidates:
                if (uses[c], last[c]) < (uses[victim], last[victim]):
                    victim = c
            cache.remove(victim)
            cache.append(e)
    return hits


def belady_hits(steps: list[list[int]], slots: int) -> int:
    where: dict[int, list[int]] = {}  # expert -> the steps that need it, ascending
    for t, step in enumerate(steps):
        for e in set(step):
            where.setdefault(e, []).append(t)

    def future(t: int, e: int) -> list[int]:
        return where[e][bisect_right(where[e], t):] + [INF]

    cache: list[int] = []
    hits = 0
    for t, step in enumerate(steps):
        needed = sorted(set(step))
        misses = [e for e in needed if e not in cache]
        hits += len(needed) - len(misses)
        misses.sort(key=lambda e: (future(t, e), e))
        for e in misses:
            if len(cache) < slots:
                cache.append(e)
                continue
            candidates = [c for c in cache if c not in needed]
            if not candidates:
                break
            victim = candidates[0]
            for c in candidates:
                if future(t, c) > future(t, victim) or (future(t, c) == future(t, victim) and c < victim):
                    victim = c
            if future(t, victim) <= future(t, e):
                break
            cache.remove(victim)
            cache.append(e)
    return hits


def brute_force_fewest_misses(steps: list[list[int]], slots: int) -> int:
    """Fewest misses of any cache of ``slots`` experts started empty, under the same rules
    (hits stay cached during their step; only a step's misses can be admitted; any cached
    expert not needed by the step may be evicted), by trying every choice."""
    states = {frozenset(): 0}
    for step in steps:
        need = frozenset(step)
        nxt: dict[frozenset[int], int] = {}
        for cache, cost in states.items():
            misses = need - cache
            others = sorted(cache - need)
            kept_hits = cache & need
            for n_keep in range(len(others) + 1):
                for keep in combinations(others, n_keep):
                    room = slots - len(kept_hits) - n_keep
                    for n_adm in range(min(room, len(misses)) + 1):
                        for adm in combinations(sorted(misses), n_adm):
                            after = kept_hits | frozenset(keep) | frozenset(adm)
                            nxt[after] = min(nxt.get(after, 1 << 30), cost + len(misses))
        states = nxt
    return min(states.values())
