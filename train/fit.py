"""``moebits train fit``: train the MoE and its dense twin, evaluate both, write the checkpoint.

The MoE and the dense model of the same active size (:mod:`train.model`) train the same way:
same seed, windows, schedule and number of steps (the MoE's; fixed by time when ``steps`` is
0). Both are evaluated in bf16 (what ships) on the EVALUATION split's code and prose. The MoE
is saved in bf16 with ``save_pretrained`` (safetensors shards of at most 14 MB), beside
``training.json`` (the training record: router norms through training, load per expert,
bits per byte) and ``README.md`` (the model card, :mod:`train.card`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from moebits.runtime.hf import set_experts_implementation
from moebits.train import card, corpus
from moebits.train.loop import TrainConfig, TrainRecord, bits_per_byte, pick_experts_impl, train
from moebits.train.model import build, dense_config, moe_config, param_count

SHARD = "14MB"
EVAL_SPLITS = ("evaluation_code", "evaluation_prose")


@dataclass(frozen=True)
class FitRequest:
    """One ``moebits train fit`` call."""

    data_dir: Path
    out_dir: Path
    cfg: TrainConfig
    device: str = "auto"
    dense: bool = True
    command: str = ""
    commit: str = "unknown"
    progress: bool = True
    manifest: Path = corpus.MANIFEST


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device here")
    return torch.device(name)


def evaluate(model: Any, splits: dict[str, Any], cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """bits per byte of the bf16 model on each evaluation split."""
    model.to(device=device, dtype=torch.bfloat16)
    return {name: round(bits_per_byte(model, data, cfg.seq_len, cfg.batch, device, cfg.eval_bytes), 4)
            for name, data in splits.items()}


def fit(req: FitRequest) -> dict[str, Any]:
    """Run a request; returns the training summary also written to ``training.json``."""
    device = pick_device(req.device)
    cfg = req.cfg
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    data = corpus.load(req.data_dir, "train", req.manifest)
    evals = {s: corpus.load(req.data_dir, s, req.manifest) for s in EVAL_SPLITS}
    impl, timings = cfg.experts_impl, dict[str, float]()
    if impl == "auto":
        impl, timings = pick_experts_impl(lambda: build(moe_config(cfg.size, cfg.aux_loss_coef), cfg.seed),
                                          data, cfg, device)
    moe = build(moe_config(cfg.size, cfg.aux_loss_coef), cfg.seed)
    set_experts_implementation(moe, impl)
    rec = train(moe, data, cfg, device, "moe", progress=req.progress)
    rec.eval_bpb = evaluate(moe, evals, cfg, device)
    records = {"moe": rec}
    params = {"moe": param_count(moe)}
    save_weights(moe, req.out_dir)
    summary = save_record(records, params, timings, req, device)  # the MoE is safe before the dense run
    if req.dense:
        dense = build(dense_config(cfg.size), cfg.seed)
        drec = train(dense, data, cfg, device, "dense", steps=rec.steps, progress=req.progress)
        drec.eval_bpb = evaluate(dense, evals, cfg, device)
        records["dense"], params["dense"] = drec, param_count(dense)
        summary = save_record(records, params, timings, req, device)
    return summary


def save_weights(moe: Any, out: Path) -> None:
    """The MoE checkpoint in bf16: ``config.json`` and safetensors shards."""
    out.mkdir(parents=True, exist_ok=True)
    moe.config.use_cache = True
    moe.to(dtype=torch.bfloat16).save_pretrained(out, max_shard_size=SHARD)
    gen = out / "generation_config.json"
    if gen.exists():
        gen.unlink()  # byte model: no generation defaults to ship


def save_record(records: dict[str, TrainRecord], params: dict[str, int], timings: dict[str, float],
                req: FitRequest, device: torch.device) -> dict[str, Any]:
    """Write ``training.json`` and the card into ``req.out_dir``."""
    out = req.out_dir
    manifest = corpus.read_manifest(req.manifest)
    summary = {
        "command": req.command, "commit": req.commit, "seed": req.cfg.seed,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": _transformers_version(),
        "written_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": _jsonable(asdict(req.cfg)), "params": params, "experts_impl_timings_s": timings,
        "corpus": {"python": manifest["python"], "splits": manifest["splits"],
                   "manifest_sha256": corpus.sha256(req.manifest.read_bytes())},
        "records": {k: asdict(r) for k, r in records.items()},
    }
    (out / "training.json").write_text(json.dumps(summary) + "\n")
    (out / "README.md").write_text(card.render(summary, out))
    return summary


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=str))
