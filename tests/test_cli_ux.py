"""The command line as a new user meets it: a closed pipe, a missing optional extra, an output
name that does not match the format, one preset naming, ``synth --like`` without ``--model``,
the trace-stats reference line, the replay cache."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from moebits.core.config import model_choice_spelling
from moebits.core.model_spec import MODEL_PRESETS, find_preset
from moebits.traces.__main__ import main as traces_main
from moebits.traces.format import read_trace, write_trace
from moebits.traces.stats import compute_stats, uniform_top_share
from sim_testkit import TINY, make_trace

from moebits.cli import main as moebits_main


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_trace(make_trace(TINY, [[[[0], [1]], [[2], [3]], [[0], [2]]]]), tmp_path / "tiny.parquet")


def test_broken_pipe_is_quiet(tiny: Path) -> None:
    code = ("import sys; from moebits.cli import main; sys.exit(main(['traces', 'stats', sys.argv[1]]))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tiny)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader went away before the table was printed, as `| head -0` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_missing_extra_names_the_extra(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib

    real = importlib.import_module

    def no_torch(name: str, *a: object, **k: object) -> object:
        if name == "moebits.runtime.app":
            raise ModuleNotFoundError("No module named 'torch'", name="torch")
        return real(name, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib, "import_module", no_torch)
    assert moebits_main(["runtime"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: moebits runtime: this command needs torch, which is not installed: pip install 'moebits[gpu]'"]


def test_trace_output_must_be_parquet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.csv"
    assert traces_main(["synth", "--model", "olmoe_1b_7b", "--seqs", "1", "--steps", "2", "-o", str(out)]) == 2
    assert "a moebits trace is a Parquet file" in capsys.readouterr().err and not out.exists()


def test_one_preset_naming() -> None:
    assert find_preset("qwen3_30b_a3b") == (MODEL_PRESETS["Qwen3-30B-A3B"], None)
    spec, hint = find_preset("Qwen3-30B-A3B")
    assert spec is MODEL_PRESETS["Qwen3-30B-A3B"] and hint is not None and "qwen3_30b_a3b" in hint
    with pytest.raises(ValueError, match="known presets: qwen3_30b_a3b"):
        find_preset("gpt-5")
    args, hints = model_choice_spelling(["model=Mixtral-8x7B,olmoe_1b_7b", "policy=dynaexq", "+model=trace"])
    assert args == ["model=mixtral_8x7b,olmoe_1b_7b", "policy=dynaexq", "+model=trace"] and len(hints) == 1


def test_synth_like_takes_the_model_from_the_trace(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "like.parquet"
    assert traces_main(["synth", "--seqs", "1", "--steps", "3", "--like", str(tiny), "--fit-iterations", "1",
                        "-o", str(out)]) == 0
    assert read_trace(out).spec == read_trace(tiny).spec
    assert traces_main(["synth", "--seqs", "1", "--steps", "3", "-o", str(out)]) == 2
    assert "give --model PRESET, or --like TRACE" in capsys.readouterr().err
    assert traces_main(["synth", "--model", "OLMoE-1B-7B", "--seqs", "1", "--steps", "2", "-o", str(out)]) == 0
    assert "olmoe_1b_7b" in capsys.readouterr().err  # accepted, with the other spelling named


def test_uniform_reference_follows_the_expert_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert uniform_top_share(8) == 0.125 and uniform_top_share(128) == 13 / 128 and uniform_top_share(10) == 0.1
    from moebits.traces import cli_stats

    lines: list[float] = []
    real_save = cli_stats.save

    def spy(fig: object, path: object) -> Path:
        ax = fig.axes[0]  # type: ignore[attr-defined]
        lines.extend(float(line.get_ydata()[0]) for line in ax.get_lines())
        return real_save(fig, path)  # type: ignore[arg-type]

    monkeypatch.setattr(cli_stats, "save", spy)
    mixtral = make_trace(MODEL_PRESETS["Mixtral-8x7B"], [[[[0, 1]] * 32, [[2, 3]] * 32]])
    path = write_trace(mixtral, tmp_path / "m.parquet")
    cli_stats.plot_stats(compute_stats(read_trace(path)), tmp_path / "m.png", "m")
    assert lines == [0.125]
    assert (tmp_path / "m.pdf").exists() and (tmp_path / "m.png").exists()


def test_replay_cache_is_listed_and_pruned(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from moebits.traces.replay import load_view

    monkeypatch.setenv("MOEBITS_CACHE", str(tmp_path / "cache"))
    load_view(tiny, 1)
    load_view(tiny, 2)
    assert traces_main(["cache"]) == 0
    assert "2 entries" in capsys.readouterr().out
    assert traces_main(["cache", "--prune"]) == 0
    assert "removed 0 of 2" in capsys.readouterr().out
    os.utime(tiny, ns=(1, 1))  # the trace changed: its entries can never be used again
    assert traces_main(["cache", "--prune"]) == 0
    assert "removed 2 of 2" in capsys.readouterr().out
    load_view(tiny, 1)
    assert traces_main(["cache", "--clear"]) == 0 and "removed 1 of 1" in capsys.readouterr().out
    assert not any((tmp_path / "cache" / "replay").iterdir())


def test_extras_are_split() -> None:
    import tomllib

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    deps = extras["optional-dependencies"]
    assert deps["sweep"] == ["hydra-joblib-launcher>=1.2"]
    assert not any("ray" in d for d in deps["sweep"] + deps["slurm"])
    assert any(d.startswith("pyyaml") for d in extras["dependencies"])
    assert json.dumps(deps["cluster"]) == '["moebits[sweep,ray,slurm]"]'


def test_numbers_have_one_format() -> None:
    """The summary table and report.md print numbers alike: no exponents, thousands separated,
    whole numbers without decimals, and each policy counter once."""
    from moebits.analysis.report import _cell
    from moebits.drive.report import format_summary

    assert [_cell(v) for v in (3632.863, 70.0, 0.1234, 1234567.0)] == ["3,633", "70", "0.123", "1,234,567"]
    text = format_summary({"ttft_ms": 3632.863, "promotions": 70, "demotions": 70.0, "wall_s": 0.01234,
                           "quality_table": "synthetic(seed=3)", "policy_metrics": {"promotions": 70, "hits": 5.0}})
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in text.splitlines()[1:] if "  " in line.strip())
    assert rows["TTFT (ms, mean)"].strip() == "3,633" and rows["promotions"].strip() == "70"
    assert rows["demotions"].strip() == "70" and rows["wall (s)"].strip() == "0.01234"
    assert text.count("promotions") == 1 and "policy: hits" in text
    assert "SYNTHETIC sensitivity table" in text


README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_starts_light() -> None:
    """First command: the plain install and the main job; second: the test extras and the tests."""
    block = README.read_text().split("```bash", 1)[1].split("```", 1)[0]
    commands = [ln for ln in block.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert "pip install -e . &&" in commands[0] and commands[0].endswith("moebits sim")
    assert "cluster" not in commands[0] and "gpu" not in commands[0]
    assert "pip install -e '.[test]'" in commands[1] and "pytest" in commands[1]


def test_readme_dynaexq_example_promotes(tmp_path: Path) -> None:
    """The README's dynaexq example leaves room above the int4 floor: it promotes experts."""
    line = next(ln for ln in README.read_text().splitlines() if "`moebits sim policy=dynaexq" in ln)
    overrides = line.split("`moebits sim ", 1)[1].split("`", 1)[0].split()
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run([sys.executable, "-m", "moebits.sim", *overrides, "workload.max_seqs=1", "progress=false",
                           "figure=false", f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["promotions"] > 0 and summary["activations"]["bf16"] > 0
