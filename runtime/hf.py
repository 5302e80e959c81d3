"""Hugging Face integration: moebits experts inside transformers' MoE models (transformers 5.x).

Dimension legend: T tokens, k experts per token, H hidden, I expert intermediate, E experts,
B batch, P prompt tokens, N decoded tokens, V vocabulary.

Transformers 5.x routes every MoE block's expert call through its ``ExpertsInterface``:
``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])`` dispatches on
``config._experts_implementation``. :func:`install` registers the implementation ``"moebits"``
and binds each experts module (``Qwen3MoeExperts``, ``MixtralExperts``, ``OlmoeExperts``,
``DeepseekV3Experts``, ...) to an :class:`HFRuntime` and its MoE-layer index; the router,
attention and shared experts stay transformers' own. The experts' weights move into the
:class:`runtime.host_store.HostStore` (bf16, quantized on demand) and the modules' own
parameters are freed, so the device holds experts only in the slab pool.

:class:`HFRuntime` serves each call through the :class:`runtime.engine.RuntimeEngine` (the
policy in the loop), or, in reference mode, from the exact bf16 host copies (the model as
trained: the baseline of the KL divergence). :func:`build_random_model` makes a random-weight
model of any :class:`core.model_spec.ModelSpec` without ever allocating its experts on the
device (the expert weights are generated a layer at a time into the host store), and
:func:`generate` runs prefill + greedy decode with the engine told where passes begin and end.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from moebits.core.model_spec import ModelSpec
from moebits.core.routing import LayerSteps
from moebits.runtime.engine import RuntimeEngine
from moebits.runtime.host_store import HostStore, random_weights
from moebits.runtime.moe_layer import ExpertHandle, ExpertPool, MixedPrecisionMoE
from moebits.runtime.pool import slab_layout
from moebits.runtime.replay import assignment
from moebits.traces.capture import find_routers

IMPL = "moebits"
# attention shape (query heads, kv heads, head dim) of presets; others get a plausible GQA shape
ATTENTION = {"Qwen3-30B-A3B": (32, 4, 128), "Qwen3-Next-80B-A3B": (16, 2, 256), "Mixtral-8x7B": (32, 8, 128),
             "OLMoE-1B-7B": (16, 16, 128), "DeepSeek-V2-Lite": (16, 16, 128), "Qwen1.5-MoE-A2.7B": (16, 16, 128)}
ARCHS = ("qwen3_moe", "mixtral", "olmoe", "deepseek_v3")


# ---------------------------------------------------------------- the experts implementation
def _moebits_experts(module: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor) -> torch.Tensor:
    """What transformers calls instead of the module's own forward: ``[T, H]`` -> ``[T, H]``."""
    binding = module.__dict__.get("_moebits")
    if binding is None:
        raise RuntimeError(f"{type(module).__name__} has experts_implementation={IMPL!r} but no moebits runtime; "
                           "use runtime.hf.install(model, ...)")
    runtime, layer = binding
    return runtime.forward(layer, hidden_states, top_k_index, top_k_weights)


def register() -> None:
    """Register ``"moebits"`` with transformers' ExpertsInterface (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPL, _moebits_experts)


def experts_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Each MoE block's experts module, in MoE-layer order."""
    out: list[torch.nn.Module] = []
    for site in find_routers(model):
        block = model.get_submodule(site.name.rsplit(".", 1)[0])
        experts = block.experts
        assert isinstance(experts, torch.nn.Module)
        out.append(experts)
    return out


def expert_weights(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``gate_up [E, 2I, H]`` (gate rows first) and ``down [E, H, I]`` of a transformers experts module."""
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not isinstance(gu, torch.Tensor) or not isinstance(dn, torch.Tensor) or gu.dim() != 3:
        raise ValueError(f"{type(module).__name__}: moebits needs 3-D gate_up_proj / down_proj expert weights")
    if getattr(module, "is_transposed", False) or getattr(module, "has_bias", False) or \
            not getattr(module, "is_concatenated", True) or not getattr(module, "has_gate", True):
        raise ValueError(f"{type(module).__name__}: transposed, biased, interleaved or ungated experts are not "
                         "supported by moebits (Qwen3-MoE, Mixtral, OLMoE and DeepSeek layouts are)")
    return gu.detach(), dn.detach()


def store_from_model(model: torch.nn.Module, spec: ModelSpec, **store_kw: Any) -> HostStore:
    """A host store holding the model's own expert weights (bf16)."""
    mods = experts_modules(model)
    return HostStore(spec, **store_kw).fill_bf16(lambda layer: expert_weights(mods[layer]))


def install(model: torch.nn.Module, runtime: HFRuntime, free: bool = True) -> None:
    """Serve every experts module of ``model`` through ``runtime``; ``free`` drops their own weights."""
    register()
    mods = experts_modules(model)
    if len(mods) != runtime.spec.layers:
        raise ValueError(f"the model has {len(mods)} MoE layers but the runtime's model has {runtime.spec.layers}")
    for layer, m in enumerate(mods):
        m.__dict__["_moebits"] = (runtime, layer)
        if free:
            for name in ("gate_up_proj", "down_proj"):
                old = getattr(m, name)
                setattr(m, name, torch.nn.Parameter(torch.empty(0, dtype=old.dtype, device=runtime.device),
                                                    requires_grad=False))
    set_experts_implementation(model, IMPL)


def uninstall(model: torch.nn.Module) -> None:
    """Unbind the experts modules from their runtime (so that its slab pool can be freed)."""
    for m in experts_modules(model):
        m.__dict__.pop("_moebits", None)


def set_experts_implementation(model: Any, name: str) -> None:
    """Switch the model's experts implementation (``"moebits"``, ``"grouped_mm"``, ``"eager"``)."""
    setter = getattr(model, "set_experts_implementation", None)
    if callable(setter):
        setter(name)
    else:  # early 5.x: the config attribute only
        model.config._experts_implementation = name


# ---------------------------------------------------------------- the runtime behind the hook
class TraceRouting:
    """Routing from a trace instead of the model's router: realistic routing statistics for a
    random-weight model (whose own router, fed its own greedy tokens, repeats itself).

    Generated sequence ``b`` follows the trace's batch ``b`` (batch size 1): pass ``p`` of layer
    ``l`` takes that layer step's experts, token counts and gates, dealt to tokens by
    :func:`runtime.replay.assignment`. The prompt must be as long as the trace's prefill."""

    def __init__(self, view: LayerSteps, top_k: int) -> None:
        self.view, self.top_k = view, top_k
        self.index = {(int(b), int(p), int(la)): i
                      for i, (b, p, la) in enumerate(zip(view.ls_batch, view.ls_pass, view.ls_layer, strict=True))}

    def step(self, batch: int, pass_index: int, layer: int, n_tokens: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(ids [T, k], weights [T, k], (experts, tokens, gate)) of one layer step."""
        i = self.index.get((batch, pass_index, layer))
        if i is None or int(self.view.ls_tokens[i]) != n_tokens:
            raise ValueError(f"the routing trace has no layer step (batch {batch}, pass {pass_index}, layer {layer}) "
                             f"of {n_tokens} tokens; match the prompt length and decode count to the trace")
        a, b = int(self.view.offsets[i]), int(self.view.offsets[i + 1])
        routing = (self.view.ex_expert[a:b], self.view.ex_tokens[a:b], self.view.ex_gate[a:b])
        ids, w = assignment(*routing, n_tokens, self.top_k)
        return torch.from_numpy(ids).to(device), torch.from_numpy(w).to(device), routing

    def sequence(self, batch: int, layer: int, n_tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The routing of a whole sequence at one layer (prefill then each decode pass): ``[T, k]``."""
        ids, ws, done, p = [], [], 0, 0
        while done < n_tokens:
            i = self.index.get((batch, p, layer))
            if i is None:
                raise ValueError(f"the routing trace's batch {batch} is shorter than {n_tokens} tokens")
            step_ids, step_w, _ = self.step(batch, p, layer, int(self.view.ls_tokens[i]), device)
            ids.append(step_ids)
            ws.append(step_w)
            done += step_ids.shape[0]
            p += 1
        return torch.cat(ids)[:n_tokens], torch.cat(ws)[:n_tokens]


class HFRuntime:
    """Serves the experts calls of one model: through the engine, or from exact bf16 (reference).

    With ``routing`` (a :class:`TraceRouting`) the router still runs and its output is read back
    to the host (as a live policy would), then the trace's routing replaces it."""

    def __init__(self, spec: ModelSpec, store: HostStore, engine: RuntimeEngine | None,
                 device: torch.device | str, routing: TraceRouting | None = None) -> None:
        self.spec, self.store, self.engine, self.routing = spec, store, engine, routing
        self.device = torch.device(device)
        self.reference = engine is None
        self.batch = 0  # the sequence a reference pass belongs to (trace routing)
        self._scratch: torch.Tensor | None = None
        self._ref_moe: dict[int, MixedPrecisionMoE] = {}

    def forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.reference or self.engine is None:
            if self.routing is not None:
                ids, w = self.routing.sequence(self.batch, layer, x.shape[0], x.device)
            return self._reference(layer, x, ids, w)
        if self.routing is None:
            return self.engine.layer_step(layer, x, ids, w)
        if not self.engine.policy.is_static:
            ids.cpu()  # the read-back a live policy pays for
        e = self.engine
        ids, w, routing = self.routing.step(e.batch, e.pass_index, layer, x.shape[0], x.device)
        return e.layer_step(layer, x, ids, w, routing=routing)

    def _reference(self, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The layer from its exact bf16 host copies (copied to a device scratch on CUDA)."""
        handles = [ExpertHandle("bf16", e) for e in range(self.spec.experts)]
        if self.device.type != "cuda":
            if layer not in self._ref_moe:
                self._ref_moe[layer] = MixedPrecisionMoE({"bf16": ExpertPool(*self.store.layer_stacks("bf16", layer))},
                                                         handles)
            return self._ref_moe[layer](x, ids, w)
        lay = slab_layout("bf16", self.spec.hidden, self.spec.expert_intermediate)
        e = self.spec.experts
        if self._scratch is None:
            self._scratch = torch.empty(e * lay.nbytes, dtype=torch.uint8, device=self.device)   # [E * B]
            self._ref_moe[-1] = MixedPrecisionMoE({"bf16": ExpertPool(*lay.stacks(self._scratch, 0, e, lay.nbytes))},
                                                  handles)
        rows = self.store.rows["bf16"][layer * e : (layer + 1) * e]
        self._scratch.copy_(rows.view(-1), non_blocking=True)
        return self._ref_moe[-1](x, ids, w)


# ---------------------------------------------------------------- random-weight models
def pick_arch(spec: ModelSpec, arch: str = "auto") -> str:
    """The transformers model type for ``spec``: by preset name under ``auto``."""
    if arch != "auto":
        if arch not in ARCHS:
            raise ValueError(f"unknown runtime.arch {arch!r}; known: auto, {', '.join(ARCHS)}")
        return arch
    name = spec.name.lower()
    for prefix, a in (("mixtral", "mixtral"), ("olmoe", "olmoe"), ("deepseek", "deepseek_v3")):
        if name.startswith(prefix):
            return a
    return "qwen3_moe"


def attention_shape(spec: ModelSpec, full_hidden: int | None = None) -> tuple[int, int, int]:
    """(query heads, kv heads, head dim), scaled with the hidden size when the model is scaled down."""
    q, kv, hd = ATTENTION.get(spec.name, (max(1, spec.hidden // 128), max(1, spec.hidden // 1024), 128))
    f = spec.hidden / (full_hidden or spec.hidden)
    if f < 1:
        hd = min(hd, max(16, spec.hidden // 4))
        q, kv = max(1, round(q * f)), max(1, round(kv * f))
        kv = kv if q % kv == 0 else 1
    return q, kv, hd


def hf_config(spec: ModelSpec, arch: str = "auto", full_hidden: int | None = None, max_positions: int = 4096) -> Any:
    """A transformers config with ``spec``'s shapes (shared experts only where the arch has them)."""
    from transformers import AutoConfig

    arch = pick_arch(spec, arch)
    q, kv, hd = attention_shape(spec, full_hidden)
    common: dict[str, Any] = dict(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
        num_attention_heads=q, num_key_value_heads=kv, head_dim=hd, max_position_embeddings=max_positions,
        num_experts_per_tok=spec.top_k, tie_word_embeddings=False, pad_token_id=None, bos_token_id=None,
        eos_token_id=None, initializer_range=0.02)
    e, i = spec.experts, spec.expert_intermediate
    presets: dict[str, dict[str, Any]] = {
        "qwen3_moe": dict(num_experts=e, moe_intermediate_size=i, intermediate_size=i, mlp_only_layers=[],
                          decoder_sparse_step=1, norm_topk_prob=True),
        "mixtral": dict(num_local_experts=e, intermediate_size=i),
        "olmoe": dict(num_experts=e, intermediate_size=i),
        "deepseek_v3": dict(n_routed_experts=e, moe_intermediate_size=i, intermediate_size=i,
                            n_shared_experts=max(1, spec.shared_experts), first_k_dense_replace=0, n_group=1,
                            topk_group=1, q_lora_rank=None, kv_lora_rank=min(512, spec.hidden // 4),
                            qk_rope_head_dim=min(64, hd // 2), qk_nope_head_dim=hd, v_head_dim=hd),
    }
    extra = presets[arch]
    if arch == "deepseek_v3":
        common["head_dim"] = extra["qk_rope_head_dim"]  # DeepSeek's rotary dimension
    return AutoConfig.for_model(arch, **common, **extra)


def _init_(model: torch.nn.Module, seed: int, std: float) -> None:
    """Seeded init of the non-expert weights: norms 1, biases 0, matrices N(0, std)."""
    dev = next(model.parameters()).device
    gen = torch.Generator(dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() == 0:
                continue
            if "norm" in name.rsplit(".", 1)[0].rsplit(".", 1)[-1] or name.endswith("norm.weight"):
                p.fill_(1.0)
            elif "bias" in name.rsplit(".", 1)[-1]:
                p.normal_(0.0, 0.1, generator=gen) if "correction" in name else p.zero_()
            else:
                p.normal_(0.0, std, generator=gen)


def _fix_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Recompute the non-persistent buffers (rotary ``inv_freq``) that ``to_empty`` left uninitialised."""
    for name, module in model.named_modules():
        own = dict(module.named_buffers(recurse=False))
        if not own:
            continue
        if "inv_freq" not in own:
            raise ValueError(f"{name}: cannot initialise buffers {sorted(own)} of a meta-built model")
        fresh = type(module)(module.config)  # computes inv_freq on the CPU
        for b in own:
            getattr(module, b).copy_(getattr(fresh, b).to(device))


def build_random_model(spec: ModelSpec, *, arch: str = "auto", device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32, seed: int = 0, full_hidden: int | None = None,
                       std: float = 0.02) -> tuple[torch.nn.Module, Callable[[int], tuple[torch.Tensor, torch.Tensor]]]:
    """A random-weight model of ``spec`` on ``device`` without expert weights, and a function
    giving layer ``l``'s expert weights (seeded per layer, generated on ``device``)."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    config = hf_config(spec, arch, full_hidden)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for m in experts_modules(model):
        for name in ("gate_up_proj", "down_proj"):
            setattr(m, name, torch.nn.Parameter(torch.empty(0, dtype=dtype, device=device), requires_grad=False))
    model.to_empty(device=device)
    _init_(model, seed, std)
    _fix_buffers(model, device)
    return model.eval(), random_weights(spec, seed, device, dtype, std)


# ---------------------------------------------------------------- generation and quality
def forward_logits(model: Any, ids: torch.Tensor, cache: Any, keep: int = 1) -> tuple[torch.Tensor, Any]:
    """One forward with a KV cache; (logits of the last ``keep`` positions [B, keep, V], the cache)."""
    params = inspect.signature(model.forward).parameters
    kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": cache is not False}
    if cache not in (None, False):
        kwargs["cache" if "cache" in params else "past_key_values"] = cache
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = keep
    with torch.no_grad():
        out = model(**kwargs)
    new_cache = out.get("cache")
    return out.logits[:, -keep:], new_cache if new_cache is not None else out.get("past_key_values")


@dataclass
class Generation:
    """One batch's prompt and fed tokens ``[B, P + N]`` and the logits each pass produced ``[B, N + 1, V]``."""

    tokens: torch.Tensor
    logits: torch.Tensor
    prompt_tokens: int
    batch: int = 0


def generate(model: Any, engine: RuntimeEngine | None, prompts: torch.Tensor, new_tokens: int,
             batch: int = 0) -> Generation:
    """Prefill + ``new_tokens`` greedy decode passes, each reported to ``engine`` as one pass."""
    fed, logits = [prompts], []
    if engine is not None:
        engine.begin_pass(batch, 0)
    out, cache = forward_logits(model, prompts, None)
    if engine is not None:
        engine.end_pass()
    logits.append(out[:, -1].float())
    for d in range(new_tokens):
        nxt = logits[-1].argmax(-1, keepdim=True)                                    # [B, 1]
        fed.append(nxt)
        if engine is not None:
            engine.begin_pass(batch, d + 1)
        out, cache = forward_logits(model, nxt, cache)
        if engine is not None:
            engine.end_pass()
        logits.append(out[:, -1].float())
    return Generation(torch.cat(fed, 1), torch.stack(logits, 1), prompts.shape[1], batch)


def reference_logits(model: Any, runtime: HFRuntime, gen: Generation) -> torch.Tensor:
    """The bf16 model's logits ``[B, N + 1, V]`` at the positions where ``gen`` produced its own."""
    runtime.reference, runtime.batch = True, gen.batch
    try:
        out, _ = forward_logits(model, gen.tokens, False, keep=gen.logits.shape[1])
    finally:
        runtime.reference = False
    return out.float()


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(reference || ours) of next-token distributions, nats, per position: ``[..., V]`` -> ``[...]``."""
    ref, ours = F.log_softmax(ref_logits.double(), -1), F.log_softmax(logits.double(), -1)
    return (ref.exp() * (ref - ours)).sum(-1)


def random_prompts(seqs: int, prompt_tokens: int, vocab: int, rng: np.random.Generator) -> np.ndarray:
    """``[seqs, P]`` random token ids (a random-weight model has no tokenizer)."""
    return rng.integers(0, vocab, size=(seqs, prompt_tokens), dtype=np.int64)
