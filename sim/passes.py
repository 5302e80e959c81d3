"""The per-pass seam in time: whole passes served from the residency decided before them.

This is the event loop of :class:`sim.engine.Engine` for a policy on the per-pass seam
(:func:`drive.driver.per_pass`: ``route_lag`` p >= 1, a miss rule that never waits), the
graph-captured runtime's whole-step graphs (:mod:`runtime.graph_engine`, ``GraphMode.WHOLE``).
Decisions follow the seam's rules, which do not depend on time; time follows the runtime's
streams:

- the device runs the passes back to back: pass n starts at ``max(end of pass n - 1, boundary n)``
  and lasts the sum of its layer steps (non-MoE part, per-pass fixed part, the fused experts
  of what the table serves: :meth:`sim.engine.Engine.serve_general` on a frozen residency);
- the host reaches boundary n when pass n - p's routing is back (the end of pass n - p; at
  once for the first p passes); there the driver observes every due pass's layer steps in
  order (``obs.now_s`` = the boundary), then the host waits for the copies issued at earlier
  boundaries (``copy_wait_s``: how long past the routing it waited), which turn READY, and the
  policy's copies are queued on the link at the boundary. A static policy's routing is read
  :func:`drive.driver.read_lag` passes later (records only) and it observes nothing;
- with the profile's :class:`core.hardware.HostCosts` the host's own work is in the loop: each
  observed layer step costs the policy's ``observe_s``, each pass ``pass_s`` (plus the policy's own
  ``pass_own_s``) plus ``copy_s`` per
  copy issued at its boundary, and pass n is launched only when the host is done with it: a
  controller slower than the device makes the device idle (without host costs, host work is
  free: hidden while p >= 2 keeps the host a pass ahead); with them each pass also pays its own
  copies on the device (``pass_io_s``: inputs up, routing down, outside its graph);
- a copy into a slab freed at boundary n starts after pass n - 1 ends (the slab's fence,
  :class:`sim.pool.SimPool`).

Every expert a pass serves is resident (the policy's residency before the pass), so each
request hits; a step with no copy of a needed expert is a policy bug (:class:`PolicyError`).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import numpy as np
import simpy
from moebits.drive.driver import read_lag
from moebits.drive.records import Recorder
from moebits.policies.base import LayerObs
from tqdm import tqdm

Engine = Any  # sim.engine.Engine (which imports this module)


def check_whole_passes(view: Any, layers: int) -> None:
    """The per-pass seam replays whole passes of every layer in order (as the graph runtime does)."""
    S = view.layer_steps
    if S % layers or not np.array_equal(np.asarray(view.ls_layer), np.tile(np.arange(layers), S // layers)):
        raise ValueError(f"route_lag > 0 replays whole passes of {layers} layers in order; this trace's layer steps "
                         "are not (set route_lag=0 for the per-layer seam)")


def replay_passes(eng: Engine, env: simpy.Environment, rec: Recorder,
                  bar: tqdm) -> Generator[simpy.Event, Any, None]:
    """Serve ``eng.view`` pass by pass on the per-pass seam; see the module docstring."""
    v, pool, L = eng.view, eng.pool, eng.spec.layers
    lag = read_lag(eng.driver.static, eng.route_lag)
    check_whole_passes(v, L)
    non_moe = eng.step_non_moe_s(per_layer_seam=False)
    observe = None if eng.driver.static else eng.driver.observe
    hc = eng.host_costs
    io_s = eng.hw.pass_io_s if hc is not None else 0.0
    obs_step, obs_expert = hc.observe(eng.name) if hc is not None and observe is not None else (0.0, 0.0)
    pass_work = hc.pass_work(eng.name) if hc is not None else 0.0
    entries = np.diff(np.asarray(v.offsets, np.int64))
    pool.fences = {}
    end_of: list[float] = []   # device end of every pass
    host = now = 0.0
    observed = 0               # passes whose routing the policy has seen
    copies = eng.copies_issued()
    for n, i0 in enumerate(range(0, v.layer_steps, L)):
        if n >= lag:
            host = max(host, end_of[n - lag])
        pool.fence_s = end_of[n - 1] if n else 0.0
        issued = len(pool.pending)            # copies of earlier boundaries: servable from this pass
        while observed <= n - lag:
            if observe is not None:
                _observe_pass(v, observed * L, L, host, observe)
                host += obs_step * L + obs_expert * float(entries[observed * L : observed * L + L].sum())
            observed += 1
        if issued:
            landed = pool.pending[issued - 1][0]
            eng.copy_wait_s += max(0.0, landed - host)
            host = max(host, landed)
            pool.advance(landed)
        if hc is not None:
            k = eng.copies_issued()
            host += pass_work + hc.copy_s * (k - copies)
            copies = k
        t = max(end_of[-1] if end_of else 0.0, host)
        t += io_s   # the pass's own copies (inputs up, routing down) around its graph
        start = t
        t = _serve_pass(eng, rec, i0, L, non_moe, t)
        rec.busy_s.append(t - start)
        end_of.append(t)
        rec.snaps.append(eng.snapshot())
        yield env.timeout(max(0.0, t - now))
        now = max(now, t)
        bar.update(L)


def _observe_pass(v: Any, i0: int, L: int, now_s: float, observe: Any) -> None:
    for i in range(i0, i0 + L):
        a, b = int(v.offsets[i]), int(v.offsets[i + 1])
        pi = int(v.ls_pass[i])
        observe(LayerObs(i, int(v.ls_layer[i]), 1 if pi else 0, pi, v.ex_expert[a:b], v.ex_tokens[a:b],
                         v.ex_gate[a:b], now_s))


def _serve_pass(eng: Engine, rec: Recorder, i0: int, L: int, non_moe: np.ndarray, t: float) -> float:
    """Serve the layer steps ``i0 .. i0 + L`` from the frozen residency, starting at ``t``; the pass's end."""
    v = eng.view
    lo, hi = int(v.offsets[i0]), int(v.offsets[i0 + L])
    ex = (np.asarray(v.ex_expert[lo:hi]).tolist(), np.asarray(v.ex_tokens[lo:hi]).tolist(),
          np.asarray(v.ex_gate[lo:hi], dtype=np.float64).tolist())
    off = (np.asarray(v.offsets[i0 : i0 + L + 1]) - lo).tolist()
    for j in range(L):
        rec.hits.append(off[j + 1] - off[j])  # every expert a pass serves is resident
        t = eng.serve_general(i0 + j, j, ex, off[j], off[j + 1], t + float(non_moe[i0 + j]), rec)
    return t
