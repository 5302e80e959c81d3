"""Serving fast-model steps from CUDA graphs with a policy in the loop, off the critical path.

Dimension legend: L layers, T rows of a step.

:class:`StepRunner` enqueues one step of a :class:`runtime.fast_model.FastModel` in one of
three modes (:class:`GraphMode`): ``EAGER`` (Python launches; the CPU path), ``WHOLE`` (one
CUDA graph for the step) and ``LAYER`` (one graph per layer: that layer's experts, then the
next layer's attention and routing, or the head; the host may run between a layer's routing
and its experts).

:class:`PolicyDriver` runs a :class:`policies.base.Policy` against the runtime's mechanism:

* serve-resident policies (``MissRule.SERVE_LOWER``, e.g. dynaexq): before step ``s`` the
  driver feeds the policy every layer step of the steps ``t <= s - lag``
  (:class:`runtime.route_observer.RouteObserver`), carries out its actions through the
  :class:`runtime.expert_mover.ExpertMover` and lets the mover write the table and issue
  copies at the boundary; the step itself replays untouched. No host sync per layer.
* demand-fetch policies (``MissRule.STALL``, e.g. lru_offload) need the current routing
  before the experts run: the step runs in ``LAYER`` mode, and between a layer's routing and
  its experts the host reads the routing (a sync), lets the policy act, and waits for the
  copies (stall time measured).

Initial loads are placed before serving (:func:`initial_loads`): low-precision copies
quantized on the device straight into their slabs, like loading a checkpoint.
"""

from __future__ import annotations

import enum
import time
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import torch
from moebits.core.keys import ExpertKey
from moebits.policies.base import Action, ActionKind, LayerObs, MissRule, Policy
from moebits.runtime.expert_mover import ExpertMover
from moebits.runtime.fast_model import FastModel, StepBuffers
from moebits.runtime.residency import load_layer
from moebits.runtime.route_observer import RouteObserver, layer_obs_arrays

WeightsFn = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


class GraphMode(enum.Enum):
    """How a step is enqueued."""

    EAGER = "eager"
    WHOLE = "whole"
    LAYER = "layer"


class StepRunner:
    """Enqueues steps of ``model`` over ``buf`` in ``mode``; see the module docstring."""

    def __init__(self, model: FastModel, buf: StepBuffers, mode: GraphMode) -> None:
        if mode is not GraphMode.EAGER and model.device.type != "cuda":
            raise ValueError(f"graph mode {mode.value!r} needs CUDA; use GraphMode.EAGER on {model.device}")
        self.model, self.buf, self.mode = model, buf, mode
        self.graphs: list[torch.cuda.CUDAGraph] = []

    def _pieces(self) -> list[Callable[[], None]]:
        m, b = self.model, self.buf
        if self.mode is GraphMode.WHOLE:
            return [lambda: m.step(b)]
        layers = m.spec.layers

        def first() -> None:
            m.embed(b)
            m.attend_route(0, b)

        def experts(i: int) -> Callable[[], None]:
            def run() -> None:
                m.experts(i, b)
                if i + 1 < layers:
                    m.attend_route(i + 1, b)
                else:
                    m.head(b)
            return run

        # pieces alternate: [embed + attention/routing of layer 0], [experts 0 + attention/routing 1], ...
        return [first] + [experts(i) for i in range(layers)]

    def capture(self) -> None:
        """Warm up (compiles the kernels) on a side stream, then capture the graphs."""
        if self.mode is GraphMode.EAGER:
            return
        pieces = self._pieces()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for p in pieces:
                p()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.graphs = []
        pool = torch.cuda.graph_pool_handle()
        for p in pieces:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                p()
            self.graphs.append(g)
        torch.cuda.synchronize()

    def run(self, between: Callable[[int], None] | None = None) -> None:
        """Enqueue one step; in ``LAYER`` mode, ``between(layer)`` runs before each layer's experts."""
        if self.mode is GraphMode.EAGER:
            m, b = self.model, self.buf
            m.embed(b)
            for i in range(m.spec.layers):
                m.attend_route(i, b)
                if between is not None:
                    between(i)
                m.experts(i, b)
            m.head(b)
            return
        if self.mode is GraphMode.WHOLE:
            if between is not None:
                raise ValueError("a WHOLE-step graph cannot stop between layers; use GraphMode.LAYER")
            self.graphs[0].replay()
            return
        for j, g in enumerate(self.graphs):
            if between is not None and j > 0:
                between(j - 1)                      # layer j-1's routing is ready; its experts come next
            g.replay()


def initial_loads(model: FastModel, actions: Sequence[Action], weights: WeightsFn) -> None:
    """Place a policy's initial copies: each layer's weights generated once, quantized into the slabs."""
    by_layer: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for a in actions:
        if a.kind == ActionKind.DEMOTE:
            raise ValueError(f"an initial load cannot demote: {a}")
        by_layer[a.key.layer][a.precision].append(a.key.expert)
    for layer in sorted(by_layer):
        gu, dn = weights(layer)
        for precision, experts in by_layer[layer].items():
            load_layer(model.moe.pool, model.table, layer, gu, dn, precision, sorted(experts))
        del gu, dn
    model.table.flush()


class PolicyDriver:
    """A policy in the loop of table-driven steps; see the module docstring."""

    def __init__(self, policy: Policy, mover: ExpertMover, observer: RouteObserver | None) -> None:
        self.policy, self.mover, self.observer = policy, mover, observer
        self.stall = policy.miss_rule is MissRule.STALL
        self.static = policy.is_static
        self.stall_s = 0.0
        self.layer_steps = 0
        self.decisions: list[tuple[int, Action]] = []   # (layer-step index, action) as carried out

    def before_step(self, serving: int) -> None:
        """Boundary before step ``serving``: observe lagged steps, act, write the table, issue copies."""
        if self.observer is not None and not self.stall and not self.static:
            for routing in self.observer.due(serving):
                for layer in range(routing.ids.shape[0]):
                    self._observe(layer, routing.ids[layer], routing.weights[layer])
        self.mover.boundary()

    def after_step(self, serving: int, buf: StepBuffers, live_rows: int) -> None:
        if self.observer is not None and not self.stall and not self.static:
            self.observer.record(serving, buf.ids, buf.weights, live_rows)

    def between(self, buf: StepBuffers, live_rows: int) -> Callable[[int], None]:
        """The STALL hook for :meth:`StepRunner.run`: read this layer's routing, fetch, wait."""
        def hook(layer: int) -> None:
            t0 = time.perf_counter()
            ids = buf.ids[layer, :live_rows].cpu().numpy()                      # host sync
            w = buf.weights[layer, :live_rows].cpu().numpy()
            self._observe(layer, ids, w)
            self.mover.wait_all()
            self.stall_s += time.perf_counter() - t0
        return hook

    def _observe(self, layer: int, ids: np.ndarray, weights: np.ndarray) -> None:
        experts, tokens, gate = layer_obs_arrays(ids, weights)
        obs = LayerObs(self.layer_steps, layer, 1, 0, experts, tokens, gate, 0.0)
        for a in self.policy.on_layer_step(obs, self.mover.pool.ledger):
            self._act(a)
        self.layer_steps += 1

    def _act(self, a: Action) -> None:
        key = ExpertKey(*a.key)
        refused = self.mover.demote(key, a.precision) if a.kind == ActionKind.DEMOTE else \
            self.mover.promote(key, a.precision)
        if refused is None:
            self.decisions.append((self.layer_steps, a))
        else:
            self.policy.on_refused(a, refused)
