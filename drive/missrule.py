"""The miss rule: which copy of each needed expert a layer step is served from.

Both engines serve a layer step through :func:`choose`, on the mechanism's residency
(per layer, per expert, bitmasks of READY and of LOADING copies; bit ``p`` = precision index
``p``, highest precision first) and its :meth:`~drive.driver.Mechanism.ready_time` of copies in
flight. Per :class:`policies.base.MissRule`:

- SERVE_LOWER serves its best READY copy now, and waits for the first copy in flight only if
  none is READY;
- STALL waits for the highest-precision copy in flight when it beats the best READY one, else
  serves the best READY one;
- HOST serves the best READY copy, and computes experts without one on the host (bf16).

An expert with no copy and nothing in flight under SERVE_LOWER or STALL is *bypassed* when the
policy has a staging slab (:meth:`policies.base.Policy.staging`): the engine streams it
through the slab, serves it at the slab's precision and drops it (the caches that admit only
some of a step's misses); without one it is a policy bug: :class:`drive.context.PolicyError`.
This module is the one place that rule lives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

from moebits.drive.context import PolicyError
from moebits.policies.base import MissRule

_STALL, _HOST = MissRule.STALL, MissRule.HOST
_NONE: list[tuple[int, int]] = []  # the shared empty bypass list of a step that bypasses nothing (never appended to)


def lowest_bits(P: int) -> list[int]:
    """Bitmask -> index of its lowest set bit (the best precision present), for ``P`` precisions."""
    return [(m & -m).bit_length() - 1 for m in range(1 << P)]


class Choice(NamedTuple):
    """How one layer step is served.

    ``wait``: ready time of the last copy waited for (0 if none); ``tok`` / ``cnt``: tokens and
    experts per precision index; ``err``: gate-weighted error; ``host``: (expert, tokens)
    computed on the host; ``served``: (expert, precision index, or -1 for the host) in expert
    order, when asked for; ``waited``: (expert, precision index) of every copy waited for;
    ``bypass``: (expert, tokens) to stream through the staging slab (not in ``tok``/``cnt``;
    their error is in ``err``)."""

    wait: float
    tok: list[int]
    cnt: list[int]
    err: float
    host: list[tuple[int, int]]
    served: list[tuple[int, int]] | None
    waited: list[tuple[int, int]] | None
    bypass: list[tuple[int, int]]


def tokens_served(choice: Choice, stage_p: int) -> list[int]:
    """Tokens per precision index a step served, its bypassed experts' at the staging precision ``stage_p``
    (``choice.tok`` itself when nothing was bypassed), as every engine records them."""
    if not choice.bypass:
        return choice.tok
    tok = list(choice.tok)
    for _, n in choice.bypass:
        tok[stage_p] += n
    return tok


class Masks(Protocol):
    """A layer's residency bitmask per expert: ``masks[expert]`` (a list, or a view)."""

    def __getitem__(self, expert: int, /) -> int: ...


class Residency(NamedTuple):
    """A layer's residency as the miss rule reads it: READY and LOADING bitmasks per expert,
    and ``ready_time(expert, p)`` of a copy in flight."""

    ready: Masks
    loading: Masks
    ready_time: Callable[[int, int], float]


def served_row(choice: Choice, ex_t: list[int], a: int, precisions: list[str]) -> tuple[tuple[int, int, str], ...]:
    """What a step served (from a ``track``-ed choice of entries ``a:``): (expert, tokens,
    precision or ``host``) in expert order, as both engines record it."""
    return tuple((e, ex_t[a + i], precisions[p] if p >= 0 else "host") for i, (e, p) in enumerate(choice.served or ()))


def first_done(res: Residency, e: int, bits: int, P: int) -> int:
    """The precision index of the copy in flight that completes first."""
    best, best_t = -1, float("inf")
    for p in range(P):
        if bits >> p & 1:
            d = res.ready_time(e, p)
            if d < best_t:
                best, best_t = p, d
    return best


def no_copy(policy: str, rule: MissRule, layer: int, e: int) -> PolicyError:
    return PolicyError(
        f"policy {policy}: expert L{layer}E{e} is needed but has no copy and none in flight "
        f"(miss rule {rule.name}); the policy must promote it or use MissRule.HOST"
    )


def choose(rule: MissRule, res: Residency, low: list[int], P: int, errl: list[list[float]], host_errl: list[float],
           ex: tuple[list, list, list], a: int, b: int, *, track: bool = False, layer: int = -1,
           policy: str = "", stage_p: int = -1) -> Choice:
    """Serve the entries ``a:b`` of ``ex`` (expert, tokens, gate lists) of one layer step.

    ``low``: :func:`lowest_bits`; ``errl[e][p]`` / ``host_errl[e]``: the layer's errors
    (:class:`drive.quality.ErrorTable`). ``track`` also lists what is served and waited for.
    ``stage_p``: the staging slab's precision index, -1 without one (no bypass)."""
    stall, host_rule = rule is _STALL, rule is _HOST
    rl, ll = res.ready, res.loading
    ex_e, ex_t, ex_g = ex
    tok, cnt = [0] * P, [0] * P
    host: list[tuple[int, int]] = []
    bypass: list[tuple[int, int]] = _NONE  # a fresh list only when an expert is bypassed
    served: list[tuple[int, int]] | None = [] if track else None
    waited: list[tuple[int, int]] | None = [] if track else None
    err, wait = 0.0, 0.0
    for e, t, g in zip(ex_e[a:b], ex_t[a:b], ex_g[a:b], strict=True):  # cheaper than three index reads per expert
        r, ld = rl[e], ll[e]
        if ld and ((stall and (not r or low[ld] < low[r])) or (not r and not host_rule)):
            p = low[ld] if stall else first_done(res, e, ld, P)  # wait for a copy in flight
            d = res.ready_time(e, p)
            if d > wait:
                wait = d
            if waited is not None:
                waited.append((e, p))
        elif r:
            p = low[r]  # the best READY copy
        elif host_rule:
            host.append((e, t))
            err += g * host_errl[e]
            if served is not None:
                served.append((e, -1))
            continue
        elif stage_p >= 0:
            if bypass is _NONE:
                bypass = []
            bypass.append((e, t))
            err += g * errl[e][stage_p]
            continue
        else:
            raise no_copy(policy, rule, layer, e)
        tok[p] += t
        cnt[p] += 1
        err += g * errl[e][p]
        if served is not None:
            served.append((e, p))
    return Choice(wait, tok, cnt, err, host, served, waited, bypass)
