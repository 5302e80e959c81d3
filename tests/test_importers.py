"""Importers of public trace formats: the real traces in ../shared (shapes and known values
from each SOURCE.md and the source files), and small hand-written sources (exact steps,
repairs, detection, and one clear error per kind of bad input)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from moebits.traces.__main__ import main
from moebits.traces.format import Phase, Trace, TraceError, read_trace
from moebits.traces.importers import FORMATS, detect_format, import_source

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "real"
MIXTRAL = REAL / "mixtral8x7b_speculative-moe"
LLAMA = REAL / "llama4maverick_mmlu"
DEEPSEEK = REAL / "deepseekv2lite_moe-beyond"
QWEN = REAL / "qwen15moe_vllm-logger"


def _real(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real traces not present at {path}")
    return path


def _row(t: Trace, seq: int, step: int, layer: int) -> int:
    hit = np.flatnonzero((t.seq == seq) & (t.step == step) & (t.layer == layer))
    assert hit.size == 1, f"no unique row for (seq {seq}, step {step}, layer {layer})"
    return int(hit[0])


def _tokens_per_seq(t: Trace, phase: Phase) -> np.ndarray:
    """Distinct steps of each sequence in one phase."""
    m = t.phase == phase
    pairs = np.unique(np.stack([t.seq[m], t.step[m]], axis=1), axis=0)
    return np.bincount(pairs[:, 0], minlength=t.num_seqs)


# ---------------------------------------------------------------- real traces


@pytest.fixture(scope="module")
def deepseek() -> Trace:
    return import_source(_real(DEEPSEEK))


@pytest.fixture(scope="module")
def llama() -> Trace:
    return import_source(_real(LLAMA))


@pytest.fixture(scope="module")
def mixtral() -> Trace:
    return import_source(_real(MIXTRAL))


@pytest.fixture(scope="module")
def qwen() -> Trace:
    return import_source(_real(QWEN))


def test_deepseek_folder(deepseek: Trace) -> None:
    t = deepseek
    assert (t.spec.name, t.spec.layers, t.k, t.gate) == ("DeepSeek-V2-Lite", 26, 6, None)
    assert t.num_seqs == 100
    assert t.tokens(Phase.PREFILL) == 10_478 and t.tokens(Phase.DECODE) == 0
    assert t.rows == 272_428 == 26 * 10_478
    # prompt_1001_data.csv: layer 1 token 0, layer 2 token 0; prompt_1100: last row (layer 26)
    assert t.expert[_row(t, 0, 0, 0)].tolist() == [8, 26, 56, 57, 60, 11]
    assert t.expert[_row(t, 0, 1, 0)].tolist() == [8, 10, 14, 30, 56, 44]
    assert t.expert[_row(t, 0, 0, 1)].tolist() == [3, 35, 38, 62, 63, 60]
    assert t.expert[-1].tolist() == [5, 13, 29, 53, 58, 7] and t.seq[-1] == 99 and t.layer[-1] == 25
    assert t.meta.provenance["format"] == "hf-csv"


def test_llama_folder(llama: Trace) -> None:
    t = llama
    assert (t.spec.name, t.spec.layers, t.k, t.gate) == ("Llama-4-Maverick", 24, 1, None)
    assert t.num_seqs == 75
    assert t.tokens(Phase.PREFILL) == 1_605 and t.tokens(Phase.DECODE) == 9_496
    assert t.rows == 24 * (1_605 + 9_496)
    # abstract_algebra/0.json: 25 prompt tokens; decoder layers 1, 3, 47 -> MoE layers 0, 1, 23
    assert _tokens_per_seq(t, Phase.PREFILL)[0] == 25
    assert [int(t.expert[_row(t, 0, 0, layer), 0]) for layer in (0, 1, 2, 23)] == [106, 85, 27, 73]
    assert [int(t.expert[_row(t, 0, 25, layer), 0]) for layer in (0, 1, 23)] == [119, 31, 19]
    assert t.phase[_row(t, 0, 25, 0)] == Phase.DECODE and t.phase[_row(t, 0, 24, 0)] == Phase.PREFILL
    # natural file order: 10.json is sequence 10, astronomy/259.json the last (37 + 64 tokens)
    assert "10=llama4-mmlu-abstract_algebra/10.json;" in t.meta.provenance["sequences"]
    decode = _tokens_per_seq(t, Phase.DECODE)
    assert sorted(decode.tolist())[:2] == [64, 88] and decode[74] == 64
    assert int(t.expert[-1, 0]) == 10


def test_mixtral_folder(mixtral: Trace) -> None:
    t = mixtral
    assert (t.spec.name, t.spec.layers, t.k) == ("Mixtral-8x7B", 32, 2)
    assert t.gate is not None
    assert t.num_seqs == 4  # gsm8k/0, gsm8k/1, humaneval/0, humaneval/1
    # decode-only sequences truncated to the smallest per-layer count: 166, 78, 252;
    # humaneval/0 comes from routing_raw.jsonl (135 prefill + 83 decode, exact steps)
    assert _tokens_per_seq(t, Phase.DECODE).tolist() == [166, 78, 83, 252]
    assert _tokens_per_seq(t, Phase.PREFILL).tolist() == [0, 0, 135, 0]
    for seq in (0, 1, 3):
        assert (t.seq == seq).sum() == 32 * _tokens_per_seq(t, Phase.DECODE)[seq]
    i = _row(t, 0, 0, 0)
    assert t.expert[i].tolist() == [7, 0]
    assert np.allclose(t.gate[i].astype(np.float32), [0.80038, 0.19962], atol=1e-3)
    assert t.expert[_row(t, 3, 0, 0)].tolist() == [6, 5]
    repairs = t.meta.provenance["repairs"]
    assert "gsm8k/0: truncated to 166" in repairs and "dropped the decode-only duplicate" in repairs


def test_mixtral_raw_file_keeps_every_row() -> None:
    t = import_source(_real(MIXTRAL / "routing_raw.jsonl"))
    assert t.rows == 6_777  # every source row, at its exact step
    assert t.tokens(Phase.PREFILL) == 135 and t.tokens(Phase.DECODE) == 83
    assert t.expert[_row(t, 0, 0, 0)].tolist() == [5, 2]
    # layer 4 lost prompt position 1 to the collector's [0.5, 0.5] filter: absent, not shifted
    assert not ((t.layer == 4) & (t.step == 1)).any()
    # decode step 0 at layer 0 equals humaneval_2_routing.jsonl's first humaneval/0 token
    assert t.expert[_row(t, 0, 135, 0)].tolist() == [6, 5]


def test_qwen_folder(qwen: Trace) -> None:
    t = qwen
    assert (t.spec.name, t.spec.layers, t.k) == ("Qwen1.5-MoE-A2.7B", 24, 4)
    assert sorted(set(t.layer.tolist())) == [0, 8, 12, 18, 23]
    assert t.num_seqs == 25
    for layer in (0, 8, 12, 18, 23):
        m = t.layer == layer
        # SOURCE.md's 2,886 rows of the 127 decode calls, plus request 0's first decode token,
        # which rides in the batched prefill call; prefill = 65 (request 0) + 1,405
        assert (m & (t.phase == Phase.DECODE)).sum() == 2_887
        assert (m & (t.phase == Phase.PREFILL)).sum() == 1_470
    assert _tokens_per_seq(t, Phase.DECODE)[:2].tolist() == [128, 127]
    assert _tokens_per_seq(t, Phase.PREFILL)[0] == 65
    assert t.expert[_row(t, 0, 0, 18)].tolist() == [26, 21, 29, 55]  # first row of the 65-row call
    assert t.expert[_row(t, 0, 0, 0)].tolist() == [33, 16, 24, 27]
    assert t.expert[_row(t, 0, 65, 0)].tolist() == [42, 18, 38, 6]  # row 0 of the 1,406-row call
    assert t.gate is not None and float(t.gate.astype(np.float32).sum(axis=1).max()) < 1.0  # raw softmax
    assert "batch POSITION" in t.meta.provenance["decode_identity"]


def test_qwen_prefill_split_matches_shared_first_tokens(qwen: Trace) -> None:
    """Prompts 2, 11, 16 and 24 (sequences 1, 10, 15, 23) start with "A": their first tokens
    route identically at every layer. The split must put each such token within 8 tokens of
    the start of its prompt (exactly at it for sequence 1)."""
    t = qwen
    pre = t.phase == Phase.PREFILL
    layers = (0, 8, 12, 18, 23)
    sig = {
        (int(s), int(p)): []
        for s, p in zip(t.seq[pre & (t.layer == 0)], t.step[pre & (t.layer == 0)], strict=True)
    }
    for i in np.flatnonzero(pre):
        sig[(int(t.seq[i]), int(t.step[i]))].append(t.expert[i].tobytes() + t.gate[i].tobytes())
    target = sig[(1, 0)]
    assert len(target) == len(layers)
    hits = sorted(key for key, value in sig.items() if value == target)
    starts = np.concatenate([[0], np.cumsum(_tokens_per_seq(t, Phase.PREFILL)[1:])])  # seqs 1..24
    where = [int(starts[s - 1] + p) for s, p in hits]
    assert len(hits) == 4 and hits[0] == (1, 0)
    assert np.abs(np.asarray(where) - starts[[0, 9, 14, 22]]).max() <= 8


@pytest.mark.parametrize(
    ("path", "fmt"),
    [
        (MIXTRAL, "mixtral-jsonl"),
        (MIXTRAL / "routing_raw.jsonl", "mixtral-jsonl"),
        (LLAMA, "sglang-json"),
        (LLAMA / "llama4-mmlu-anatomy" / "100.json", "sglang-json"),
        (DEEPSEEK, "hf-csv"),
        (DEEPSEEK / "training_data_eamc" / "prompt_1001_data.csv", "hf-csv"),
        (QWEN, "vllm-logger"),
        (QWEN / "Logs" / "moe_layer8.jsonl", "vllm-logger"),
    ],
)
def test_detect_real(path: Path, fmt: str) -> None:
    assert detect_format(_real(path)) == fmt


def test_cli_import_real_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q.parquet"
    src = _real(QWEN / "Logs" / "moe_layer23.jsonl")
    assert main(["import", str(src), "-o", str(out), "--format", "vllm-logger"]) == 0
    t = read_trace(out)
    assert set(t.layer.tolist()) == {23} and t.rows == 1_470 + 2_887
    assert "4,357 rows, 25 sequences" in capsys.readouterr().out


# ------------------------------------------------------- small hand-written sources


def _jsonl(path: Path, objs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


def _mixtral_decode(path: Path, counts: dict[int, int]) -> Path:
    """Decode-only file, one sequence, ``counts[layer]`` tokens per layer (others: 3)."""
    objs = [
        {"dataset": "d", "problem_id": 0, "layer": layer, "token_idx": i,
         "experts": [i % 8, (i + 1 + layer % 7) % 8],
         "gating_probs": [0.75, 0.25]}
        for layer in range(32) for i in range(counts.get(layer, 3))
    ]  # fmt: skip
    return _jsonl(path, objs)


def test_mixtral_truncates_to_min_layer_count(tmp_path: Path) -> None:
    t = import_source(_mixtral_decode(tmp_path / "x_routing.jsonl", {5: 2, 7: 4}))
    assert t.tokens(Phase.DECODE) == 2 and t.rows == 64
    assert "truncated to 2 decode tokens" in t.meta.provenance["repairs"]
    assert "dropped 32 rows" in t.meta.provenance["repairs"]  # 30 layers x 1 + layer 7 x 2


def _mixtral_raw(path: Path, missing: set[tuple[int, int]]) -> Path:
    """Raw forward-order file: a 3-token prefill, then 2 decode steps; ``missing`` (step, layer)."""
    objs = []

    def row(layer: int, pos: int, e: int) -> dict:
        return {"dataset": "d", "problem_id": 0, "layer": layer, "token_pos": pos,
                "experts": [e % 8, (e + 1) % 8], "gating_probs": [0.6, 0.4]}  # fmt: skip

    for layer in range(32):
        objs += [row(layer, p, layer + p) for p in range(3) if (p, layer) not in missing]
    for step in (3, 4):
        objs += [row(layer, 0, step * layer) for layer in range(32) if (step, layer) not in missing]
    return _jsonl(path, objs)


def test_mixtral_raw_exact_steps(tmp_path: Path) -> None:
    t = import_source(_mixtral_raw(tmp_path / "routing_raw.jsonl", {(1, 4), (3, 0), (4, 31)}))
    assert t.rows == 5 * 32 - 3
    assert t.tokens(Phase.PREFILL) == 3 and t.tokens(Phase.DECODE) == 2
    assert t.expert[_row(t, 0, 2, 4)].tolist() == [6, 7]  # prefill position 2, not shifted
    assert t.expert[_row(t, 0, 3, 1)].tolist() == [3, 4]  # decode step 0 lost layer 0 only
    assert t.expert[_row(t, 0, 4, 30)].tolist() == [0, 1]  # 4 * 30 = 120 -> 0
    assert "1 prefill and 2 decode (step, layer) rows absent" in t.meta.provenance["repairs"]


def _csv(path: Path, tokens: int, ids: str = "[1, 2, 3, 4, 5, 6]") -> Path:
    lines = ["Layer ID,Batch Number,Token,Activated Expert IDs"]
    lines += [f'{layer},0,tok{i},"{ids}"' for layer in range(1, 27) for i in range(tokens)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _sglang(path: Path, prompt: int, decode: int) -> Path:
    def step(n: int, base: int) -> dict:
        return {str(i): None if i % 2 == 0 else [[(base + i + j) % 128] for j in range(n)] for i in range(48)}

    path.write_text(json.dumps([step(prompt, 0)] + [step(1, 7 * d) for d in range(1, decode + 1)]))
    return path


def test_hf_csv_and_sglang_small(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    for n in (2, 10):
        _csv(tmp_path / "c" / f"prompt_{n}_data.csv", tokens=n)
    t = import_source(tmp_path / "c")
    assert t.num_seqs == 2 and t.tokens(Phase.PREFILL) == 12 and t.rows == 26 * 12
    assert "0=prompt_2_data.csv; 1=prompt_10_data.csv" == t.meta.provenance["sequences"]
    (tmp_path / "s" / "sub").mkdir(parents=True)
    _sglang(tmp_path / "s" / "sub" / "1.json", prompt=4, decode=3)
    t = import_source(tmp_path / "s")
    assert (t.tokens(Phase.PREFILL), t.tokens(Phase.DECODE), t.rows) == (4, 3, 24 * 7)
    assert int(t.expert[_row(t, 0, 2, 1)][0]) == 3 + 2  # decoder layer 3, token 2
    assert int(t.expert[_row(t, 0, 5, 23)][0]) == (14 + 47) % 128  # decode step 2, decoder layer 47


def _qwen_logs(folder: Path, layers: tuple[int, ...]) -> Path:
    """3 requests: a dummy call, request 0's 2-token prefill alone, then [req 0 decode + 3 + 4
    prompt tokens], then decode calls of 3, 3, 2 rows; prompts of 10, 30 and 40 characters."""
    (folder / "Logs").mkdir(parents=True)
    (folder / "prompts.txt").write_text("a" * 10 + "\n\n---\n\n" + "b" * 30 + "\n\n---\n\n" + "c" * 40)
    calls = [[99] * 4, [0, 1], [10, 20, 21, 22, 30, 31, 32, 33], [11, 23, 34], [12, 24, 35], [13, 25]]
    for layer in layers:
        objs: list[dict] = [{"type": "meta", "layers_logged": [layer], "top_k": 4}]
        for call in calls:
            objs += [
                {"type": "route", "req_id": "r1", "token_idx": i, "layer": layer,
                 "topk_ids": [v % 60, (v + 1) % 60, (v + 2) % 60, (v + 3) % 60],
                 "topk_weights": [0.2, 0.1, 0.05, 0.01] if v == 99 else [0.3, 0.1, 0.05, v / 1000]}
                for i, v in enumerate(call)
            ]  # fmt: skip
        _jsonl(folder / "Logs" / f"moe_layer{layer}.jsonl", objs)
    return folder


def test_vllm_logger_small(tmp_path: Path) -> None:
    t = import_source(_qwen_logs(tmp_path / "q", (0, 5)))
    assert t.num_seqs == 3 and sorted(set(t.layer.tolist())) == [0, 5]
    # (seq, step, phase, first expert) at layer 0; values encode request and token
    got = [(int(s), int(p), int(ph), int(e)) for s, p, ph, e, lay in
           zip(t.seq, t.step, t.phase, t.expert[:, 0], t.layer, strict=True) if lay == 0]  # fmt: skip
    assert got == [
        (0, 0, 0, 0), (0, 1, 0, 1), (0, 2, 1, 10), (0, 3, 1, 11), (0, 4, 1, 12), (0, 5, 1, 13),
        (1, 0, 0, 20), (1, 1, 0, 21), (1, 2, 0, 22), (1, 3, 1, 23), (1, 4, 1, 24), (1, 5, 1, 25),
        (2, 0, 0, 30), (2, 1, 0, 31), (2, 2, 0, 32), (2, 3, 0, 33), (2, 4, 1, 34), (2, 5, 1, 35),
    ]  # fmt: skip
    assert "prompts.txt" in t.meta.provenance["prefill_split"]


def test_auto_detect_each_small_format(tmp_path: Path) -> None:
    files = {
        "hf-csv": _csv(tmp_path / "a.csv", 2),
        "sglang-json": _sglang(tmp_path / "b.json", 2, 1),
        "mixtral-jsonl": _mixtral_decode(tmp_path / "c.jsonl", {}),
    }
    for fmt, path in files.items():
        assert detect_format(path) == fmt
    assert detect_format(_qwen_logs(tmp_path / "q", (3,))) == "vllm-logger"
    assert set(FORMATS) == {"mixtral-jsonl", "sglang-json", "hf-csv", "vllm-logger"}


# -------------------------------------------------------------- bad input


def test_mixed_folder_is_one_clear_error(tmp_path: Path) -> None:
    _csv(tmp_path / "a.csv", 2)
    _sglang(tmp_path / "b.json", 2, 1)
    (tmp_path / "README.txt").write_text("ignored")
    with pytest.raises(TraceError, match="mixed trace formats.*hf-csv.*sglang-json"):
        import_source(tmp_path)


@pytest.mark.parametrize(
    ("content", "name", "match"),
    [
        ("hello\n", "x.txt", "not a known trace format"),
        ("", "empty.jsonl", "not a known trace format"),
        ('Layer ID,Batch Number,Token,Activated Expert IDs\n1,0,a,"[1, 2]"\n', "p.csv", "layer-major rows"),
        ("Layer ID,Token\n", "q.csv", "not a known trace format"),
    ],
)
def test_bad_file_messages(tmp_path: Path, content: str, name: str, match: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TraceError, match=match):
        import_source(path)


def test_truncated_jsonl_names_file_and_line(tmp_path: Path) -> None:
    path = _mixtral_decode(tmp_path / "t.jsonl", {})
    text = path.read_text()
    path.write_text(text[: len(text) // 2])  # cut mid-line
    with pytest.raises(TraceError, match=r"t\.jsonl:\d+: invalid JSON.*truncated"):
        import_source(path)


def test_ragged_sglang_step(tmp_path: Path) -> None:
    path = _sglang(tmp_path / "r.json", 3, 1)
    steps = json.loads(path.read_text())
    steps[0]["5"] = steps[0]["5"][:2]  # one MoE layer with 2 tokens, the others 3
    path.write_text(json.dumps(steps))
    with pytest.raises(TraceError, match="step 0: MoE layers disagree on the token count"):
        import_source(path)


def test_wrong_id_count_and_out_of_range(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="data row 1: expected 6 expert ids, got '\\[1, 2\\]'"):
        import_source(_csv(tmp_path / "p.csv", 2, ids="[1, 2]"))
    with pytest.raises(TraceError, match="expert ids span .* 64 experts"):
        import_source(_csv(tmp_path / "p.csv", 2, ids="[1, 2, 3, 4, 5, 64]"))


def test_format_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown trace format 'nope'; known formats: mixtral-jsonl"):
        import_source(tmp_path, "nope")
    with pytest.raises(TraceError, match="no such file or folder"):
        import_source(tmp_path / "missing")
    with pytest.raises(TraceError, match="no files of a known trace format"):
        import_source(tmp_path)
    _csv(tmp_path / "a.csv", 2)
    with pytest.raises(TraceError, match="holds 'hf-csv' files, not 'sglang-json'"):
        import_source(tmp_path, "sglang-json")


def test_cli_import_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x.json").write_text("[1, 2")
    assert main(["import", str(tmp_path / "x.json"), "-o", str(tmp_path / "o.parquet")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "not a known trace format" in err[0]
    assert not (tmp_path / "o.parquet").exists()


def test_unreadable_file_with_explicit_format(tmp_path: Path) -> None:
    path = tmp_path / "blob.json"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(TraceError, match=r"blob\.json: not UTF-8 text"):
        import_source(path, "sglang-json")
