"""A run's recorded end (``outcome.json`` in its run folder), and when it may stand for a new run.

- **Outcome** (written last): ``ok``, ``infeasible`` (the configuration cannot run, e.g. the
  budget is too small: a fact about the config, so it is recorded and never retried) or
  ``failed`` (anything else: a missing file, a bug), with the one-line reason, the
  :func:`config_hash` of the run's fully composed config and the :class:`~.footprint.Footprint`
  of its composition (what a resumed sweep compares without composing, :mod:`.sweeper`).
- **Resume** (:func:`reusable`): a run is skipped only when its folder holds an ``ok`` or
  ``infeasible`` outcome of the *same* config hash. Editing a preset (dynaexq's ``alpha``)
  changes the hash, so those runs run again; ``failed`` runs always run again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from moebits.drive.footprint import Footprint

OUTCOME_FILE = "outcome.json"
# top-level run-config keys that change how a run is shown, never what it computes
NOT_HASHED = ("resume", "progress", "figure", "check")


class Status(Enum):
    """How a run ended."""

    OK = "ok"
    INFEASIBLE = "infeasible"
    FAILED = "failed"


REUSABLE = (Status.OK, Status.INFEASIBLE)


@dataclass(frozen=True)
class Outcome:
    """A run's end: its status, a one-line reason (empty when ok), its config hash and the
    footprint of its composition (None: unknown, e.g. a single run or a failure before composing)."""

    status: Status
    reason: str
    config_hash: str
    footprint: Footprint | None = None

    def to_json(self) -> str:
        data: dict[str, Any] = {"status": self.status.value, "reason": self.reason, "config_hash": self.config_hash}
        if self.footprint is not None:
            data["footprint"] = self.footprint.to_dict()
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Outcome:
        fp = data.get("footprint")
        return cls(Status(data["status"]), str(data.get("reason", "")), str(data.get("config_hash", "")),
                   Footprint.from_dict(fp) if isinstance(fp, dict) else None)


def config_hash(cfg: Any) -> str:
    """A short stable hash of a composed run config (a DictConfig or plain dict), resolved,
    without the keys of :data:`NOT_HASHED` and without hydra's own node."""
    if not isinstance(cfg, dict):
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert isinstance(cfg, dict)
    data = {k: v for k, v in cfg.items() if k not in NOT_HASHED and k != "hydra"}
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_outcome(run_dir: Path) -> Outcome | None:
    """The run's recorded outcome, or None (never finished, or written by an older moebits)."""
    path = Path(run_dir) / OUTCOME_FILE
    try:
        return Outcome.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_outcome(run_dir: Path, outcome: Outcome) -> None:
    """Record ``outcome`` atomically (a half-written record would make a resume skip a dead run)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f"{OUTCOME_FILE}.tmp{os.getpid()}"
    tmp.write_text(outcome.to_json() + "\n")
    os.replace(tmp, run_dir / OUTCOME_FILE)


def reusable(run_dir: Path, digest: str) -> Outcome | None:
    """The recorded outcome when it can stand for a new run of config hash ``digest``: ok or
    infeasible, of the same hash. Else None (run it)."""
    done = read_outcome(run_dir)
    if done is not None and done.status in REUSABLE and done.config_hash == digest:
        return done
    return None


def clear_outcome(run_dir: Path) -> None:
    """Forget a run's previous end before running it again (stale results never survive a re-run)."""
    for name in (OUTCOME_FILE, "summary.json", "error.txt"):
        with contextlib.suppress(FileNotFoundError):
            (Path(run_dir) / name).unlink()
