"""LayerSteps: routing precomputed per layer step, the plain data every engine and policy reads.

A *layer step* is one MoE layer of one forward pass of one batch. The arrays are a CSR layout
(S layer steps, X expert entries in all)::

    ls_layer  [S] uint16   MoE layer
    ls_batch  [S] int32    batch index
    ls_pass   [S] int32    0 = prefill pass, d+1 = decode step d
    ls_tokens [S] int32    tokens in this pass at this layer
    offsets   [S+1] int64  CSR offsets into the ex_* arrays
    ex_expert [X] int16    distinct experts needed by the layer step, ascending
    ex_tokens [X] int32    tokens routed to each
    ex_gate   [X] float32  their summed gate weight

It lives in ``core`` so that policies (which may look at a profiling trace or, for the oracle,
the future) read routing without importing ``traces``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LayerSteps:
    """Routing per layer step in replay order (batch, pass, layer); see the module docstring."""

    ls_layer: np.ndarray
    ls_batch: np.ndarray
    ls_pass: np.ndarray
    ls_tokens: np.ndarray
    offsets: np.ndarray
    ex_expert: np.ndarray
    ex_tokens: np.ndarray
    ex_gate: np.ndarray

    @property
    def layer_steps(self) -> int:
        return int(self.ls_layer.shape[0])

    def experts(self, i: int) -> np.ndarray:
        """Distinct experts needed by layer step ``i``, ascending."""
        return self.ex_expert[self.offsets[i] : self.offsets[i + 1]]

    def counts(self, layers: int, experts: int) -> np.ndarray:
        """Tokens routed to each expert over all layer steps: ``[layers, experts]`` int64."""
        layer_of_entry = np.repeat(self.ls_layer.astype(np.int64), np.diff(self.offsets))
        flat = layer_of_entry * experts + self.ex_expert.astype(np.int64)
        return np.bincount(flat, weights=self.ex_tokens, minlength=layers * experts).reshape(
            layers, experts
        ).astype(np.int64)
