"""``moebits analysis report`` on a tiny sweep made here (2 policies x 2 budgets, one of them
infeasible), and the reuse-distance statistics against a brute-force LRU."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from moebits.analysis.figures import pareto_mask
from moebits.analysis.report import write_report
from moebits.analysis.runs import collect_runs
from moebits.analysis.tracestats import stack_distances
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("quality_vs_budget", "pareto_latency_quality", "latency_vs_budget", "stall_share", "pcie_bytes_per_token",
           "precision_mix")  # oracle_gap: only when an oracle ran


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """lru_offload and dynaexq x budgets all_int2 and bf16_50pct on a small OLMoE synthetic
    workload; dynaexq (int4 floor) cannot fit all_int2, so that run is infeasible."""
    tmp = tmp_path_factory.mktemp("analysis")
    out = tmp / "sweep"
    proc = _run("-m", "moebits.sim", "-m", "model=olmoe_1b_7b", "workload=synth", "workload.seqs=2", "workload.prompt_tokens=4",
                "workload.decode_tokens=6", "policy=lru_offload,dynaexq", "budget=all_int2,bf16_50pct",
                "progress=false", "figure=false", f"hydra.sweep.dir={out}", cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    return out


def test_run_table_has_one_row_per_run(sweep: Path) -> None:
    df = collect_runs(sweep)
    assert len(df) == 4
    assert sorted(df["status"]) == ["infeasible", "ok", "ok", "ok"]
    for col in ("policy", "budget", "trace", "hardware", "quality_proxy", "latency_ms", "latency_kind", "stall_share",
                "h2d_bytes_per_token", "tokens", "budget_gb", "budget_kind", "activations.bf16", "error", "run_dir"):
        assert col in df.columns, col
    bad = df[df["status"] == "infeasible"].iloc[0]
    assert (bad["policy"], bad["budget"]) == ("dynaexq", "all_int2") and "int4" in bad["error"]
    ok = df[df["status"] == "ok"]
    assert (ok["tokens"] == 2 * (4 + 6)).all() and (ok["latency_kind"] == "tpot").all()
    assert ok["latency_ms"].notna().all() and (ok["budget_kind"] == ok["budget"]).all()
    lru = ok[ok["policy"] == "lru_offload"].sort_values("budget_gb")
    assert lru["h2d_bytes_per_token"].iloc[0] >= lru["h2d_bytes_per_token"].iloc[1]  # more budget, less traffic


def test_report_writes_tables_figures_and_lists_the_failure(sweep: Path, tmp_path: Path) -> None:
    report = write_report(sweep, tmp_path / "rep", progress=False)
    out = report.parent
    runs = pd.read_parquet(out / "runs.parquet")
    assert len(runs) == 4 and len(pd.read_csv(out / "runs.csv")) == 4
    for name in FIGURES:
        png, pdf = out / f"{name}.png", out / f"{name}.pdf"
        assert png.read_bytes()[:4] == b"\x89PNG" and pdf.read_bytes()[:5] == b"%PDF-", name
        with Image.open(png) as im:
            assert im.info["dpi"] == pytest.approx((300, 300), abs=0.5), name
    assert not (out / "oracle_gap.png").exists()  # no oracle ran: no empty panel
    text = report.read_text()
    assert "## Infeasible, failed or unfinished runs (1)" in text and "| infeasible |" in text
    assert "No oracle run finished" in text and "SYNTHETIC" in text
    assert all(f"({name}.png)" in text for name in FIGURES)


def test_cli_bad_dir_is_one_line(tmp_path: Path) -> None:
    proc = _run("-m", "moebits.analysis", "report", str(tmp_path / "nope"), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: no such directory "
                                                "(give the sweep's directory, e.g. multirun/seed_policies)"]
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _run("-m", "moebits.analysis", "report", str(empty), cwd=tmp_path)
    assert proc.returncode == 2 and "no runs found" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def _lru_hits(keys: list[int], capacity: int) -> list[bool]:
    cache: OrderedDict[int, None] = OrderedDict()
    hits = []
    for k in keys:
        hits.append(k in cache)
        cache[k] = None
        cache.move_to_end(k)
        if len(cache) > capacity:
            cache.popitem(last=False)
    return hits


def test_stack_distance_predicts_lru_hits() -> None:
    rng = np.random.default_rng(3)
    keys = rng.zipf(1.3, size=3000) % 50
    dist = stack_distances(keys)
    assert (dist[np.unique(keys, return_index=True)[1]] == -1).all()  # first touches are cold
    for cap in (1, 5, 20):
        predicted = (dist >= 0) & (dist < cap)
        assert predicted.tolist() == _lru_hits(keys.tolist(), cap)
    assert stack_distances(np.array([1, 2, 3, 1, 1, 2])).tolist() == [-1, -1, -1, 2, 0, 2]


def test_pareto_mask() -> None:
    x, y = np.array([1.0, 2.0, 2.0, 3.0]), np.array([3.0, 1.0, 2.0, 1.0])
    assert pareto_mask(x, y).tolist() == [True, True, False, False]


@pytest.fixture(scope="module")
def budget_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """lru_offload and dynaexq at budget_gb=8,16 on Qwen3-30B-A3B (dynaexq's int4 floor is 15.4
    GB: infeasible at 8), plus a run that was interrupted (only its .hydra/)."""
    tmp = tmp_path_factory.mktemp("budgets")
    out = tmp / "sweep"
    proc = _run("-m", "moebits.sim", "-m", "workload=synth", "workload.seqs=1", "workload.prompt_tokens=2",
                "workload.decode_tokens=4", "policy=lru_offload,dynaexq", "budget_gb=8,16", "progress=false",
                "figure=false", f"hydra.sweep.dir={out}", cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    lru8 = next(out.glob("budget_gb=8,policy=lru_offload*"))
    (out / "interrupted" / ".hydra").mkdir(parents=True)
    for f in (lru8 / ".hydra").iterdir():
        (out / "interrupted" / ".hydra" / f.name).write_bytes(f.read_bytes())
    return out


def test_budget_gb_sweep_keeps_every_budget(budget_sweep: Path, tmp_path: Path) -> None:
    """Each budget_gb is its own column, failed and interrupted runs are placed and reported."""
    df = collect_runs(budget_sweep)
    assert sorted(df["budget"]) == ["16 GB", "16 GB", "8 GB", "8 GB", "8 GB"]
    assert df["budget_gb"].dtype.kind == "f" and sorted(df["budget_gb"]) == [8, 8, 8, 16, 16]
    assert sorted(df["status"]) == ["infeasible", "ok", "ok", "ok", "unfinished"]
    assert "config.budget_gb" in df and "config.seed" not in df  # varied config fields only
    report = write_report(budget_sweep, tmp_path / "rep", progress=False).read_text()
    assert "| lru_offload | " in report and "| policy | 8 GB | 16 GB |" in report
    assert "| infeasible |" in report and "| unfinished |" in report and "dynaexq keeps every expert" in report


def test_figures_use_the_paper_style(sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every text of every report figure is >= 8 pt; no figure is wider than a page."""
    from moebits.analysis import figures
    from moebits.core import plotstyle

    seen: list[tuple[str, float, float]] = []

    def check(fig: object, path: object) -> Path:
        sizes = [t.get_fontsize() for t in fig.findobj(lambda a: hasattr(a, "get_fontsize") and a.get_text())]  # type: ignore[attr-defined]
        seen.append((str(path), min(sizes), fig.get_figwidth()))  # type: ignore[attr-defined]
        return plotstyle.save(fig, path)  # type: ignore[arg-type]

    monkeypatch.setattr(figures, "save", check)
    write_report(sweep, tmp_path / "rep", progress=False)
    assert len(seen) == len(FIGURES)
    for path, smallest, width in seen:
        assert smallest >= plotstyle.FONT_PT and width <= plotstyle.PAGE_IN, (path, smallest, width)


def test_policy_styles_are_distinct() -> None:
    from moebits.core.plotstyle import POLICY_ORDER, policy_style

    styles = policy_style(list(POLICY_ORDER))
    assert len({(s["color"], s["marker"]) for s in styles.values()}) == len(POLICY_ORDER)
    assert len({s["marker"] for s in styles.values()}) == len(POLICY_ORDER)
    for a, b in (("lru_offload", "lfu_offload"), ("static_uniform", "static_frequency")):
        assert styles[a]["color"] != styles[b]["color"] and styles[a]["marker"] != styles[b]["marker"]
    variants = policy_style(["dynaexq", "dynaexq alpha=0.5"])
    assert variants["dynaexq"]["color"] != variants["dynaexq alpha=0.5"]["color"]
