"""The PCIe link, one direction: a FIFO copy stream priced in closed form.

A copy stream executes copies one after another, so a FIFO queue needs no SimPy Resource:
a copy submitted at ``now`` starts when the stream is free and ends ``t(bytes)`` later,

    start = max(now, free_at);  done = start + latency_s + bytes / bandwidth(bytes);  free_at = done

and the engine waits (one ``env.timeout``) only on completions it actually needs. Both
directions of PCIe are independent streams (full duplex).
"""

from __future__ import annotations

from moebits.core.hardware import LinkCurve


class Link:
    """A FIFO copy stream over one PCIe direction; see the module docstring."""

    def __init__(self, curve: LinkCurve, name: str = "h2d") -> None:
        self.curve = curve
        self.name = name
        self.free_at = 0.0
        self.bytes_total = 0
        self.copies = 0
        self._time_of: dict[int, float] = {}

    def time_s(self, nbytes: int) -> float:
        """Seconds one copy of ``nbytes`` occupies the stream (memoized per size)."""
        t = self._time_of.get(nbytes)
        if t is None:
            t = self._time_of[nbytes] = self.curve.time_s(nbytes)
        return t

    def submit(self, now_s: float, nbytes: int) -> float:
        """Queue a copy of ``nbytes`` at ``now_s``; returns the time it completes."""
        dt = self._time_of.get(nbytes)
        if dt is None:
            dt = self.time_s(nbytes)
        free_at = self.free_at
        done = (now_s if now_s > free_at else free_at) + dt
        self.free_at = done
        self.bytes_total += nbytes
        self.copies += 1
        return done
