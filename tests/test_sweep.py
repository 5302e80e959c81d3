"""Sweeps a researcher can trust (drive/sweep.py and its modules, through ``moebits sim -m``): outcomes ok /
infeasible / failed, a tally and exit status 3 on failures, infeasible runs never retried, resume
keyed on the fully composed config, one progress bar instead of per-run output, one-line typos."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from moebits.drive import footprint
from moebits.drive.ledger import Tally, read_ledger
from moebits.drive.outcome import Outcome, Status, config_hash
from moebits.drive.overrides import covering, first_of_sweep, launcher_hint, sweep_size
from moebits.drive.sweeper import lean_basic_sweeper
from moebits.traces.format import write_trace
from omegaconf import OmegaConf
from sim_testkit import TINY, make_trace

SMALL = ["model=olmoe_1b_7b", "workload=synth", "workload.seqs=1", "workload.prompt_tokens=2", "workload.decode_tokens=3",
         "progress=false", "figure=false"]


def sim(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run([sys.executable, "-m", "moebits.sim", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def outcomes(sweep: Path) -> dict[str, str]:
    return {str(p.parent.relative_to(sweep)): json.loads(p.read_text())["status"] for p in sweep.rglob("outcome.json")}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """static_uniform at int4 (fits all_int4) and at bf16 (does not: infeasible), and a
    trace file that does not exist (failed)."""
    tmp = tmp_path_factory.mktemp("sweep")
    good = write_trace(make_trace(TINY, [[[[0], [1]], [[2], [3]]]]), tmp / "tiny.parquet")
    out = tmp / "mixed"
    proc = sim("-m", "model=trace", "workload=file", f"workload.path={good},{tmp / 'missing.parquet'}",
               "policy=static_uniform", "policy.precision=int4,bf16", "budget=all_int4", "progress=false",
               "figure=false", f"hydra.sweep.dir={out}", cwd=tmp)
    return out, proc


def test_sweep_tallies_and_fails_loudly(mixed: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, proc = mixed
    assert proc.returncode == 3, proc.stderr
    assert "4 runs: 1 ok, 1 infeasible, 2 failed" in proc.stderr
    assert "failed: " in proc.stderr and "missing.parquet" in proc.stderr
    assert sorted(outcomes(out).values()) == ["failed", "failed", "infeasible", "ok"]
    assert "TPOT" not in proc.stdout + proc.stderr  # the runs' tables went to their app.log, not the console
    ok_dir = next(p.parent for p in out.rglob("outcome.json") if json.loads(p.read_text())["status"] == "ok")
    assert any("TPOT" in p.read_text() for p in ok_dir.glob("*.log"))


def test_rerun_skips_ok_and_infeasible_retries_failed(mixed: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, _ = mixed
    tmp = out.parent
    before = len(read_ledger(out))
    proc = sim("-m", "model=trace", "workload=file", f"workload.path={tmp / 'tiny.parquet'},{tmp / 'missing.parquet'}",
               "policy=static_uniform", "policy.precision=int4,bf16", "budget=all_int4", "progress=false",
               "figure=false", f"hydra.sweep.dir={out}", cwd=tmp)
    assert proc.returncode == 3
    lines = read_ledger(out)[before:]
    assert sorted((line["status"], line["skipped"]) for line in lines) == [
        ("failed", False), ("failed", False), ("infeasible", True), ("ok", True)]
    assert "(2 reused from an earlier run of the same config, 2 of them without composing it)" in proc.stderr


def test_resume_is_keyed_on_the_composed_config(tmp_path: Path) -> None:
    """A changed setting that leaves the run's folder name alone (as an edited preset does)
    re-runs; the same config again is reused."""
    out = tmp_path / "s"
    keep_name = "hydra.job.config.override_dirname.exclude_keys=[policy.alpha,progress,figure]"
    args = [*SMALL, "policy=dynaexq", "budget=all_int8", keep_name, f"hydra.sweep.dir={out}"]
    assert sim("-m", *args, cwd=tmp_path).returncode == 0
    assert sim("-m", *args, "policy.alpha=0.5", cwd=tmp_path).returncode == 0
    again = sim("-m", *args, "policy.alpha=0.5", cwd=tmp_path)
    assert again.returncode == 0
    assert [line["skipped"] for line in read_ledger(out)] == [False, False, True]
    summary = json.loads(next(out.rglob("summary.json")).read_text())
    assert summary["policy_config"]["alpha"] == 0.5


def test_each_sweep_gets_its_own_folder(tmp_path: Path) -> None:
    a = sim("-m", *SMALL, "seed=0", cwd=tmp_path)
    b = sim("-m", *SMALL, "seed=1", cwd=tmp_path)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    folders = sorted((tmp_path / "multirun").iterdir())  # multirun/<date>_<time>, seconds apart
    assert len(folders) == 2 and [len(outcomes(f)) for f in folders] == [1, 1]


def test_typo_in_a_sweep_is_one_line(tmp_path: Path) -> None:
    proc = sim("-m", "polcy.alpha=1,2", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: Could not override 'polcy.alpha'.: Key 'polcy' not in 'RunConfig'"]


def test_helpers() -> None:
    assert sweep_size(["a=1,2", "b=x,y,z", "c=3"]) == 6
    assert first_of_sweep(["a=1,2", "b=x", "+c=[1,2]"]) == ["a=1", "b=x", "+c=[1,2]"]
    base = {"policy": {"alpha": 1.0}, "seed": 0, "progress": True}
    assert config_hash(base) == config_hash({**base, "progress": False})  # display switches don't count
    assert config_hash(base) != config_hash({**base, "policy": {"alpha": 0.5}})
    t = Tally.of([{"dir": "a", "status": "failed", "reason": "x"}, {"dir": "a", "status": "ok", "skipped": False},
                  {"dir": "b", "status": "infeasible", "skipped": True}])
    assert (t.ok, t.infeasible, t.failed, t.skipped) == (1, 1, 0, 1)
    jobs = [[f"a={a}", f"b={b}"] for a in (1, 2, 3) for b in "xy"]
    assert covering(jobs) == [["a=1", "b=x"], ["a=1", "b=y"], ["a=2", "b=x"], ["a=3", "b=x"]]
    hydra_says = "In 'experiment/seed_policies': Could not find 'hydra/launcher/joblib'"
    assert launcher_hint(hydra_says) == "the joblib launcher is not installed: pip install 'moebits[sweep]'"
    assert launcher_hint("Could not find 'hydra/launcher/submitit_slurm'").endswith("'moebits[slurm]'")
    assert Outcome.from_dict(json.loads(Outcome(Status.INFEASIBLE, "r", "h").to_json())) == Outcome(Status.INFEASIBLE, "r", "h")


def test_lean_sweeper_composes_a_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """hydra's basic sweeper (as its plugin registry loads it) validates only the sample inside
    lean_basic_sweeper(), and every job again outside it."""
    from hydra.core.plugins import Plugins
    from hydra.plugins.sweeper import Sweeper

    basic = next(c for c in Plugins.instance().discover(Sweeper) if c.__name__ == "BasicSweeper")
    seen: list[int] = []
    monkeypatch.setattr(Sweeper, "validate_batch_is_legal", lambda self, batch: seen.append(len(batch)))
    jobs = [[f"a={a}", f"b={b}"] for a in range(5) for b in range(11)]
    sweeper = basic.__new__(basic)
    sweeper.config = OmegaConf.create({"resume": False})
    with lean_basic_sweeper():
        sweeper.validate_batch_is_legal(jobs)
    sweeper.validate_batch_is_legal(jobs)
    assert seen == [15, 55]


def test_budget_refusals_are_infeasible() -> None:
    """A policy that cannot fit its budget says so with InfeasibleError (recorded, never retried
    by a sweep), never with a plain ValueError (a failure, retried on every resume)."""
    import ast

    root = Path(__file__).resolve().parents[1]
    bad = []
    for path in sorted([*(root / "policies").glob("*.py"), *(root / "sim").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and \
                    isinstance(node.exc.func, ast.Name) and node.exc.func.id == "ValueError":
                text = "".join(c.value for c in ast.walk(node.exc) if isinstance(c, ast.Constant) and isinstance(c.value, str))
                if "raise budget_gb" in text:
                    bad.append(f"{path.name}:{node.lineno}")
    assert not bad, f"budget refusals raised as ValueError: {bad}"


def test_resumed_jobs_are_not_even_launched(tmp_path: Path) -> None:
    """A finished sweep run again skips its jobs before hydra composes them (one is launched,
    a launcher never gets an empty batch), also when an environment variable that no config
    reads changes."""
    out = tmp_path / "s"
    args = ["-m", *SMALL, "seed=0,1,2", f"hydra.sweep.dir={out}"]
    assert sim(*args, cwd=tmp_path).returncode == 0
    again = sim(*args, cwd=tmp_path)
    assert again.returncode == 0 and "3 runs: 3 ok, 0 infeasible, 0 failed (3 reused" in again.stderr
    assert "2 of them without composing it" in again.stderr
    launched = [p for p in out.rglob("*.log") if "skip " in p.read_text()]
    assert len(launched) == 1
    env = {**os.environ, "MOEBITS_SOMETHING": "changed"}
    env.pop("HYDRA_FULL_ERROR", None)
    third = subprocess.run([sys.executable, "-m", "moebits.sim", *args], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300, env=env)
    assert third.returncode == 0 and "(3 reused from an earlier run of the same config, 2 of them" in third.stderr


def _invocation(out: Path, before: int) -> dict[str, tuple[bool, bool]]:
    """Each run of the sweep invocation that appended ledger lines from ``before`` on: (reused,
    launched), by its ``tq`` preset and seed."""
    return {",".join(part for part in line["dir"].split(",") if part.startswith(("+tq=", "seed="))):
            (line["skipped"], line["launched"]) for line in read_ledger(out)[before:]}


def test_resume_composes_only_jobs_whose_inputs_changed(tmp_path: Path) -> None:
    """After an edit of a config file, a resumed sweep composes only the jobs made of it: a job
    whose composed config changed runs again, one whose config is the same (a comment) is reused
    after composing, every other job is reused without composing."""
    extra = tmp_path / "extra" / "tq"
    extra.mkdir(parents=True)
    for name in "ab":
        (extra / f"{name}.yaml").write_text("# @package _global_\nworkload:\n  decode_tokens: 3\n")
    out = tmp_path / "s"
    small = [a for a in SMALL if not a.startswith("workload.decode_tokens=")]  # the tq presets set it
    args = ["-m", "--config-dir", str(extra.parent), *small, "+tq=a,b", "seed=0,1", f"hydra.sweep.dir={out}"]
    assert sim(*args, cwd=tmp_path).returncode == 0
    fp = json.loads(next(out.rglob("outcome.json")).read_text())["footprint"]["inputs"]
    assert "file:sim/config.py" in fp and "file:conf/workload/synth.yaml" in fp
    assert any(i.startswith("file:/") and i.endswith("/tq/a.yaml") or i.endswith("/tq/b.yaml") for i in fp)
    assert "file:sim/engine.py" not in fp and "file:policies/dynaexq.py" not in fp  # not what configs are made of

    def edit_and_resume(preset: str, text: str) -> list[tuple[str, tuple[bool, bool]]]:
        """Rewrite ``preset``.yaml, resume the sweep; (job, (reused, launched)) of that resume, sorted."""
        (extra / f"{preset}.yaml").write_text("# @package _global_\n" + text)
        before = len(read_ledger(out))
        assert sim(*args, cwd=tmp_path).returncode == 0
        return sorted(_invocation(out, before).items())

    assert edit_and_resume("a", "workload:\n  decode_tokens: 4\n") == [
        ("+tq=a,seed=0", (False, True)), ("+tq=a,seed=1", (False, True)),
        ("+tq=b,seed=0", (True, False)), ("+tq=b,seed=1", (True, False))]
    rerun = next(p for p in out.iterdir() if {"+tq=a", "seed=0"} <= set(p.name.split(",")))
    assert "decode_tokens: 4" in (rerun / ".hydra" / "config.yaml").read_text()

    assert edit_and_resume("b", "# a comment\nworkload:\n  decode_tokens: 3\n") == [
        ("+tq=a,seed=0", (True, False)), ("+tq=a,seed=1", (True, False)),
        ("+tq=b,seed=0", (True, True)), ("+tq=b,seed=1", (True, True))]

    before = len(read_ledger(out))  # the composed jobs recorded their new footprint
    assert sim(*args, cwd=tmp_path).returncode == 0
    assert sorted(launched for _, launched in _invocation(out, before).values()) == [False, False, False, True]


def test_footprint_pieces(tmp_path: Path) -> None:
    """What a footprint lists (a policy's module and what it imports, not the simulator; config
    files present or absent in every file source; interpolated variables), and its digest
    following a file's content."""
    code = {str(p.relative_to(footprint.REPO)) for p in footprint.code_files(["moebits.policies.dynaexq"])}
    assert {"policies/dynaexq.py", "policies/base.py", "core/precision.py", "policies/__init__.py"} <= code
    assert not {"sim/engine.py", "policies/lru_offload.py", "drive/app.py"} & code
    sources = [("pkg", "hydra.conf"), ("file", str(tmp_path / "a")), ("structured", ""), ("file", str(tmp_path / "b"))]
    assert footprint.conf_files(["policy/x", ""], sources) == [tmp_path / "a/policy/x.yaml", tmp_path / "b/policy/x.yaml"]
    groups = ["policy", "tq"]  # a defaults list is shared by jobs whose group overrides agree
    assert [footprint.group_override(o, groups) for o in ["seed=1", "policy.alpha=2", "+tq=a", "~x", "policy@p=y"]] == [
        False, False, True, True, True]
    assert footprint.env_names('{"p": "${oc.env:MOEBITS_TRACES,x}/t", "q": "${oc.env: HOME}"}', []) == {"MOEBITS_TRACES", "HOME"}
    f = tmp_path / "a.yaml"
    f.write_text("x: 1\n")
    fp = footprint.footprint("k", [f, tmp_path / "absent.yaml"], [], ["MOEBITS_NOT_SET_ANYWHERE"])
    assert f"file:{f}" in fp.inputs and "env:MOEBITS_NOT_SET_ANYWHERE" in fp.inputs and "dist:hydra-core" in fp.inputs
    assert footprint.Digests().unchanged(fp)
    f.write_text("x: 2\n")
    assert not footprint.Digests().unchanged(fp)
    f.write_text("x: 1\n")
    (tmp_path / "absent.yaml").write_text("")  # a file that would shadow another one now exists
    assert not footprint.Digests().unchanged(fp)
    assert Outcome.from_dict(json.loads(Outcome(Status.OK, "", "h", fp).to_json())) == Outcome(Status.OK, "", "h", fp)
