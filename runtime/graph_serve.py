"""Enqueuing fast-model steps: eagerly, as one CUDA graph, or as one graph per layer.

Dimension legend: L layers, T rows of a step.

:class:`StepRunner` enqueues one step of a :class:`runtime.fast_model.FastModel` in one of
three modes (:class:`GraphMode`): ``EAGER`` (Python launches; the CPU path), ``WHOLE`` (one
CUDA graph for the step) and ``LAYER`` (one graph per layer: that layer's experts, then the
next layer's attention and routing, or the head; the host may run between a layer's routing
and its experts).

The policy is not driven here: :class:`runtime.graph_engine.GraphEngine` runs it through
:class:`drive.driver.Driver` (the one driver of every engine) and uses ``between`` hooks of
``LAYER``/``EAGER`` steps for the per-layer seam.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import torch
from moebits.runtime.fast_model import FastModel, StepBuffers


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
