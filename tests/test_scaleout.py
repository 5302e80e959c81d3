"""Scale-out, really exercised: a small sweep on each launcher the project ships, killed part way
and run again, loses no run and runs none twice.

- joblib (extra ``sweep``): two worker processes on this machine;
- submitit's local executor (extra ``slurm``): each run a subprocess, as a Slurm array task would be;
- Ray (extra ``ray``): a Ray cluster this test starts (``ray start --head`` on 127.0.0.1; Ray
  advertises the machine's own address, as it always does) and joins through ``moebits_ray``.

"Nothing lost": every run ends with an ok outcome. "None twice": each run's app.log holds its
summary table exactly once (a run logs it just before recording its outcome, so a run counted
as done by the first sweep and run again by the second would log it twice).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from moebits.drive.ledger import read_ledger
from moebits.drive.outcome import read_outcome

RUNS = 6
WORK = ["model=olmoe_1b_7b", "workload=synth", "workload.seqs=4", "workload.decode_tokens=300", "figure=false",
        "progress=false", f"seed={','.join(str(i) for i in range(RUNS))}"]


def _sweep_cmd(out: Path, launcher: list[str]) -> list[str]:
    return [sys.executable, "-m", "moebits.sim", "-m", *WORK, *launcher, f"hydra.sweep.dir={out}"]


def _wait_for(cond: object, timeout_s: float, what: str) -> None:
    end = time.time() + timeout_s
    while time.time() < end:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def kill_and_resume(tmp_path: Path, launcher: list[str], env: dict[str, str] | None = None) -> None:
    out = tmp_path / "sweep"
    cmd = _sweep_cmd(out, launcher)
    with (tmp_path / "first.err").open("w") as err:
        first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                 start_new_session=True)
        try:
            _wait_for(lambda: first.poll() is not None or len(read_ledger(out)) >= 2, 180, "two finished runs")
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)  # the sweep and every worker it started
            first.wait()
    finished_first = {line["dir"] for line in read_ledger(out)}
    assert 2 <= len(finished_first) < RUNS, (tmp_path / "first.err").read_text()[-2000:]
    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    runs = sorted(p.parent for p in out.rglob(".hydra"))
    assert len(runs) == RUNS
    for run in runs:
        outcome = read_outcome(run)
        assert outcome is not None and outcome.status.value == "ok", run
        logged = sum(p.read_text().count("TPOT p50") for p in run.glob("*.log"))
        assert logged == 1, f"{run.name} ran {logged} times"
    reused = [line for line in read_ledger(out) if line["skipped"]]
    assert {line["dir"] for line in reused} >= finished_first  # the first sweep's runs were not run again


@pytest.mark.slow
def test_joblib_sweep_killed_and_resumed(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    kill_and_resume(tmp_path, ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"])


@pytest.mark.slow
def test_submitit_local_sweep_killed_and_resumed(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    kill_and_resume(tmp_path, ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """A one-node Ray cluster on this machine for the module's tests; its address."""
    pytest.importorskip("ray")
    pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    if ray_bin is None:
        pytest.skip("the ray command is not installed")
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix sockets live under it
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        status = [ray_bin, "status", f"--address={address}"]
        _wait_for(lambda: head.poll() is not None or subprocess.run(status, capture_output=True).returncode == 0,
                  120, "the Ray head node")
        assert head.poll() is None, "ray start exited"
        yield address
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the head and every Ray process it started
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(3)
        head.wait()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_ray_sweep_killed_and_resumed(tmp_path: Path, ray_cluster: str) -> None:
    kill_and_resume(tmp_path, ["hydra/launcher=moebits_ray", f"hydra.launcher.ray.init.address={ray_cluster}"])
