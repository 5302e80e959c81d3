"""What composing one job of a sweep read: the key a resumed sweep skips it by, without composing it.

Hydra composes a job's config from the sweep's command line, the config files its defaults list
names, the code of the schema classes in the ConfigStore and the environment variables its
values interpolate; nothing else (the project registers no resolvers). Composing costs 0.15-0.3 s
a job, so a resumed 825-run sweep that composed every job to compare config hashes spent minutes
deciding to do nothing. When a job of a sweep runs it records, in its ``outcome.json``, a
:class:`Footprint`:

- ``key`` (:func:`job_key`): how the sweep asked for the job, known before composing: the
  primary config's name, the config search path, the hydra overrides and the job's overrides;
- ``inputs``: the names of everything its composition read: ``file:conf/policy/dynaexq.yaml``
  (for every entry of its defaults list, the candidate file in every ``file://`` config source,
  present or absent, so a new file that would shadow another counts), ``file:policies/dynaexq.py``
  (the modules of the config's schema classes, their bases and enums, and the moebits modules
  those import, transitively, function-local imports included), ``env:MOEBITS_TRACES`` (the
  variables its values interpolate with ``oc.env`` and the ``MOEBITS_*`` names in that code)
  and ``dist:hydra-core``, ``dist:omegaconf`` (their versions);
- ``digest``: a hash of those inputs' contents when it ran.

A resumed sweep (:mod:`.sweeper`) skips a job whose key equals a finished run's and whose
inputs still hash to its digest: same command line, same files, same code, same environment, so
the same composed config. Anything else is composed and decides by its config hash
(:mod:`.outcome`). So an edit of the simulator's code, of a preset the job does not use, or of
another policy's module costs nothing; an edit of what the job is made of composes it again
(and re-runs it when its config changed). Unsound only for composition inputs outside this
list: code that changes another module's schema at import time (the house style forbids
import-time side effects) or a policy module that registers another policy's preset name
(refused at registration).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, is_dataclass
from enum import Enum
from functools import cache
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VERSION = "1"  # of the footprint's recipe: a change makes every recorded footprint miss
DISTRIBUTIONS = ("hydra-core", "omegaconf")
ENV_IN_CONFIG = re.compile(r"oc\.env\s*:\s*['\"]?([A-Za-z_][A-Za-z0-9_]*)")
ENV_IN_CODE = re.compile(r"\bMOEBITS_[A-Z0-9_]+\b")
ABSENT = "absent"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Footprint:
    """A job's :func:`job_key`, the names of its composition's inputs and their digest then."""

    key: str
    inputs: tuple[str, ...]
    digest: str

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "inputs": list(self.inputs), "digest": self.digest}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Footprint:
        return cls(str(data["key"]), tuple(str(i) for i in data["inputs"]), str(data["digest"]))


def _hash(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()[:16]


# --- the key: the command line, before composing ----------------------------------------------------


def job_key(hydra_cfg: Any, overrides: Sequence[str]) -> str:
    """The key of the job ``overrides`` of a sweep whose hydra node is ``hydra_cfg`` (the main
    process's ``config.hydra``, or ``HydraConfig.get()`` in the job: they agree)."""
    sources = [f"{s.schema}://{s.path}" for s in hydra_cfg.runtime.config_sources]
    text = json.dumps([VERSION, str(hydra_cfg.job.config_name), sources, list(hydra_cfg.overrides.hydra),
                       list(overrides)])
    return _hash(text)


# --- the inputs and their digest ----------------------------------------------------------------------


@cache
def _file_name(path: Path) -> str:
    path = path.resolve()
    return f"file:{path.relative_to(REPO) if path.is_relative_to(REPO) else path}"


def input_digest(name: str) -> str:
    """The current digest of one input (``file:``, ``env:`` or ``dist:``)."""
    kind, _, what = name.partition(":")
    if kind == "file":
        try:
            return _hash((REPO / what).read_bytes())  # an absolute ``what`` stays itself
        except FileNotFoundError:
            return ABSENT
    if kind == "env":
        value = os.environ.get(what)
        return ABSENT if value is None else _hash(value)
    if kind == "dist":
        try:
            return importlib.metadata.version(what)
        except importlib.metadata.PackageNotFoundError:
            return ABSENT
    raise ValueError(f"unknown footprint input {name!r}")


class Digests:
    """Current digests of inputs, each computed once (a resumed sweep checks hundreds of
    footprints over the same few dozen files)."""

    def __init__(self, known: dict[str, str] | None = None) -> None:
        self._one: dict[str, str] = dict(known or {})
        self._all: dict[tuple[str, ...], str] = {}

    def of(self, inputs: Sequence[str]) -> str:
        key = tuple(inputs)
        if key not in self._all:
            for name in key:
                if name not in self._one:
                    self._one[name] = input_digest(name)
            self._all[key] = _hash("\n".join(f"{n}={self._one[n]}" for n in key))
        return self._all[key]

    def unchanged(self, footprint: Footprint) -> bool:
        return self.of(footprint.inputs) == footprint.digest


# --- what a composition read -----------------------------------------------------------------------


def conf_files(defaults: Iterable[str], sources: Iterable[tuple[str, str]]) -> list[Path]:
    """For each config path of a defaults list (``policy/dynaexq``), its candidate file in every
    ``file`` config source ((schema, path) pairs), present or not."""
    dirs = [Path(path) for schema, path in sources if schema == "file"]
    return [d / f"{config_path}.yaml" for config_path in defaults if config_path for d in dirs]


def schema_modules(run_cfg: Any) -> set[str]:
    """The modules of the classes a converted config is made of: every dataclass in it, their
    bases, and the enums of its values."""
    out: set[str] = set()
    todo = [run_cfg]
    while todo:
        obj = todo.pop()
        if is_dataclass(obj) and not isinstance(obj, type):
            out.update(c.__module__ for c in type(obj).__mro__)
            todo.extend(getattr(obj, f.name) for f in fields(obj))
        elif isinstance(obj, Enum):
            out.add(type(obj).__module__)
        elif isinstance(obj, (list, tuple)):
            todo.extend(obj)
        elif isinstance(obj, dict):
            todo.extend(obj.values())
    return out


def _ours(module: str) -> bool:
    return module == "moebits" or module.startswith("moebits.")


@cache
def _module_file(module: str) -> Path | None:
    loaded = sys.modules.get(module)
    origin = getattr(loaded, "__file__", None)
    if origin is None:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            return None
        origin = spec.origin if spec is not None else None
    return Path(origin).resolve() if origin and origin.endswith(".py") else None


@cache
def _imports(path: Path, module: str) -> tuple[str, ...]:
    """The moebits modules ``path`` (module ``module``) imports anywhere in its body."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out.append(base)
            if (p := _module_file(base)) is not None and p.name == "__init__.py":
                out.extend(f"{base}.{a.name}" for a in node.names)  # maybe submodules
    return tuple(m for m in out if _ours(m))


def code_files(modules: Iterable[str]) -> set[Path]:
    """The files of ``modules`` (those of moebits), their packages' ``__init__`` and every moebits
    module they import, transitively."""
    todo = [m for m in modules if _ours(m)]
    seen: set[str] = set()
    files: set[Path] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = _module_file(module)
        if path is None:
            continue
        files.add(path)
        todo.append(module.rpartition(".")[0] or module)
        todo.extend(_imports(path, module))
    return files


def env_names(config_text: str, code: Iterable[Path]) -> set[str]:
    """Environment variables a composition may read: ``oc.env`` in the (unresolved) config and
    ``MOEBITS_*`` names in its code."""
    names = set(ENV_IN_CONFIG.findall(config_text))
    for path in code:
        names.update(_env_in_code(path))
    return names


@cache
def _env_in_code(path: Path) -> frozenset[str]:
    return frozenset(ENV_IN_CODE.findall(path.read_text()))  # once per process: the code it runs


def footprint(key: str, conf: Iterable[Path], code: Iterable[Path], env: Iterable[str]) -> Footprint:
    """The footprint of a job of key ``key`` whose composition read these files and variables."""
    code_names = [_file_name(p) for p in code]
    inputs = sorted({*(_file_name(p) for p in conf), *code_names, *(f"env:{n}" for n in env),
                     *(f"dist:{d}" for d in DISTRIBUTIONS)})
    return Footprint(key, tuple(inputs), Digests({n: _loaded_digest(n) for n in code_names}).of(inputs))


@cache
def _loaded_digest(name: str) -> str:
    """A code file's digest when this process first read it: the code it imported, even if the
    file is edited while a long sweep runs."""
    return input_digest(name)


_DEFAULTS: dict[str, tuple[list[Path], str]] = {}  # this process's defaults lists: conf files, their digest


def group_override(override: str, groups: Iterable[str]) -> bool:
    """Whether ``override`` may change a defaults list: a deletion, or one naming a config group
    (value overrides never do: hydra builds the defaults list before it merges values)."""
    return override.startswith("~") or override.lstrip("+").split("=", 1)[0].split("@", 1)[0] in set(groups)


def defaults_files(hc: Any, task: Sequence[str]) -> list[Path]:
    """:func:`conf_files` of the running job's defaults list (hydra node ``hc``, overrides
    ``task``). The list is computed once per process for jobs that differ only in values (a sweep
    over seeds), and again when one of its files changed since."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    key = job_key(hc, [o for o in task if group_override(o, hc.runtime.choices)])
    files, digest = _DEFAULTS.get(key, ([], ""))
    if not digest or Digests().of([_file_name(p) for p in files]) != digest:
        defaults = GlobalHydra.instance().config_loader().compute_defaults_list(
            hc.job.config_name, [*hc.overrides.hydra, *task], RunMode.RUN)
        files = conf_files([d.config_path for d in defaults.defaults],
                           [(s.schema, s.path) for s in hc.runtime.config_sources])
        _DEFAULTS[key] = files, Digests().of([_file_name(p) for p in files])
    return files


def of_job(cfg: Any, run_cfg: Any, extra_modules: Iterable[str] = ()) -> Footprint | None:
    """The footprint of the running hydra job: ``cfg`` its composed config (DictConfig),
    ``run_cfg`` the dataclasses it converts to, ``extra_modules`` those that registered its
    schemas. None when hydra cannot say (the job then composes on every resume)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    try:
        hc = HydraConfig.get()
        task = list(hc.overrides.task)
        conf = defaults_files(hc, task)
        code = code_files([*schema_modules(run_cfg), *extra_modules])
        text = json.dumps(OmegaConf.to_container(cfg, resolve=False), default=str)
        return footprint(job_key(hc, task), conf, code, env_names(text, code))
    except Exception as exc:  # noqa: BLE001 - a launcher without hydra's globals: compose on resume
        log.debug(f"no footprint: {type(exc).__name__}: {exc}")
        return None
