"""Trace capture from Hugging Face MoE models (tiny random configs on CPU).

For every architecture the captured ids and gates are checked two independent ways: against a
forward pre-hook on the experts module (what the experts were actually given), and against a
numpy re-implementation of the architecture's routing rule (softmax / sigmoid + bias + group
top-k / ...) applied to the ``output_router_logits=True`` logits of a cache-free greedy decode,
which also checks that the decoded tokens are the greedy ones.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from moebits.core import MODEL_PRESETS  # noqa: E402
from moebits.traces import capture as cap  # noqa: E402
from moebits.traces.__main__ import main  # noqa: E402
from moebits.traces.format import Phase, read_trace, write_trace  # noqa: E402

S, P, N, B = 3, 6, 3, 2  # 3 sequences of 6 prompt tokens, 3 decoded tokens, batches of 2 (last has 1)
TEXT = ("def moebits(x):\n    return sum(expert(x) for expert in experts)  # routing!\n" * 8).encode()

# arch -> (decoder layers holding an MoE block, routing rule of the reference)
EXPECTED = {
    "qwen3_moe": ([0, 2], "softmax"),  # mlp_only_layers=[1]
    "qwen2_moe": ([0, 1, 2], "softmax"),
    "qwen3_next": ([0, 1, 2], "softmax"),
    "mixtral": ([0, 1, 2], "softmax"),
    "olmoe": ([0, 1, 2], "softmax"),
    "deepseek_v2": ([1, 2], "group_softmax"),  # first_k_dense_replace=1
    "deepseek_v3": ([1, 2], "group_sigmoid_bias"),
    "glm4_moe": ([1, 2], "group_sigmoid_bias"),
    "gpt_oss": ([0, 1, 2], "topk_softmax"),
    "llama4": ([1, 3], "topk_sigmoid"),  # interleave_moe_layer_step=2
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is ~10x faster than several on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _prompts() -> np.ndarray:
    tokens = cap.tokenize(TEXT.decode(), None, 256)
    return cap.cut_prompts(tokens, P, S, np.random.default_rng(0))


def _moe_blocks(model) -> dict:
    """decoder layer -> MoE block, found without the capture code."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        block = getattr(layer, "mlp", None) or getattr(layer, "feed_forward", None)
        if hasattr(block, "experts"):
            out[i] = block
    return out


def _hook_experts(blocks) -> dict[int, list]:
    """Record the (ids, weights) every experts module is called with, in call order."""
    calls: dict[int, list] = {d: [] for d in blocks}
    for d, block in blocks.items():
        def pre_hook(module, args, kwargs, d=d):
            ids = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
            w = args[2] if len(args) > 2 else kwargs.get("top_k_weights", kwargs.get("routing_weights"))
            calls[d].append((ids.numpy().copy(), w.float().numpy().copy()))
        block.experts.register_forward_pre_hook(pre_hook, with_kwargs=True)
    return calls


def _from_calls(calls: list) -> tuple[np.ndarray, np.ndarray]:
    """One layer's experts calls [prefill, decode 1..N] per batch -> ids, weights [S, P+N, k]."""
    ids, ws = [], []
    for start in range(0, len(calls), 1 + N):
        batch = calls[start : start + 1 + N]
        b = batch[1][0].shape[0]
        ids.append(np.concatenate([c[0].reshape(b, -1, c[0].shape[-1]) for c in batch], axis=1))
        ws.append(np.concatenate([c[1].reshape(b, -1, c[1].shape[-1]) for c in batch], axis=1))
    return np.concatenate(ids), np.concatenate(ws)


def _router_logits(model, seqs, blocks) -> list:
    """Router logits [B*T, E] per MoE layer: ``output_router_logits=True`` where the model
    supports it, else (older transformers, e.g. 5.17 for DeepSeek/GLM/Llama-4) a hook on the
    routers that keeps only their logits."""
    out = model(seqs, output_router_logits=True)
    if out.get("router_logits") is not None:
        return list(out.router_logits)
    logits, handles = [], []
    for block in blocks.values():
        router = getattr(block, "gate", None) or block.router
        at = 1 if type(router).__name__ == "Llama4Router" else 0  # Llama-4 returns (scores, logits)
        handles.append(router.register_forward_hook(lambda m, a, o, at=at: logits.append(o[at])))
    model(seqs)
    for h in handles:
        h.remove()
    return logits


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _topk(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k]


def _group_mask(choice: np.ndarray, groups: int, keep: int, per_group) -> np.ndarray:
    t, e = choice.shape
    g_scores = per_group(choice.reshape(t, groups, e // groups))  # [T, G]
    kept = _topk(g_scores, keep)
    mask = np.zeros((t, groups), dtype=bool)
    np.put_along_axis(mask, kept, True, axis=1)
    return np.repeat(mask, e // groups, axis=1)


def _reference_routing(rule: str, logits: np.ndarray, cfg, router) -> tuple[np.ndarray, np.ndarray]:
    """Independent numpy routing from router logits [T, E]: (ids, weights) [T, k]."""
    k = cfg.num_experts_per_tok
    if rule == "softmax":
        probs = _softmax(logits)
        ids = _topk(probs, k)
        w = np.take_along_axis(probs, ids, 1)
        if getattr(cfg, "norm_topk_prob", False) or cfg.model_type == "mixtral":
            w = w / w.sum(axis=1, keepdims=True)
        return ids, w
    if rule == "group_softmax":  # DeepSeek-V2 group_limited_greedy
        probs = _softmax(logits)
        mask = _group_mask(probs, cfg.n_group, cfg.topk_group, lambda g: g.max(axis=-1))
        ids = _topk(np.where(mask, probs, 0.0), k)
        return ids, np.take_along_axis(probs, ids, 1) * cfg.routed_scaling_factor
    if rule == "group_sigmoid_bias":  # DeepSeek-V3 / GLM-4-MoE
        scores = 1.0 / (1.0 + np.exp(-logits))
        choice = scores + router.e_score_correction_bias.detach().numpy()
        top2 = lambda g: np.sort(g, axis=-1)[..., -2:].sum(axis=-1)  # noqa: E731
        mask = _group_mask(choice, cfg.n_group, cfg.topk_group, top2)
        ids = _topk(np.where(mask, choice, -np.inf), k)
        w = np.take_along_axis(scores, ids, 1)
        if cfg.norm_topk_prob:
            w = w / w.sum(axis=1, keepdims=True)
        return ids, w * cfg.routed_scaling_factor
    ids = _topk(logits, k)
    top = np.take_along_axis(logits, ids, 1)
    if rule == "topk_softmax":  # gpt-oss: softmax over the top-k logits
        return ids, _softmax(top)
    return ids, 1.0 / (1.0 + np.exp(-top))  # llama4: sigmoid of the top-k logits


def _sorted_pairs(ids: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(ids, axis=-1)
    return np.take_along_axis(ids, order, -1), np.take_along_axis(w, order, -1)


@pytest.mark.parametrize("arch", list(cap.TINY_ARCHS))
def test_capture_records_what_the_model_routed(arch: str, tmp_path: Path) -> None:
    decoder_layers, rule = EXPECTED[arch]
    before = torch.random.get_rng_state()
    model = cap.build_tiny_model(arch, seed=1)
    assert torch.equal(before, torch.random.get_rng_state()), "building a tiny model moved torch's global RNG"
    spec = cap.model_spec(model, f"tiny-{arch}")
    layers, k = len(decoder_layers), spec.top_k
    assert [s.decoder_layer for s in cap.find_routers(model)] == decoder_layers
    assert spec.layers == layers and spec.experts == 8

    blocks = _moe_blocks(model)
    assert sorted(blocks) == decoder_layers
    calls = _hook_experts(blocks) if rule != "topk_sigmoid" else None  # llama4 experts get no ids
    prompts = _prompts()
    trace = cap.capture_trace(model, prompts, N, B, spec, {"model": arch})
    trace = read_trace(write_trace(trace, tmp_path / f"{arch}.parquet"))

    assert trace.rows == S * (P + N) * layers
    assert trace.tokens(Phase.PREFILL) == S * P and trace.tokens(Phase.DECODE) == S * N
    assert trace.expert.shape == (trace.rows, k) and trace.gate is not None
    got_ids = trace.expert.reshape(S, P + N, layers, k).astype(np.int64)
    got_w = trace.gate.reshape(S, P + N, layers, k).astype(np.float32)
    assert np.array_equal(trace.step.reshape(S, P + N, layers)[0, :, 0], np.arange(P + N))
    assert np.array_equal(trace.layer[:layers], np.arange(layers))
    assert len(np.unique(got_ids)) > 2, "degenerate routing: the test would prove little"

    if calls is not None:  # exactly what the experts were handed, decode steps included
        for l, d in enumerate(decoder_layers):
            ids, w = _from_calls(calls[d])
            assert np.array_equal(got_ids[:, :, l], ids), f"{arch} layer {l}: ids differ from the experts' input"
            np.testing.assert_allclose(got_w[:, :, l], w, rtol=2e-3, atol=1e-4)

    # every position: greedy-decode without a KV cache, then apply the architecture's routing
    # rule to the router logits of one full forward over prompt + decoded tokens
    ref_logits = []
    with torch.no_grad():
        for s in range(0, S, B):
            seqs = torch.as_tensor(prompts[s : s + B])
            for _ in range(N):
                seqs = torch.cat([seqs, model(seqs).logits[:, -1:].argmax(-1)], dim=1)
            logits = _router_logits(model, seqs, blocks)
            ref_logits.append([r.float().numpy().reshape(-1, P + N, r.shape[-1]) for r in logits])
    for l, d in enumerate(decoder_layers):
        logits = np.concatenate([b[l] for b in ref_logits]).reshape(S * (P + N), -1).astype(np.float64)
        router = getattr(blocks[d], "gate", None) or blocks[d].router
        ids, w = _reference_routing(rule, logits, model.config, router)
        want_ids, want_w = _sorted_pairs(ids, w)
        have_ids, have_w = _sorted_pairs(got_ids[:, :, l].reshape(-1, k), got_w[:, :, l].reshape(-1, k))
        assert np.array_equal(have_ids, want_ids), f"{arch} layer {l}: ids differ from the reference rule"
        np.testing.assert_allclose(have_w, want_w, rtol=2e-3, atol=1e-4)


def test_spec_from_hf_config_matches_presets() -> None:
    from transformers import (
        DeepseekV2Config,
        Llama4TextConfig,
        MixtralConfig,
        OlmoeConfig,
        Qwen2MoeConfig,
        Qwen3MoeConfig,
    )

    configs = {
        "Mixtral-8x7B": MixtralConfig(),
        "OLMoE-1B-7B": OlmoeConfig(intermediate_size=1024),
        "Qwen1.5-MoE-A2.7B": Qwen2MoeConfig(),
        "Qwen3-30B-A3B": Qwen3MoeConfig(
            hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
            head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768),
        "DeepSeek-V2-Lite": DeepseekV2Config(
            hidden_size=2048, num_hidden_layers=27, num_attention_heads=16, kv_lora_rank=512,
            q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
            n_routed_experts=64, n_shared_experts=2, moe_intermediate_size=1408,
            intermediate_size=10944, first_k_dense_replace=1, num_experts_per_tok=6, vocab_size=102400),
        "Llama-4-Maverick": Llama4TextConfig(
            hidden_size=5120, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
            num_local_experts=128, num_experts_per_tok=1, intermediate_size=8192,
            intermediate_size_mlp=16384, num_hidden_layers=48, interleave_moe_layer_step=2,
            vocab_size=202048),
    }
    for name, config in configs.items():
        assert cap.spec_from_hf_config(config, name=name) == MODEL_PRESETS[name], name
    assert cap.spec_from_hf_config(MixtralConfig()).name == "mixtral"


def _text_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_bytes(TEXT)
    return path


def _capture_args(tmp_path: Path, *source: str) -> list[str]:
    return ["capture", *source, "--text", str(_text_file(tmp_path)), "--seqs", "3", "--batch", "2",
            "--prompt-tokens", "5", "--max-new-tokens", "2", "--device", "cpu", "-o", str(tmp_path / "t.parquet")]


def test_cli_tiny_writes_a_trace(tmp_path: Path, capsys) -> None:
    assert main(_capture_args(tmp_path, "--tiny", "deepseek_v3")) == 0
    trace = read_trace(tmp_path / "t.parquet")
    assert trace.rows == 3 * (5 + 2) * 2 and trace.spec.name == "tiny-deepseek_v3"
    prov = trace.meta.provenance
    assert prov["capture_tool"] == "moebits traces capture" and prov["dataset"] == "corpus.txt"
    assert prov["dtype"] == "float32" and prov["device"] == "cpu"
    assert prov["transformers"] and prov["routers"] == "DeepseekV3TopkRouter"
    assert "wrote" in capsys.readouterr().out


def _save_word_tokenizer(path: Path) -> int:
    """A word-level tokenizer with a BOS token, saved the Hugging Face way; returns the BOS id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(TEXT.decode().split()))
    vocab = {"<unk>": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>").save_pretrained(path)
    return 1


def test_cli_model_dir(tmp_path: Path) -> None:
    model = cap.build_tiny_model("qwen2_moe", seed=3)
    model_dir = tmp_path / "Tiny-Qwen2-MoE"
    model.save_pretrained(model_dir)
    assert main(_capture_args(tmp_path, "--model-dir", str(model_dir))) == 0
    trace = read_trace(tmp_path / "t.parquet")
    assert trace.spec == dataclasses.replace(cap.model_spec(model), name="Tiny-Qwen2-MoE")
    assert trace.meta.provenance["tokenizer"] == "utf-8 bytes mod 256"
    assert trace.rows == 3 * (5 + 2) * 3

    bos = _save_word_tokenizer(model_dir)
    assert main(_capture_args(tmp_path, "--model-dir", str(model_dir))) == 0
    trace = read_trace(tmp_path / "t.parquet")
    assert trace.meta.provenance["tokenizer"].endswith(f"prompts start with BOS {bos}")
    assert trace.rows == 3 * (5 + 2) * 3


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (("--tiny", "nope"), "unknown --tiny architecture 'nope'; known: qwen3_moe"),
        (("--model-dir", "/nonexistent/model"), "--model-dir /nonexistent/model: no such directory"),
    ],
)
def test_cli_bad_source_is_one_clear_error(tmp_path: Path, capsys, source, message) -> None:
    assert main(_capture_args(tmp_path, *source)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "t.parquet").exists()


def test_cli_model_dir_without_config_and_short_text(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert main(_capture_args(tmp_path, "--model-dir", str(tmp_path / "empty"))) == 2
    assert "no config.json" in capsys.readouterr().err
    args = _capture_args(tmp_path, "--tiny", "mixtral")
    args[args.index("--seqs") + 1] = "1000"
    assert main(args) == 2
    assert "--seqs asks for 1000" in capsys.readouterr().err


def test_cut_prompts_windows_and_bos() -> None:
    tokens = np.arange(100)
    prompts = cap.cut_prompts(tokens, 10, 4, np.random.default_rng(0))
    assert prompts.shape == (4, 10) and (np.diff(prompts, axis=1) == 1).all() and (prompts[:, 0] % 10 == 0).all()
    assert len(np.unique(prompts)) == 40 and (np.diff(prompts[:, 0]) > 0).all()
    with_bos = cap.cut_prompts(tokens, 10, 4, np.random.default_rng(0), bos=7)
    assert with_bos.shape == (4, 10) and (with_bos[:, 0] == 7).all() and (with_bos[:, 1] % 9 == 0).all()
    with pytest.raises(cap.TraceError, match="--seqs asks for 11"):
        cap.cut_prompts(tokens, 10, 11, np.random.default_rng(0))


def test_router_with_unknown_output_is_refused() -> None:
    with pytest.raises(cap.TraceError, match="router x returned"):
        cap.parse_router_output(torch.zeros(4, 8), 2, "x")
