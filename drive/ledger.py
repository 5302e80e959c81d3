"""A sweep's ledger (``<sweep dir>/.ledger.jsonl``) and its tally.

Each finished job appends one line where it ran (its folder, status, reason, whether it was
reused and whether it was launched at all): jobs in worker processes, Ray tasks or Slurm arrays
all append to the same file, and the main process reads it back for its progress bar and its
final :class:`Tally` (:mod:`.sweep`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moebits.drive.outcome import Outcome, Status

LEDGER_FILE = ".ledger.jsonl"


def append_ledger(sweep_dir: Path, run_dir: Path, outcome: Outcome, skipped: bool, launched: bool = True) -> None:
    """Append the job's line to the sweep's ledger (one ``write`` of one short line: atomic in
    append mode on a local or shared POSIX filesystem). ``launched`` false: the sweeper reused
    the run without launching (or composing) it."""
    try:
        rel = str(Path(run_dir).resolve().relative_to(Path(sweep_dir).resolve()))
    except ValueError:
        rel = str(run_dir)
    line = json.dumps({"dir": rel, "status": outcome.status.value, "reason": outcome.reason,
                       "skipped": skipped, "launched": launched, "t": round(time.time(), 3)}) + "\n"
    Path(sweep_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(sweep_dir) / LEDGER_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_ledger(sweep_dir: Path, offset: int = 0) -> list[dict[str, Any]]:
    """Ledger lines from byte ``offset`` on (complete lines only)."""
    path = Path(sweep_dir) / LEDGER_FILE
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return []
    lines = data.decode(errors="replace").split("\n")[:-1]  # the last piece is partial or empty
    out = []
    for text in lines:
        with contextlib.suppress(ValueError):
            out.append(json.loads(text))
    return out


def ledger_size(sweep_dir: Path) -> int:
    """The ledger's length in bytes (where this invocation's lines will start)."""
    try:
        return (Path(sweep_dir) / LEDGER_FILE).stat().st_size
    except FileNotFoundError:
        return 0


@dataclass
class Tally:
    """The ends of one sweep invocation: counts per status, reused runs (and how many of them
    were not even launched), and the failures."""

    ok: int = 0
    infeasible: int = 0
    failed: int = 0
    skipped: int = 0
    unlaunched: int = 0
    failures: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, lines: list[dict[str, Any]]) -> Tally:
        last = {line["dir"]: line for line in lines}  # a run recorded twice (a retried Slurm task) counts once
        t = cls()
        fails = []
        for line in last.values():
            status = line.get("status")
            if status == Status.OK.value:
                t.ok += 1
            elif status == Status.INFEASIBLE.value:
                t.infeasible += 1
            else:
                t.failed += 1
                fails.append((str(line["dir"]), str(line.get("reason", ""))))
            t.skipped += bool(line.get("skipped"))
            t.unlaunched += not line.get("launched", True)
        t.failures = tuple(sorted(fails))
        return t

    def line(self) -> str:
        total = self.ok + self.infeasible + self.failed
        return (f"{total} runs: {self.ok} ok, {self.infeasible} infeasible, {self.failed} failed"
                f" ({self.skipped} reused from an earlier run of the same config,"
                f" {self.unlaunched} of them without composing it)")
