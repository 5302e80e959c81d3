"""Capture routing traces from Hugging Face MoE causal LMs (transformers 5.x).

A forward hook on every MoE router records, for each token, the top-k expert ids and the gate
weights that the block then hands to its experts (the weights the model actually used: for
DeepSeek that is after normalization and ``routed_scaling_factor``). Routers of transformers 5.x
return ``(router_logits, top_k_weights, top_k_index)`` (Qwen2/3-MoE, Qwen3-Next, Mixtral, OLMoE,
DeepSeek-V2/V3, GLM-4-MoE, gpt-oss), except Llama-4, whose router returns
``(scores [T, E], logits [T, E])`` with the sigmoid of the top-k logits scattered into ``scores``.

Prompts are equal-length windows of the text file's tokens, so a batch needs no padding and
every recorded token is real. Each batch runs one prefill pass (phase 0, steps 0..P-1) and then
greedy decodes N tokens, feeding every new token back through the model so that its routing is
recorded too (phase 1, steps P..P+N-1). torch and transformers are imported inside the functions
that need them: importing this module stays torch-free.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from moebits.core.model_spec import ModelSpec
from moebits.traces.format import Phase, Trace, TraceError, TraceMeta

if TYPE_CHECKING:
    import torch

CAPTURE_TOOL = "moebits traces capture"
TOKENIZE_MAX_CHARS = 4_000_000  # prompts are cut from at most this much of the text file

# no pad token: its all-zero embedding row would make every router logit tie
_TINY_COMMON: dict[str, Any] = dict(
    vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=4096,
    initializer_range=0.2, num_experts_per_tok=2, pad_token_id=None, bos_token_id=None, eos_token_id=None,
)
_MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
# --tiny ARCH -> (transformers model_type, config overrides on top of _TINY_COMMON)
TINY_ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3_moe": ("qwen3_moe", dict(num_experts=8, moe_intermediate_size=16, mlp_only_layers=[1])),
    "qwen2_moe": ("qwen2_moe", dict(num_experts=8, moe_intermediate_size=16, shared_expert_intermediate_size=32)),
    "qwen3_next": ("qwen3_next", dict(
        num_experts=8, moe_intermediate_size=16, shared_expert_intermediate_size=16,
        linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
        full_attention_interval=2)),
    "mixtral": ("mixtral", dict(num_local_experts=8)),
    "olmoe": ("olmoe", dict(num_experts=8)),
    "deepseek_v2": ("deepseek_v2", dict(
        n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=16, first_k_dense_replace=1,
        n_group=2, topk_group=1, topk_method="group_limited_greedy", q_lora_rank=None, **_MLA)),
    "deepseek_v3": ("deepseek_v3", dict(
        n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=16, first_k_dense_replace=1,
        n_group=4, topk_group=2, q_lora_rank=16, **_MLA)),
    "glm4_moe": ("glm4_moe", dict(
        n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=16, first_k_dense_replace=1,
        n_group=2, topk_group=1)),
    "gpt_oss": ("gpt_oss", dict(num_local_experts=8)),
    "llama4": ("llama4_text", dict(
        num_local_experts=8, num_experts_per_tok=1, intermediate_size_mlp=64, num_hidden_layers=4,
        interleave_moe_layer_step=2)),
}


# ---------------------------------------------------------------- ModelSpec from an HF config


def _cfg(config: Any, *names: str, default: Any = None) -> Any:
    """First attribute of ``names`` that the config has and is not None."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def moe_decoder_layers(config: Any) -> list[int]:
    """Decoder-layer indices that hold an MoE block, by the config's own rule."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = int(config.num_hidden_layers)
    explicit = getattr(config, "moe_layers", None)  # Llama-4
    if explicit is not None:
        return sorted(int(i) for i in explicit)
    first_dense = int(_cfg(config, "first_k_dense_replace", default=0))  # DeepSeek, GLM-4-MoE
    dense_only = set(_cfg(config, "mlp_only_layers", default=[]))  # Qwen2/3-MoE
    step = int(_cfg(config, "decoder_sparse_step", default=1))
    return [i for i in range(first_dense, n) if i not in dense_only and (i + 1) % step == 0]


def _attention_params(config: Any) -> int:
    """Attention weights of one decoder layer: MLA (DeepSeek) or grouped-query attention."""
    h, heads = int(config.hidden_size), int(config.num_attention_heads)
    kv_rank = getattr(config, "kv_lora_rank", None)
    if kv_rank:  # multi-head latent attention
        qk, v = config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim
        q_rank = getattr(config, "q_lora_rank", None)
        q = h * heads * qk if not q_rank else h * q_rank + q_rank * heads * qk
        kv = h * (kv_rank + config.qk_rope_head_dim) + kv_rank * heads * (config.qk_nope_head_dim + v)
        return int(q + kv + heads * v * h)
    head_dim = int(_cfg(config, "head_dim", default=h // heads))
    kv_heads = int(_cfg(config, "num_key_value_heads", default=heads))
    return 2 * h * heads * head_dim + 2 * h * kv_heads * head_dim


def _shared(config: Any) -> tuple[int, int]:
    """(shared experts, their total intermediate size) of one MoE layer."""
    n_shared = int(_cfg(config, "n_shared_experts", "moe_num_shared_experts", default=0))
    if n_shared:  # DeepSeek, GLM-4-MoE, ERNIE: shared experts as wide as routed ones
        return n_shared, n_shared * int(config.moe_intermediate_size)
    qwen_shared = int(_cfg(config, "shared_expert_intermediate_size", default=0))
    if qwen_shared:  # Qwen2-MoE, Qwen3-Next: one gated shared expert
        return 1, qwen_shared
    if getattr(config, "model_type", "").startswith("llama4"):  # one shared expert as wide as a routed one
        return 1, int(config.intermediate_size)
    return 0, 0


def spec_from_hf_config(config: Any, name: str | None = None, moe_layers: Sequence[int] | None = None) -> ModelSpec:
    """A :class:`ModelSpec` from a Hugging Face MoE config.

    ``name`` defaults to the config's ``model_type``; ``moe_layers`` (decoder-layer indices of the
    MoE blocks) defaults to the config's own rule (:func:`moe_decoder_layers`). Dense decoder
    layers count into ``dense_params`` with their attention and an FFN of ``intermediate_size``
    (Llama-4: ``intermediate_size_mlp``). Attention is counted as MLA or plain GQA; Qwen3-Next's
    linear-attention layers are counted as GQA (an approximation).
    """
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    moe = list(moe_decoder_layers(config) if moe_layers is None else moe_layers)
    if not moe:
        raise TraceError(f"config of {config.model_type!r} has no MoE layers; is it an MoE model?")
    experts = _cfg(config, "num_experts", "num_local_experts", "n_routed_experts")
    if experts is None:
        raise TraceError(f"config of {config.model_type!r} names no expert count; is it an MoE model?")
    h, attention = int(config.hidden_size), _attention_params(config)
    expert_i = int(_cfg(config, "moe_intermediate_size", "intermediate_size"))
    dense_i = int(_cfg(config, "intermediate_size_mlp", "intermediate_size"))
    dense_layers = int(config.num_hidden_layers) - len(moe)
    shared, shared_i = _shared(config)
    return ModelSpec(
        name=name or str(config.model_type), layers=len(moe), experts=int(experts),
        top_k=int(config.num_experts_per_tok), hidden=h, expert_intermediate=expert_i,
        shared_experts=shared, shared_intermediate=shared_i, attention_params=attention,
        dense_params=dense_layers * (3 * h * dense_i + attention), vocab_size=int(config.vocab_size),
    )


# ---------------------------------------------------------------- models and prompts


def tiny_config(arch: str) -> Any:
    """A tiny random-weight config of ``arch`` (one of :data:`TINY_ARCHS`): 3-4 layers, 8 experts."""
    if arch not in TINY_ARCHS:
        raise TraceError(f"unknown --tiny architecture {arch!r}; known: {', '.join(TINY_ARCHS)}")
    from transformers import AutoConfig

    model_type, overrides = TINY_ARCHS[arch]
    return AutoConfig.for_model(model_type, **{**_TINY_COMMON, **overrides})


def build_tiny_model(arch: str, seed: int = 0) -> Any:
    """A tiny random-weight MoE causal LM; seeded without touching torch's global RNG state.

    Score-correction biases (DeepSeek-V3, GLM-4-MoE), zero at init, get small random values
    so that the biased routing path is exercised.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        for module in model.modules():
            bias = getattr(module, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                with torch.no_grad():
                    bias.normal_(0.0, 0.1)
    return model.eval()


def load_model_dir(model_dir: str | Path, dtype: torch.dtype, device: str) -> tuple[Any, Any | None]:
    """Load a local HF MoE causal LM and its tokenizer (None when the directory has none)."""
    path = Path(model_dir)
    if not path.is_dir():
        raise TraceError(f"--model-dir {path}: no such directory")
    if not (path / "config.json").is_file():
        raise TraceError(f"--model-dir {path}: no config.json; not a Hugging Face model directory")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # with accelerate, weights load straight onto the device; without it, via host memory
    placement = {"device_map": device} if importlib.util.find_spec("accelerate") else {}
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype, **placement)
    except (OSError, ValueError, KeyError) as exc:
        raise TraceError(f"--model-dir {path}: transformers cannot load it as a causal LM ({exc})") from None
    model = model.to(device)
    tokenizer = None
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


def read_text(path: str | Path) -> str:
    """The text file prompts are cut from (UTF-8, undecodable bytes replaced)."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"--text {path}: no such file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise TraceError(f"--text {path}: the file is empty")
    return text


def tokenize(text: str, tokenizer: Any | None, vocab_size: int) -> np.ndarray:
    """Token ids of the text's first :data:`TOKENIZE_MAX_CHARS` characters.

    Without a tokenizer: UTF-8 bytes modulo ``vocab_size`` (deterministic, for tiny models).
    """
    text = text[:TOKENIZE_MAX_CHARS]
    if tokenizer is None:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64) % vocab_size
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def cut_prompts(tokens: np.ndarray, prompt_tokens: int, seqs: int, rng: np.random.Generator,
                bos: int | None = None) -> np.ndarray:
    """``seqs`` non-overlapping windows of the text, picked at random, in text order: [S, P].

    With a ``bos`` id every prompt is BOS followed by a window of P-1 tokens, as the model saw
    its training documents. Equal-length prompts need no padding: every routed token is real.
    """
    if prompt_tokens <= (0 if bos is None else 1) or seqs <= 0:
        raise TraceError(f"--prompt-tokens ({prompt_tokens}) must be > 1 and --seqs ({seqs}) > 0")
    width = prompt_tokens - (bos is not None)
    windows = tokens.shape[0] // width
    if windows < seqs:
        raise TraceError(
            f"the text has {tokens.shape[0]} tokens: {windows} prompts of {prompt_tokens} tokens, "
            f"but --seqs asks for {seqs}; use a longer text, fewer --seqs or shorter --prompt-tokens"
        )
    picked = np.sort(rng.choice(windows, size=seqs, replace=False))
    prompts = tokens[: windows * width].reshape(windows, width)[picked]
    if bos is not None:
        prompts = np.concatenate([np.full((seqs, 1), bos, dtype=prompts.dtype), prompts], axis=1)
    return prompts


# ---------------------------------------------------------------- router hooks


@dataclass(frozen=True)
class RouterSite:
    """One MoE router: its module path, decoder-layer index and MoE-layer index (0..L-1)."""

    name: str
    decoder_layer: int
    moe_layer: int
    module: Any = field(repr=False, compare=False)


_BLOCK_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.\w+$")


def find_routers(model: Any) -> list[RouterSite]:
    """The router of every MoE block ``layers.<i>.<block>`` that has ``experts`` beside ``gate``/``router``."""
    import torch

    found: list[tuple[int, str, Any]] = []
    for name, module in model.named_modules():
        match = _BLOCK_RE.search(name)
        if match is None or not isinstance(getattr(module, "experts", None), torch.nn.Module):
            continue
        for attr in ("gate", "router"):
            router = getattr(module, attr, None)
            if isinstance(router, torch.nn.Module):
                found.append((int(match.group(1)), f"{name}.{attr}", router))
                break
    found.sort(key=lambda f: f[0])
    decoder = [f[0] for f in found]
    if not found:
        raise TraceError(
            f"{type(model).__name__} has no MoE router moebits can hook (looked for layers.<i>.<block> "
            "with an 'experts' module beside a 'gate' or 'router'); is it an MoE model?"
        )
    if len(set(decoder)) != len(decoder):
        raise TraceError(f"{type(model).__name__}: several MoE routers in one decoder layer: {[f[1] for f in found]}")
    return [RouterSite(name, d, i, module) for i, (d, name, module) in enumerate(found)]


def parse_router_output(output: Any, top_k: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [T, k], weights [T, k]) from what a router returned; see the module docstring."""
    import torch

    if isinstance(output, tuple) and len(output) == 3:  # (logits, top-k weights, top-k ids)
        _, weights, ids = output
        if (isinstance(ids, torch.Tensor) and not ids.is_floating_point() and ids.ndim == 2
                and ids.shape[-1] == top_k and weights.shape == ids.shape):
            return ids, weights
    if isinstance(output, tuple) and len(output) == 2:  # Llama-4: (scores [T, E], logits [T, E])
        scores, logits = output
        if isinstance(scores, torch.Tensor) and scores.ndim == 2 and scores.shape == logits.shape:
            ids = torch.topk(logits, top_k, dim=-1).indices  # the router's own choice
            return ids, scores.gather(-1, ids)
    parts = output if isinstance(output, tuple) else (output,)
    shapes = [tuple(o.shape) if hasattr(o, "shape") else type(o).__name__ for o in parts]
    raise TraceError(
        f"router {where} returned {shapes}; moebits reads (logits, weights [T, {top_k}], ids [T, {top_k}]) "
        "or Llama-4's (scores [T, E], logits [T, E])"
    )


class RoutingRecorder:
    """Forward hooks on the routers; collects one pass (one model forward) at a time.

    Use as a context manager (hooks are removed on exit). Between :meth:`start_pass` and
    :meth:`end_pass` every router must fire exactly once with ``tokens`` rows; router calls
    outside a pass are ignored.
    """

    def __init__(self, sites: Sequence[RouterSite], top_k: int) -> None:
        self._sites = list(sites)
        self._top_k = top_k
        self._handles: list[Any] = []
        self._pass: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._tokens = 0

    def __enter__(self) -> RoutingRecorder:
        self._handles = [s.module.register_forward_hook(self._hook(s)) for s in self._sites]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, site: RouterSite) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            if self._pass is None:
                return
            ids, weights = parse_router_output(output, self._top_k, site.name)
            if ids.shape[0] != self._tokens:
                raise TraceError(f"router {site.name} routed {ids.shape[0]} tokens, expected {self._tokens}")
            if site.moe_layer in self._pass:
                raise TraceError(f"router {site.name} ran twice in one forward pass")
            self._pass[site.moe_layer] = (ids.detach(), weights.detach())
        return hook

    def start_pass(self, tokens: int) -> None:
        self._pass, self._tokens = {}, tokens

    def end_pass(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids [T, L, k] int16, weights [T, L, k] float32) of the pass just run."""
        import torch

        got, self._pass = self._pass or {}, None
        missing = [s.name for s in self._sites if s.moe_layer not in got]
        if missing:
            raise TraceError(f"router(s) {missing} did not run in a forward pass")
        ids = torch.stack([got[s.moe_layer][0] for s in self._sites], dim=1)  # [T, L, k]
        weights = torch.stack([got[s.moe_layer][1].float() for s in self._sites], dim=1)
        return ids.to("cpu", torch.int16).numpy(), weights.cpu().numpy()


# ---------------------------------------------------------------- prefill + greedy decode


def _forward(model: Any, ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
    """One forward with a KV cache; returns (last-position logits [B, V], the cache)."""
    params = inspect.signature(model.forward).parameters
    kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": True}
    if cache is not None:
        kwargs["cache" if "cache" in params else "past_key_values"] = cache
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    out = model(**kwargs)
    cache = out.get("cache")  # transformers >= 5.2x; earlier 5.x call it past_key_values
    return out.logits[:, -1], cache if cache is not None else out.get("past_key_values")


def _capture_batch(model: Any, ids: torch.Tensor, new_tokens: int, recorder: RoutingRecorder,
                   bar: Any) -> tuple[np.ndarray, np.ndarray]:
    """Prefill + greedy decode of one batch: (ids, weights), each [B, P+N, L, k]."""
    b, p = ids.shape
    recorder.start_pass(b * p)
    logits, cache = _forward(model, ids, None)
    e, g = recorder.end_pass()
    experts, gates = [e.reshape(b, p, *e.shape[1:])], [g.reshape(b, p, *g.shape[1:])]
    bar.update(1)
    for _ in range(new_tokens):
        recorder.start_pass(b)
        logits, cache = _forward(model, logits.argmax(-1, keepdim=True), cache)
        e, g = recorder.end_pass()
        experts.append(e[:, None])
        gates.append(g[:, None])
        bar.update(1)
    return np.concatenate(experts, axis=1), np.concatenate(gates, axis=1)


def capture_routing(model: Any, prompts: np.ndarray, new_tokens: int, batch: int, top_k: int,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Run every prompt [S, P] through prefill and ``new_tokens`` greedy steps, ``batch`` at a time.

    Returns (ids int16, weights float32), each [S, P+N, L, k].
    """
    import torch
    from tqdm import tqdm

    if batch <= 0 or new_tokens < 0:
        raise TraceError(f"--batch ({batch}) must be > 0 and --max-new-tokens ({new_tokens}) >= 0")
    device = next(model.parameters()).device
    starts = range(0, prompts.shape[0], batch)
    parts = []
    with (RoutingRecorder(find_routers(model), top_k) as recorder, torch.inference_mode(),
          tqdm(total=len(starts) * (1 + new_tokens), desc="capture", unit="pass", disable=not progress) as bar):
        for s in starts:
            ids = torch.as_tensor(prompts[s : s + batch], dtype=torch.long, device=device)
            parts.append(_capture_batch(model, ids, new_tokens, recorder, bar))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def routing_to_trace(ids: np.ndarray, weights: np.ndarray, prompt_tokens: int, spec: ModelSpec,
                     provenance: dict[str, str]) -> Trace:
    """A validated :class:`Trace` from [S, T, L, k] routing; steps < ``prompt_tokens`` are prefill."""
    s, t, layers, k = ids.shape
    step = np.tile(np.repeat(np.arange(t, dtype=np.int32), layers), s)
    trace = Trace(
        meta=TraceMeta(spec=spec, provenance=provenance),
        seq=np.repeat(np.arange(s, dtype=np.int32), t * layers),
        step=step,
        phase=np.where(step < prompt_tokens, Phase.PREFILL, Phase.DECODE).astype(np.uint8),
        layer=np.tile(np.arange(layers, dtype=np.uint16), s * t),
        expert=ids.reshape(-1, k).astype(np.int16),
        gate=weights.reshape(-1, k).astype(np.float16),
    )
    trace.validate("captured trace")
    return trace


def model_spec(model: Any, name: str | None = None) -> ModelSpec:
    """The ModelSpec of a loaded model: its config, with the MoE layers where its routers are."""
    sites = find_routers(model)
    return spec_from_hf_config(model.config, name=name, moe_layers=[s.decoder_layer for s in sites])


def capture_trace(model: Any, prompts: np.ndarray, new_tokens: int, batch: int, spec: ModelSpec,
                  provenance: dict[str, str], progress: bool = False) -> Trace:
    """Capture routing of ``prompts`` [S, P] and return it as a trace of ``spec``."""
    import torch
    import transformers

    ids, weights = capture_routing(model, prompts, new_tokens, batch, spec.top_k, progress)
    param = next(model.parameters())
    prov = {
        "capture_tool": CAPTURE_TOOL,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "dtype": str(param.dtype).removeprefix("torch."),
        "device": str(param.device),
        "routers": type(find_routers(model)[0].module).__name__,
        "prompts": f"{prompts.shape[0]} x {prompts.shape[1]} tokens, equal length (no padding), "
                   f"then {new_tokens} greedy tokens each, batch {batch}",
        "gates": "top-k weights the experts were given (after any normalization and scaling)",
        **provenance,
    }
    return routing_to_trace(ids, weights, prompts.shape[1], spec, prov)

