"""Sweeps a researcher can trust: the hydra callback that ties a sweep together.

A hydra multirun of ``moebits sim`` (or ``moebits runtime``) runs one job per override set,
each in its own folder. What makes such a sweep safe to kill, edit and re-run, one module each:

- :mod:`.outcome`: each run's end in its ``outcome.json`` (ok / infeasible / failed, reason,
  config hash); a resumed run is skipped only for an ok or infeasible outcome of the same
  fully composed config;
- :mod:`.footprint`: what a job's composition read, so a resumed sweep can skip a finished job
  without composing it;
- :mod:`.sweeper`: hydra's basic sweeper drops those jobs before launch and validates a sample
  of the rest instead of composing every job up front;
- :mod:`.ledger`: one line per finished job in ``<sweep dir>/.ledger.jsonl``, and the tally;
- :mod:`.overrides`: the sweep's command line (its size, its first job, a covering sample).

Here: :class:`SweepCallback` (``conf/hydra/callbacks/sweep.yaml``) draws one progress bar from
the ledger while the sweep runs (jobs in worker processes, Ray tasks or Slurm arrays all append
to the same file), hides each job's console output (it goes to the run's ``app.log``), and
prints a final tally ``ok / infeasible / failed``; the process exits with status
:data:`RUNS_FAILED_EXIT` (3) when any run failed (1 and 2 stay hydra's and the app's own: the
sweep itself could not run).

No simpy, no torch: the callback and the outcome records are shared by both engines' apps.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from moebits.drive.ledger import Tally, append_ledger, ledger_size, read_ledger
from moebits.drive.outcome import Outcome, Status
from moebits.drive.overrides import sweep_overrides, sweep_size
from moebits.drive.sweeper import lean_basic_sweeper

RUNS_FAILED_EXIT = 3  # the sweep ran, and some runs failed


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

