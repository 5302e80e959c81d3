"""Sweeps a researcher can trust: outcomes, resume by config hash, one progress bar, a tally.

A hydra multirun of ``moebits sim`` (or ``moebits runtime``) runs one job per override set,
each in its own folder. This module is what makes such a sweep safe to kill, edit and re-run:

- **Outcome** (``outcome.json`` in the run folder, written last): ``ok``, ``infeasible`` (the
  configuration cannot run, e.g. the budget is too small: a fact about the config, so it is
  recorded and never retried) or ``failed`` (anything else: a missing file, a bug), with the
  one-line reason and the :func:`config_hash` of the run's fully composed config.
- **Resume** (:func:`reusable`): a run is skipped only when its folder holds an ``ok`` or
  ``infeasible`` outcome of the *same* config hash. Editing a preset (dynaexq's ``alpha``)
  changes the hash, so those runs run again; ``failed`` runs always run again.
- **Ledger** (``<sweep dir>/.ledger.jsonl``): each finished job appends one line (its
  folder, status, reason, whether it was skipped). :class:`SweepCallback` (a hydra callback,
  ``conf/hydra/callbacks/sweep.yaml``) draws one progress bar from it while the sweep runs
  (jobs in worker processes, Ray tasks or Slurm arrays all append to the same file), hides
  each job's console output (it goes to the run's ``app.log``), and prints a final tally
  ``ok / infeasible / failed``; the process exits with status :data:`RUNS_FAILED_EXIT` (3) when any run
  failed (1 and 2 stay hydra's and the app's own: the sweep itself could not run).
- **Typos** (:func:`first_of_sweep`): the first value of every swept override, so the app can
  compose one run of a sweep up front and report a misspelled key in one line.

No simpy, no torch: the callback and the outcome records are shared by both engines' apps.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.experimental.callback import Callback

OUTCOME_FILE = "outcome.json"
LEDGER_FILE = ".ledger.jsonl"
RUNS_FAILED_EXIT = 3  # the sweep ran, and some runs failed
# top-level run-config keys that change how a run is shown, never what it computes
NOT_HASHED = ("resume", "progress", "figure", "check")

log = logging.getLogger(__name__)


class Status(Enum):
    """How a run ended."""

    OK = "ok"
    INFEASIBLE = "infeasible"
    FAILED = "failed"


REUSABLE = (Status.OK, Status.INFEASIBLE)


@dataclass(frozen=True)
class Outcome:
    """A run's end: its status, a one-line reason (empty when ok), its config hash and its
    :func:`job_key` (how the sweep asked for it: overrides and sources)."""

    status: Status
    reason: str
    config_hash: str
    job_key: str = ""

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "status": self.status.value}, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Outcome:
        return cls(Status(data["status"]), str(data.get("reason", "")), str(data.get("config_hash", "")),
                   str(data.get("job_key", "")))


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


SOURCE_DIRS = ("conf", "core", "traces", "policies", "drive", "sim", "runtime")
REPO = Path(__file__).resolve().parents[1]


@functools.cache
def source_fingerprint(root: Path = REPO) -> str:
    """A hash of everything a composed run config is made of besides its overrides: the config
    files and the code of the schemas (every .py/.yaml under :data:`SOURCE_DIRS`) and the
    ``MOEBITS_*`` environment variables that configs read."""
    h = hashlib.sha256()
    for d in SOURCE_DIRS:
        for p in sorted((root / d).rglob("*")):
            if p.suffix in (".py", ".yaml") and p.is_file():
                h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    for k in sorted(k for k in os.environ if k.startswith("MOEBITS_")):
        h.update(f"{k}={os.environ[k]}\0".encode())
    return h.hexdigest()[:16]


def job_key(overrides: list[str] | tuple[str, ...]) -> str:
    """A job of a sweep, known before hydra composes it: its overrides and :func:`source_fingerprint`.
    Equal keys compose equal configs, so a resumed sweep can skip a job without composing it."""
    text = source_fingerprint() + "\n" + "\n".join(overrides)
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


# --- the ledger: one line per job of a sweep, appended where the job ran -------------------------------


def append_ledger(sweep_dir: Path, run_dir: Path, outcome: Outcome, skipped: bool) -> None:
    """Append the job's line to the sweep's ledger (one ``write`` of one short line: atomic in
    append mode on a local or shared POSIX filesystem)."""
    try:
        rel = str(Path(run_dir).resolve().relative_to(Path(sweep_dir).resolve()))
    except ValueError:
        rel = str(run_dir)
    line = json.dumps({"dir": rel, "status": outcome.status.value, "reason": outcome.reason,
                       "skipped": skipped, "t": round(time.time(), 3)}) + "\n"
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
    try:
        return (Path(sweep_dir) / LEDGER_FILE).stat().st_size
    except FileNotFoundError:
        return 0


@dataclass
class Tally:
    """The ends of one sweep invocation: counts per status, skipped runs, and the failures."""

    ok: int = 0
    infeasible: int = 0
    failed: int = 0
    skipped: int = 0
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
        t.failures = tuple(sorted(fails))
        return t

    def line(self) -> str:
        total = self.ok + self.infeasible + self.failed
        return (f"{total} runs: {self.ok} ok, {self.infeasible} infeasible, {self.failed} failed"
                f" ({self.skipped} reused from an earlier run of the same config)")


LAUNCHER_EXTRAS = {"joblib": "sweep", "ray": "ray", "submitit": "slurm"}


def launcher_hint(message: str) -> str | None:
    """For hydra's 'Could not find hydra/launcher/<name>...' (its plugin is not installed): the
    extra that installs it."""
    if "hydra/launcher/" not in message:
        return None
    for name, extra in LAUNCHER_EXTRAS.items():
        if f"hydra/launcher/{name}" in message or f"hydra/launcher/moebits_{name}" in message:
            return f"the {name} launcher is not installed: pip install 'moebits[{extra}]'"
    return None


# --- sweep size and typos ---------------------------------------------------------------------------


def _parsed(overrides: list[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(overrides)


def sweep_size(overrides: list[str]) -> int | None:
    """How many jobs hydra's basic sweeper makes of ``overrides`` (None when a value is not a plain list)."""
    n = 1
    for o in _parsed(overrides):
        if o.is_sweep_override():
            if not o.is_discrete_sweep():
                return None
            n *= len(list(o.sweep_iterator()))
    return n


def first_of_sweep(overrides: list[str]) -> list[str]:
    """``overrides`` with every sweep (``a=1,2``) replaced by its first value (``a=1``): one run of
    the sweep, for composing up front."""
    out = []
    for text, o in zip(overrides, _parsed(overrides), strict=True):
        if o.is_sweep_override() and o.is_discrete_sweep():
            first = next(iter(o.sweep_string_iterator()))
            out.append(f"{o.get_key_element()}={first}")
        else:
            out.append(text)
    return out


def sweep_overrides(config: Any) -> list[str]:
    """A multirun's sweep as overrides: the sweeper's ``params`` then the command line's."""
    params = config.hydra.sweeper.get("params") or {}
    return [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)


def covering(batch: list[list[str]]) -> list[list[str]]:
    """The jobs of ``batch`` (override lists) that first use some ``key=value``: every value of
    every swept key appears at least once, in about the sum (not the product) of the sweep's
    lengths (21 instead of 825 jobs for the seed study)."""
    seen: set[str] = set()
    out = []
    for job in batch:
        new = set(job) - seen
        if new:
            out.append(job)
            seen |= new
    return out


def _basic_sweepers() -> list[type]:
    """hydra's BasicSweeper class as its plugin registry loads it (a module object of its own)."""
    from hydra.core.plugins import Plugins
    from hydra.plugins.sweeper import Sweeper

    found = [c for c in Plugins.instance().discover(Sweeper) if c.__name__ == "BasicSweeper"]
    return [*found, BasicSweeper]


def drop_reusable(batch: list[Any], sweep_dir: Path) -> list[tuple[str, Outcome]]:
    """Remove from ``batch`` (in place) the jobs whose run folder under ``sweep_dir`` already
    holds a reusable outcome of the same :func:`job_key`, and return them (folder, outcome). At
    least one job stays, so a launcher is never handed an empty batch (it skips itself)."""
    known: dict[str, tuple[str, Outcome]] = {}
    for path in Path(sweep_dir).rglob(OUTCOME_FILE):
        done = read_outcome(path.parent)
        if done is not None and done.status in REUSABLE and done.job_key:
            known[done.job_key] = (str(path.parent), done)
    keep: list[Any] = []
    dropped: list[tuple[str, Outcome]] = []
    for job in batch:
        hit = known.get(job_key(list(job)))
        if hit is None:
            keep.append(job)
        else:
            dropped.append(hit)
    if not keep and batch:
        keep, dropped = [batch[0]], dropped[1:]
    batch[:] = keep
    return dropped


@contextlib.contextmanager
def lean_basic_sweeper(validate_all: bool = False, reuse_before_launch: bool = True) -> Any:
    """While inside, hydra's basic sweeper (1) drops from each batch the jobs a resumed sweep
    can reuse (:func:`drop_reusable`, when the sweep's ``resume`` is true), recording them in
    the ledger, and (2) validates a :func:`covering` sample of the rest instead of composing
    every job before launching it (and then again to run it).

    For the 825-run seed study the up-front validation took 2.5-6 minutes before the first run
    (0.3 s per composition on a busy 2-core VM); the sample (21 jobs) takes seconds, and a
    finished sweep run again composes (almost) nothing. A misspelled key or preset value is
    still caught before the first run (every value is composed once); what a sample can miss
    (a setting that only some policies have, swept across all of them) stops the sweep when its
    job is composed. (Hydra accepts sweepers only from its ``hydra_plugins`` package, so this
    swaps the one method for the sweep's duration instead of registering a plugin.)"""
    classes = _basic_sweepers()
    saved = [c.__dict__.get("validate_batch_is_legal") for c in classes]

    def lean(self: Any, batch: Any) -> None:
        if reuse_before_launch and self.config.get("resume", True):
            sweep_dir = Path(str(self.config.hydra.sweep.dir))
            for where, done in drop_reusable(batch, sweep_dir):
                append_ledger(sweep_dir, Path(where), done, skipped=True)
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


# --- the hydra callback ---------------------------------------------------------------------------


class SweepCallback(Callback):
    """Hydra callback (``hydra.callbacks.sweep._target_: moebits.drive.sweep.SweepCallback``).

    In the main process of a multirun: a progress bar over the sweep's jobs (read from the
    ledger) instead of hydra's per-job lines, then a tally; exit status 3 when a run failed.
    In each job (wherever it runs): its console output goes to its ``app.log`` only, and its
    end is appended to the ledger. A job's task function returns its :class:`Outcome`
    together with whether it was skipped (``(outcome, skipped)``); a task that raised counts
    as failed. ``progress: false`` keeps hydra's own lines and no bar; ``validate: all`` has
    hydra compose every job before the first runs (default ``covering``), ``reuse_before_launch:
    false`` launches reusable jobs too (each then skips itself): :func:`lean_basic_sweeper`."""

    def __init__(self, progress: bool = True, quiet_jobs: bool = True, poll_s: float = 0.5,
                 validate: str = "covering", reuse_before_launch: bool = True) -> None:
        if validate not in ("covering", "all"):
            raise ValueError(f'"validate" must be covering or all, got {validate!r}')
        self.validate = validate
        self.reuse_before_launch = reuse_before_launch
        self._validation = contextlib.ExitStack()
        self.progress = progress
        self.quiet_jobs = quiet_jobs
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._offset = 0
        self._sweep_dir = Path(".")

    def __getstate__(self) -> dict[str, Any]:
        """Launchers ship the callbacks to each job's process (joblib, Ray, submitit): only the
        settings travel, not the main process's bar thread."""
        return {"progress": self.progress, "quiet_jobs": self.quiet_jobs, "poll_s": self.poll_s,
                "validate": self.validate, "reuse_before_launch": self.reuse_before_launch}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    # main process ---------------------------------------------------------------------------------
    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._sweep_dir = Path(str(config.hydra.sweep.dir))
        self._offset = ledger_size(self._sweep_dir)
        self._validation.enter_context(lean_basic_sweeper(self.validate == "all", self.reuse_before_launch))
        total = sweep_size(sweep_overrides(config))
        print(f"sweep: {total if total is not None else '?'} runs in {self._sweep_dir}", file=sys.stderr, flush=True)
        if self.progress:
            for name in ("hydra", "hydra_plugins"):  # the bar replaces the launchers' '#N : ...' lines
                logging.getLogger(name).setLevel(logging.WARNING)
            self._thread = threading.Thread(target=self._watch, args=(total,), daemon=True)
            self._thread.start()

    def _watch(self, total: int | None) -> None:
        from tqdm import tqdm

        tty = sys.stderr.isatty()  # in a log file, redraw at most every 30 s
        with tqdm(total=total, desc="sweep", unit="run", file=sys.stderr, dynamic_ncols=True,
                  mininterval=0.5 if tty else 30.0) as bar:
            while True:
                stopping = self._stop.wait(self.poll_s)
                t = Tally.of(read_ledger(self._sweep_dir, self._offset))
                done = t.ok + t.infeasible + t.failed
                if done != bar.n:
                    bar.set_postfix(ok=t.ok, infeasible=t.infeasible, failed=t.failed, refresh=False)
                    bar.update(done - bar.n)
                if stopping:
                    return

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        self._validation.close()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        tally = Tally.of(read_ledger(self._sweep_dir, self._offset))
        print(f"sweep {self._sweep_dir}: {tally.line()}", file=sys.stderr)
        for where, reason in tally.failures[:20]:
            print(f"  failed: {where}: {reason}", file=sys.stderr)
        if len(tally.failures) > 20:
            print(f"  ... and {len(tally.failures) - 20} more (see error.txt in each run folder)", file=sys.stderr)
        if tally.failed:
            sys.stderr.flush()
            sys.exit(RUNS_FAILED_EXIT)

    # each job ---------------------------------------------------------------------------------
    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if self.quiet_jobs and HydraConfig.get().mode == RunMode.MULTIRUN:
            root = logging.getLogger()
            for h in list(root.handlers):
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                    root.removeHandler(h)

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return
        out_dir = Path(hc.runtime.output_dir)
        if job_return.status == JobStatus.COMPLETED and isinstance(job_return.return_value, tuple):
            outcome, skipped = job_return.return_value
        else:
            value = job_return._return_value
            reason = f"{type(value).__name__}: {value}" if isinstance(value, BaseException) else "no outcome"
            outcome, skipped = Outcome(Status.FAILED, reason.splitlines()[0] if reason else "", ""), False
        append_ledger(Path(str(hc.sweep.dir)), out_dir, outcome, skipped)

