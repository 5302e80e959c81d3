"""moebits.train: the stdlib corpus (splits, hashes, clear errors) and a smoke training run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from moebits.train import corpus

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from moebits.runtime.hf import set_experts_implementation  # noqa: E402
from moebits.train.fit import FitRequest, fit  # noqa: E402
from moebits.train.loop import SMOKE_TRAIN, TrainConfig, Windows, lr_at, train  # noqa: E402
from moebits.train.model import SMOKE, build, moe_config  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(corpus dir, its manifest), recorded from this Python (CI may run another version)."""
    root = tmp_path_factory.mktemp("corpus")
    manifest = root / "manifest.json"
    corpus.build(root / "data", manifest, new_manifest=True)
    return root / "data", manifest


def test_split_rule_is_stable_and_covers_all_splits() -> None:
    names = [f"pkg/mod{i}.py" for i in range(400)]
    splits = [corpus.split_of(n) for n in names]
    assert splits == [corpus.split_of(n) for n in names]
    share = {s: splits.count(s) / len(splits) for s in corpus.SPLITS}
    assert 0.9 < share["train"] < 0.97 and share["evaluation"] > 0.01 and share["calibration"] > 0.01


def test_splits_are_disjoint_by_source() -> None:
    docs = [corpus.Document(f"m{i}.py", k, f"{k} of m{i}".encode()) for i in range(300) for k in corpus.KINDS]
    built = corpus.assemble(docs)
    where: dict[str, set[str]] = {}
    for name, data in built.items():
        for text in data.split(corpus.SEP)[:-1]:
            where.setdefault(text.decode().split(" of ")[1], set()).add(name.split("_")[0])
    assert all(len(s) == 1 for s in where.values())
    assert b"prose" not in built["evaluation_code"] and b"code" not in built["evaluation_prose"]


def test_built_splits_match_the_manifest_and_tampering_is_named(built: tuple[Path, Path], tmp_path: Path) -> None:
    data_dir, manifest_path = built
    manifest = json.loads(manifest_path.read_text())
    for name, s in manifest["splits"].items():
        assert len(corpus.load(data_dir, name, manifest_path)) == s["bytes"]
    rel = sorted(manifest["sources"])[0]
    manifest["sources"][rel] = "0" * 64
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(manifest))
    with pytest.raises(corpus.CorpusError, match=rf"{rel}: sha256 .* Python"):
        corpus.build(tmp_path / "out", bad)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "evaluation_code.bin").write_bytes(b"not the corpus")
    with pytest.raises(corpus.CorpusError, match="sha256 differs"):
        corpus.load(tmp_path / "eval", "evaluation_code", manifest_path)
    with pytest.raises(corpus.CorpusError, match="not built"):
        corpus.load(tmp_path / "nowhere", "train", manifest_path)


def test_docstrings_are_extracted_and_cleaned() -> None:
    src = b'"""Module doc."""\n\ndef f():\n    """Line one.\n\n    Indented two.\n    """\n'
    assert corpus.docstrings(src) == b"Module doc.\n\nLine one.\n\nIndented two."
    assert corpus.docstrings(b"def (") == b""


def test_lr_schedule_warms_up_holds_and_decays() -> None:
    cfg = TrainConfig(lr=1.0, warmup_steps=10, decay_frac=0.2, min_lr_frac=0.1)
    assert lr_at(0, 100, cfg) == pytest.approx(0.1) and lr_at(9, 100, cfg) == 1.0
    assert lr_at(50, 100, cfg) == 1.0 and lr_at(79, 100, cfg) == 1.0
    assert lr_at(90, 100, cfg) == pytest.approx(0.55) and lr_at(99, 100, cfg) < 0.15
    assert lr_at(50, 100, cfg) == lr_at(50, 10**9, cfg)  # the stable part does not depend on the total


def test_windows_are_seeded() -> None:
    data = np.arange(1000, dtype=np.uint8)
    a, b = Windows(data, 16, 3, seed=5), Windows(data, 16, 3, seed=5)
    assert torch.equal(a.next(), b.next()) and a.next().shape == (3, 17)


def test_training_is_deterministic_from_the_seed() -> None:
    data = np.frombuffer(b"def f(x):\n    return x + 1\n" * 200, dtype=np.uint8)
    cfg = SMOKE_TRAIN

    def run() -> list:
        model = build(moe_config(SMOKE, cfg.aux_loss_coef), seed=3)
        set_experts_implementation(model, "eager")
        train(model, data, cfg, torch.device("cpu"), "moe", steps=3, progress=False)
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(x, y) for x, y in zip(run(), run(), strict=True))


def test_smoke_fit_writes_checkpoint_record_and_card(built: tuple[Path, Path], tmp_path: Path) -> None:
    data_dir, manifest = built
    out = tmp_path / "model"
    summary = fit(FitRequest(data_dir=data_dir, out_dir=out, cfg=SMOKE_TRAIN, device="cpu", command="test",
                             commit="abc", progress=False, manifest=manifest))
    moe, dense = summary["records"]["moe"], summary["records"]["dense"]
    assert moe["steps"] == dense["steps"] == SMOKE_TRAIN.steps
    norms = np.asarray(moe["router_norms"])                 # [R, L, E]: init + every record_every steps
    assert norms.shape == (1 + SMOKE_TRAIN.steps // SMOKE_TRAIN.record_every, SMOKE.layers, SMOKE.experts)
    assert not np.allclose(norms[0], norms[-1])               # the routers trained
    load = np.asarray(moe["load"])                            # [R - 1, L, E]
    per_interval = SMOKE_TRAIN.record_every * SMOKE_TRAIN.batch * SMOKE_TRAIN.seq_len * SMOKE.top_k
    assert (load.sum(axis=2) == per_interval).all()
    for r in (moe, dense):
        assert set(r["eval_bpb"]) == {"evaluation_code", "evaluation_prose"}
        assert all(0 < v < 8.5 for v in r["eval_bpb"].values())
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    card = (out / "README.md").read_text()
    for needed in ("Qwen3MoeForCausalLM", "abc", "seed 0", "evaluation_code", "dense", "sha256", "vocab 256"):
        assert needed in card
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert loaded.config.num_experts == SMOKE.experts and loaded.config.vocab_size == 256


def test_the_embedded_default_model_fits_the_caps_and_is_trained(built: tuple[Path, Path]) -> None:
    from moebits.train.loop import bits_per_byte
    from moebits.train.model import DEFAULT_DIR
    from transformers import AutoModelForCausalLM

    files = [p for p in DEFAULT_DIR.iterdir() if p.name not in ("README.md", "training.json")]
    assert all(p.stat().st_size <= 16 * 10**6 for p in DEFAULT_DIR.iterdir())
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_DIR, local_files_only=True, dtype=torch.float32)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok) == (8, 32, 4)
    data_dir, manifest = built
    prose = corpus.load(data_dir, "evaluation_prose", manifest)
    assert bits_per_byte(model, prose, 256, 8, torch.device("cpu"), max_bytes=4096) < 2.0  # random init: ~8
