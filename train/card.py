"""The model card (``README.md`` beside the checkpoint), rendered from the training summary."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np


def _files(out: Path) -> list[str]:
    rows = ["| file | bytes | sha256 |", "|---|---:|---|"]
    total = 0
    for p in sorted(out.iterdir()):
        if p.name in ("README.md", "training.json") or not p.is_file():
            continue
        data = p.read_bytes()
        total += len(data)
        rows.append(f"| {p.name} | {len(data):,} | `{hashlib.sha256(data).hexdigest()[:16]}` |")
    rows.append(f"| **total** | **{total:,}** ({total / 2**20:.2f} MiB) | |")
    return rows


def _bpb(records: dict[str, Any]) -> list[str]:
    splits = sorted({s for r in records.values() for s in r["eval_bpb"]})
    rows = ["| model | params | steps | tokens | train s | TRAIN bpb (last record interval) | "
            + " | ".join(f"{s} bpb" for s in splits) + " |",
            "|---|---:|---:|---:|---:|---:|" + "---:|" * len(splits)]
    for kind, r in records.items():
        vals = " | ".join(f"{r['eval_bpb'].get(s, float('nan')):.4f}" for s in splits)
        last = r["train_bpb"][-1] if r["train_bpb"] else float("nan")
        rows.append(f"| {kind} | {r.get('params', '')} | {r['steps']} | {r['tokens']:,} | {r['wall_s']:.0f} | "
                    f"{last:.4f} | {vals} |")
    return rows


def _routing(moe: dict[str, Any]) -> list[str]:
    if not moe["router_norms"]:
        return []
    norms = np.asarray(moe["router_norms"])                                   # [R, L, E]
    change = np.abs(norms[-1] - norms[0]) / norms[0]
    load = np.asarray(moe["load"][-1], dtype=np.float64) if moe["load"] else None
    lines = [f"- router-row l2 norm: {norms[0].mean():.3f} at init, {norms[-1].mean():.3f} after training; "
             f"relative change per expert {change.min():.2f}-{change.max():.2f} (median {np.median(change):.2f})"]
    if load is not None:
        share = load / load.sum(axis=1, keepdims=True)
        lines.append(f"- load in the last record interval: busiest expert per layer takes "
                     f"{share.max(axis=1).mean():.3f} of routed tokens on average (uniform: {1 / share.shape[1]:.3f}); "
                     f"the least busy {share.min(axis=1).mean():.4f}")
    return lines


def rewrite(out: Path) -> Path:
    """Re-render ``out/README.md`` from ``out/training.json`` (e.g. after the card's layout changed)."""
    summary = json.loads((out / "training.json").read_text())
    path = out / "README.md"
    path.write_text(render(summary, out))
    return path


def render(summary: dict[str, Any], out: Path) -> str:
    """The card's Markdown."""
    cfg, records = summary["config"], summary["records"]
    for kind, n in summary["params"].items():
        records[kind]["params"] = f"{n:,}"
    size, c = cfg["size"], summary["corpus"]
    moe = records["moe"]
    lines = [
        "# moebits default model: a byte-level Qwen3-MoE trained on the Python standard library",
        "",
        "Trained by `moebits train fit` (package `moebits.train`); the project's own weights, so that "
        "quantization sensitivity, routing and quality are measured on a trained model.",
        "",
        "## Model",
        f"- architecture: transformers `Qwen3MoeForCausalLM`, {size['layers']} layers, all MoE: "
        f"{size['experts']} routed experts, top-{size['top_k']}, hidden {size['hidden']}, expert intermediate "
        f"{size['expert_intermediate']}, {size['heads']} query heads / {size['kv_heads']} KV head of dim "
        f"{size['head_dim']}, tied embeddings; load-balancing loss coefficient {cfg['aux_loss_coef']}",
        "- tokenizer: none: tokens are UTF-8 bytes (vocab 256), so bits per token are bits per byte; "
        "`moebits traces capture --model-dir` and the runtime use bytes when a directory has no tokenizer",
        "- weights: bf16 safetensors. Size cap: 25 MiB in files of at most 16 MB. 128 is the smallest hidden and "
        "expert intermediate size the runtime's int8/4/3 quantizers accept (groups of 128 along the input "
        "dimension), so 8 layers x 32 experts hold 25.2 MB (24.0 MiB) of expert weights alone",
        "",
        *_files(out),
        "",
        "## Data",
        f"- the standard library of Python {c['python']} (`.py` sources, their docstrings, the pydoc topics); "
        "splits by sha256 of the source name, disjoint: TRAIN, CALIBRATION (sensitivity tables, profiles), "
        "EVALUATION (traces, graded quality), each of the latter two as code and prose",
        f"- manifest `train/data/corpus_manifest.json` (sha256 {c['manifest_sha256'][:16]}...) records every "
        "source file's sha256; the built split files:",
        "",
        "| split | bytes | sha256 |",
        "|---|---:|---|",
        *[f"| {k} | {v['bytes']:,} | `{v['sha256'][:16]}` |" for k, v in sorted(c["splits"].items())],
        "",
        "## Training",
        f"- command: `{summary['command']}`",
        f"- commit: `{summary['commit']}`; seed {summary['seed']}; {summary['device']}, torch {summary['torch']}, "
        f"transformers {summary['transformers']}; experts implementation `{moe['experts_impl']}`",
        *([f"- {summary['commit_note']}"] if summary.get("commit_note") else []),
        f"- {cfg['steps'] or 'auto'} steps requested (time budget {cfg['time_budget_s']} s when auto), "
        f"{moe['steps']} run; batch {cfg['batch']} x {cfg['seq_len']} bytes; AdamW lr {cfg['lr']} "
        f"(warmup {cfg['warmup_steps']}, linear decay over the last {cfg['decay_frac']:.0%} to "
        f"{cfg['min_lr_frac']} x), weight decay {cfg['weight_decay']}, clip {cfg['grad_clip']}",
        f"- to repeat: `moebits train corpus --out data/corpus` with Python {c['python']} (another Python has "
        f"other sources: build where the manifest's version is and copy the files; their hashes are checked), then "
        f"`moebits train fit --data data/corpus --out DIR --steps {moe['steps']} --seed {summary['seed']}`. The "
        "default model's corpus was built on the CPU machine (Python 3.11.7) and carried to the GPU machine "
        "(Python 3.12), which only read the built files after checking their sha256",
        "",
        "## Held-out bits per byte (EVALUATION split, bf16)",
        "",
        "The dense model has the MoE's active size (same attention and layers, one FFN of intermediate "
        "top_k x expert intermediate) and trained the same way (same seed, data, schedule and steps).",
        "",
        *_bpb(records),
        "",
        "TRAIN bpb is the mean over the last record interval of training (random windows, training mode); the "
        "gap to the EVALUATION figures is the models' overfit to TRAIN (several epochs of a 13 MB split).",
        "",
        "## Routing recorded in training (`training.json`)",
        *_routing(moe),
        "",
    ]
    return "\n".join(lines)
