"""Where the graph runtime's host time goes: per pass and per policy observation.

The simulator prices the controller's host work with :class:`core.hardware.HostCosts`; those
numbers are fitted (:mod:`analysis.hostcost`) to what this log records on synthetic runs:

- per pass (``run_pass``): its host seconds, of which waiting (for the routing read-back or for
  copies: the device's time, not the host's), of which in the policy's ``observe``; the layer
  steps and experts observed in it, the copies the policy issued in it (promotions + prefetches) and, on
  the per-layer seam, the layer steps that issued at least one (``copy_steps``: an issue's fixed part);
- per observation: seconds in ``Driver.observe`` and the experts of the observed layer step;
- per pass, the host seconds of each named section (:meth:`HostLog.tick`: the time since the last
  tick, summed per name over the pass), as ``sec_<name>`` arrays: where the host time goes.

Timing costs one ``perf_counter`` call per tick and two per observation.

The host's own speed moves between runs on a shared machine (on the H200 host identical runs' host
sections differed up to 2.9x, every section by the same factor): :func:`host_probe_s` times a fixed
CPU workload of the kind the host loop does (interpreter and small-numpy calls, no device), and the
log keeps it before and after the timed loop (``probe_s``); the simulator prices a run's host work at
that speed (:meth:`core.hardware.HardwareProfile.at_host_speed`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class HostLog:
    """Host timings of one run; see the module docstring."""

    pass_s: list[float] = field(default_factory=list)
    waited_s: list[float] = field(default_factory=list)
    observe_s: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    entries: list[int] = field(default_factory=list)
    copies: list[int] = field(default_factory=list)
    copy_steps: list[int] = field(default_factory=list)   # per pass: layer steps that issued copies (per-layer seam)
    call_s: list[float] = field(default_factory=list)
    call_entries: list[int] = field(default_factory=list)
    sections: dict[str, list[float]] = field(default_factory=dict)   # name -> seconds per pass
    probe_s: list[float] = field(default_factory=list)              # host_probe_s before and after the loop
    _open: tuple[float, float, int, int, int] | None = None   # pass start: (t, waited, calls, entries, copies)
    _last: float = 0.0
    _sec: dict[str, float] = field(default_factory=dict)
    _entries: int = 0                                          # sum of call_entries
    _copy_steps: int = 0

    def issued(self, copies: int) -> None:
        """A layer step of the open pass issued ``copies`` copies (per-layer seam)."""
        self._copy_steps += copies > 0

    def observe(self, fn: Callable[[Any], None], obs: Any, entries: int) -> None:
        """``fn(obs)`` (the driver's observe), timed."""
        t0 = time.perf_counter()
        fn(obs)
        self.call_s.append(time.perf_counter() - t0)
        self.call_entries.append(entries)
        self._entries += entries

    def probe(self) -> None:
        """Time the host's speed now (:func:`host_probe_s`) and keep it."""
        self.probe_s.append(host_probe_s())

    def begin(self, waited_s: float, copies: int) -> None:
        """A pass starts; ``waited_s``/``copies``: the run's waiting seconds and copies so far."""
        self._open = (time.perf_counter(), waited_s, len(self.call_s), self._entries, copies)
        self._last = self._open[0]
        self._sec = {}
        self._copy_steps = 0

    def tick(self, name: str) -> None:
        """The host seconds since the last tick (or the pass's start) belong to section ``name``."""
        now = time.perf_counter()
        self._sec[name] = self._sec.get(name, 0.0) + now - self._last
        self._last = now

    def end(self, waited_s: float, copies: int) -> None:
        """The pass's host part ends (its work is enqueued)."""
        assert self._open is not None, "HostLog.end without begin"
        t0, w0, c0, e0, k0 = self._open
        self.tick("other")   # since the last tick: the sections sum to the pass's seconds
        self.pass_s.append(self._last - t0)
        self.waited_s.append(waited_s - w0)
        self.observe_s.append(float(sum(self.call_s[c0:])))
        self.steps.append(len(self.call_s) - c0)
        self.entries.append(self._entries - e0)
        self.copies.append(copies - k0)
        self.copy_steps.append(self._copy_steps)
        n = len(self.pass_s)
        for name, secs in self._sec.items():
            self.sections.setdefault(name, [0.0] * (n - 1)).append(secs)
        for col in self.sections.values():
            if len(col) < n:
                col.append(0.0)
        self._open = None

    def arrays(self) -> dict[str, np.ndarray]:
        """The log as arrays (:attr:`drive.records.RunResult.host`)."""
        out = {k: np.asarray(getattr(self, k), np.float64) for k in ("pass_s", "waited_s", "observe_s", "call_s",
                                                                      "probe_s")}
        out |= {k: np.asarray(getattr(self, k), np.int64) for k in ("steps", "entries", "copies", "copy_steps",
                                                                     "call_entries")}
        out |= {f"sec_{k}": np.asarray(v, np.float64) for k, v in self.sections.items()}
        return out


PROBE_ITEMS = 256   # one probe: a pass over this many items plus 16 small numpy calls (~40 us on the H200 host)


def _probe_once(items: list[int], arr: np.ndarray) -> int:
    counts: dict[int, int] = {}
    acc = 0
    for i, x in enumerate(items):
        counts[x & 63] = counts.get(x & 63, 0) + i
        acc += (x * 3) % 7
    for _ in range(8):
        acc += int(np.bincount(arr, minlength=64).argmax()) + int(arr.sum())
    return acc + len(counts)


def host_probe_s(reps: int = 31) -> float:
    """Median seconds of one fixed host workload (:func:`_probe_once`): the host's speed now. Pure CPU,
    no device call, ~1.5 ms in all; a slower host (a busy neighbour, a lower clock) gives a larger value."""
    items = list(range(PROBE_ITEMS))
    arr = np.arange(PROBE_ITEMS, dtype=np.int64) % 64
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        _probe_once(items, arr)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))

