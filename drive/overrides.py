"""A sweep's command line, read before hydra composes anything.

How many jobs a sweep makes (:func:`sweep_size`), its first job (:func:`first_of_sweep`: the app
composes it up front, so a misspelled key of a sweep is one line), a sample that uses every swept
value once (:func:`covering`: what :mod:`.sweeper` validates instead of every job), and the extra
that installs a missing launcher (:func:`launcher_hint`).
"""

from __future__ import annotations

from typing import Any

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
