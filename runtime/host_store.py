"""The pinned host store: packed host copies of every expert in every precision a policy may load.

Dimension legend: L MoE layers, E experts per layer, H hidden, I expert intermediate,
B bytes of one packed expert (:class:`runtime.pool.SlabLayout`).

Per precision the store holds one ``uint8`` tensor ``[L * E, B]`` (row ``layer * E + expert``),
pinned when CUDA is available so that a promotion is one asynchronous DMA, plain on CPU. The
bytes of a row are exactly the bytes of a device slab of that precision, so a promotion copies
one row into one slab. bf16 is the source of truth (the model's weights, stored first); every
other precision is quantized from it (:func:`runtime.quant.quantize_stack`) on demand, a layer
at a time, on ``quant_device`` (the GPU when there is one), by :meth:`HostStore.require`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from moebits.core.keys import ExpertKey
from moebits.core.model_spec import ModelSpec
from moebits.runtime.channelmix import AnyStack, stack_tensors
from moebits.runtime.pool import SlabLayout, slab_layout
from moebits.runtime.quant import DEFAULT_HQQ, HQQConfig, QuantMethod, quantize_stack
from tqdm import tqdm

WeightsFn = Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # layer -> (gate_up [E, 2I, H], down [E, H, I])


def random_weights(spec: ModelSpec, seed: int = 0, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32, std: float = 0.02) -> WeightsFn:
    """Random expert weights, N(0, std), seeded per layer and generated on ``device`` a layer at a time."""
    e, i, h = spec.experts, spec.expert_intermediate, spec.hidden
    dev = torch.device(device)

    def weights(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator(dev).manual_seed(seed * 100_003 + layer + 1)
        gu = torch.randn(e, 2 * i, h, generator=gen, device=dev, dtype=dtype) * std     # [E, 2I, H]
        dn = torch.randn(e, h, i, generator=gen, device=dev, dtype=dtype) * std         # [E, H, I]
        return gu, dn

    return weights


def pin_default() -> bool:
    """Pin host copies when a CUDA device can DMA from them."""
    return torch.cuda.is_available()


class HostStore:
    """Packed host copies per precision; see the module docstring."""

    def __init__(self, spec: ModelSpec, *, pin: bool | None = None, method: QuantMethod = QuantMethod.RTN,
                 hqq: HQQConfig = DEFAULT_HQQ, quant_device: torch.device | str | None = None,
                 progress: bool = False) -> None:
        self.spec = spec
        self.pin = pin_default() if pin is None else pin
        self.method, self.hqq = method, hqq
        self.quant_device = torch.device(quant_device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.progress = progress
        self.layouts: dict[str, SlabLayout] = {}
        self.rows: dict[str, torch.Tensor] = {}  # precision -> [L * E, B] uint8

    # ---- building ----
    def _alloc(self, precision: str) -> torch.Tensor:
        lay = slab_layout(precision, self.spec.hidden, self.spec.expert_intermediate)
        self.layouts[precision] = lay
        n = self.spec.layers * self.spec.experts
        rows = torch.zeros((n, lay.nbytes), dtype=torch.uint8, pin_memory=self.pin)
        self.rows[precision] = rows
        return rows

    def fill_bf16(self, weights: WeightsFn) -> HostStore:
        """Store every layer's bf16 weights: ``weights(layer)`` gives ``gate_up [E, 2I, H]``, ``down [E, H, I]``."""
        spec = self.spec
        self._alloc("bf16")
        for layer in tqdm(range(spec.layers), desc="host store bf16", disable=not self.progress):
            gu, dn = weights(layer)
            want_gu = (spec.experts, 2 * spec.expert_intermediate, spec.hidden)
            want_dn = (spec.experts, spec.hidden, spec.expert_intermediate)
            if tuple(gu.shape) != want_gu or tuple(dn.shape) != want_dn:
                raise ValueError(f"layer {layer}: expert weights {tuple(gu.shape)} / {tuple(dn.shape)} do not match "
                                 f"{spec.name}'s {want_gu} / {want_dn}")
            self._write_layer("bf16", layer, quantize_stack(gu, "bf16"), quantize_stack(dn, "bf16"))
        return self

    def require(self, precisions: Iterable[str]) -> HostStore:
        """Quantize the precisions not yet stored from the bf16 copies, a layer at a time."""
        missing = [p for p in dict.fromkeys(precisions) if p not in self.rows]
        if missing and "bf16" not in self.rows:
            raise ValueError("the host store has no bf16 weights to quantize from; call fill_bf16 first")
        for p in missing:
            self._alloc(p)
            lay, e = self.layouts["bf16"], self.spec.experts
            for layer in tqdm(range(self.spec.layers), desc=f"host store {p}", disable=not self.progress):
                raw = self.rows["bf16"][layer * e : (layer + 1) * e].to(self.quant_device)  # one contiguous copy
                gu, dn = lay.stacks(raw.view(-1), 0, e, lay.nbytes)
                gu_w = gu.weight.to(torch.float32).contiguous()  # type: ignore[union-attr]
                dn_w = dn.weight.to(torch.float32).contiguous()  # type: ignore[union-attr]
                self._write_layer(p, layer, self._quantize(gu_w, p, "gate_up"), self._quantize(dn_w, p, "down"))
        return self

    def _quantize(self, w: torch.Tensor, precision: str, proj: str) -> AnyStack:
        """``w [E, N, K]`` in ``precision`` (a plain format, or a channel mix: :mod:`runtime.channelmix`)."""
        return self.layouts[precision].quantize(proj, w, self.method, self.hqq)

    def _write_layer(self, precision: str, layer: int, gate_up: AnyStack, down: AnyStack) -> None:
        """Pack one layer's stacks into its rows (staged on the stacks' device, then one copy)."""
        lay, e = self.layouts[precision], self.spec.experts
        src_dev = next(iter(stack_tensors(gate_up).values())).device
        rows = self.rows[precision][layer * e : (layer + 1) * e]
        stage = rows if src_dev.type == "cpu" else torch.empty_like(rows, device=src_dev)
        dst = lay.stacks(stage.view(-1), 0, e, lay.nbytes)
        for d, s in zip(dst, (gate_up, down), strict=True):
            src = stack_tensors(s)
            for name, tensor in stack_tensors(d).items():
                tensor.copy_(src[name])
        if stage is not rows:
            rows.copy_(stage)

    # ---- reading ----
    @property
    def precisions(self) -> list[str]:
        return list(self.rows)

    def row(self, key: ExpertKey, precision: str) -> torch.Tensor:
        """The packed bytes of ``key`` in ``precision``: a 1-D uint8 (pinned) tensor."""
        try:
            rows = self.rows[precision]
        except KeyError:
            raise ValueError(f"the host store has no {precision} copies (has {self.precisions})") from None
        return rows[key.layer * self.spec.experts + key.expert]

    def layer_stacks(self, precision: str, layer: int) -> tuple[AnyStack, AnyStack]:
        """Typed (gate_up, down) views of every expert of ``layer`` in ``precision``: ``[E, ...]``."""
        lay, e = self.layouts[precision], self.spec.experts
        return lay.stacks(self.rows[precision].view(-1), layer * e * lay.nbytes, e, lay.nbytes)

    def nbytes(self) -> int:
        return sum(t.numel() for t in self.rows.values())
