"""Hydra's basic sweeper made lean for the duration of a sweep: finished jobs are dropped before
launch, and a sample of the rest is validated instead of every job.

For the 825-run seed study hydra's up-front validation took 2.5-6 minutes before the first run
(0.3 s per composition on a busy 2-core VM); a resumed sweep then composed every job once more
to let it skip itself. Inside :func:`lean_basic_sweeper`:

1. (``resume`` true) the jobs whose run folder holds an ok or infeasible outcome with the same
   :class:`~.footprint.Footprint` key and unchanged inputs are dropped from each batch without
   being composed (:func:`drop_reusable`) and recorded in the ledger as reused;
2. a :func:`~.overrides.covering` sample of the rest is validated: every swept value is composed
   once, so a misspelled key or preset value is still caught before the first run; what a
   sample can miss (a setting that only some policies have, swept across all of them) stops
   the sweep when its job is composed.

Hydra accepts sweepers only from its ``hydra_plugins`` package, so this swaps the one method
for the sweep's duration instead of registering a plugin.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from moebits.drive.footprint import Digests, job_key
from moebits.drive.ledger import append_ledger
from moebits.drive.outcome import OUTCOME_FILE, REUSABLE, Outcome, read_outcome
from moebits.drive.overrides import covering


def _basic_sweepers() -> list[type]:
    """hydra's BasicSweeper class as its plugin registry loads it (a module object of its own)."""
    from hydra.core.plugins import Plugins
    from hydra.plugins.sweeper import Sweeper

    found = [c for c in Plugins.instance().discover(Sweeper) if c.__name__ == "BasicSweeper"]
    return list(dict.fromkeys([*found, BasicSweeper]))  # the same class once


def finished_runs(sweep_dir: Path) -> dict[str, tuple[str, Outcome]]:
    """The reusable runs under ``sweep_dir`` that recorded a footprint, by footprint key: (folder, outcome)."""
    known: dict[str, tuple[str, Outcome]] = {}
    for path in Path(sweep_dir).rglob(OUTCOME_FILE):
        done = read_outcome(path.parent)
        if done is not None and done.status in REUSABLE and done.footprint is not None:
            known[done.footprint.key] = (str(path.parent), done)
    return known


def drop_reusable(batch: list[Any], sweep_dir: Path, hydra_cfg: Any) -> list[tuple[str, Outcome]]:
    """Remove from ``batch`` (in place) the jobs of the sweep ``hydra_cfg`` (its hydra node) that a
    run under ``sweep_dir`` can stand for (same footprint key, inputs unchanged), and return them
    (folder, outcome). At least one job stays, so a launcher is never handed an empty batch (it
    skips itself)."""
    known = finished_runs(sweep_dir)
    digests = Digests()
    keep: list[Any] = []
    dropped: list[tuple[str, Outcome]] = []
    for job in batch:
        hit = known.get(job_key(hydra_cfg, list(job))) if known else None
        if hit is not None and hit[1].footprint is not None and digests.unchanged(hit[1].footprint):
            dropped.append(hit)
        else:
            keep.append(job)
    if not keep and batch:
        keep, dropped = [batch[0]], dropped[1:]
    batch[:] = keep
    return dropped


@contextlib.contextmanager
def lean_basic_sweeper(validate_all: bool = False, reuse_before_launch: bool = True) -> Any:
    """While inside, hydra's basic sweeper drops reusable jobs (``reuse_before_launch``, when the
    sweep's ``resume`` is true) and validates a covering sample (every job: ``validate_all``);
    see the module docstring."""
    classes = _basic_sweepers()
    saved = [c.__dict__.get("validate_batch_is_legal") for c in classes]

    def lean(self: Any, batch: Any) -> None:
        if reuse_before_launch and self.config.get("resume", True):
            sweep_dir = Path(str(self.config.hydra.sweep.dir))
            for where, done in drop_reusable(batch, sweep_dir, self.config.hydra):
                append_ledger(sweep_dir, Path(where), done, skipped=True, launched=False)
        super(type(self), self).validate_batch_is_legal(batch if validate_all else covering([list(j) for j in batch]))

    for c in classes:
        c.validate_batch_is_legal = lean  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for c, method in zip(classes, saved, strict=True):
            if method is None:
                del c.validate_batch_is_legal  # type: ignore[attr-defined]
            else:
                c.validate_batch_is_legal = method  # type: ignore[attr-defined]
