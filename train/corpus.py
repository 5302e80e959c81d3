"""The training text: the running Python's standard library, rebuilt identically on every machine.

Documents (each one a byte string; tokens are its bytes, vocabulary 256, so bits per token are
bits per byte):

- **code**: every ``.py`` file under the standard library (``sysconfig`` path ``stdlib``),
  except ``site-packages`` and the test suites (``test``, ``tests``, ``idle_test``), as stored
  on disk;
- **prose**: the pydoc topics (``pydoc_data.topics``, one document per topic: the text that
  ``help('TOPIC')`` prints), and, per ``.py`` file, its docstrings (module, classes, functions,
  ``inspect.cleandoc``-ed) joined by blank lines.

Splits are disjoint by source: a file (its code and its docstrings) or a topic belongs to one
split, chosen by the first byte of sha256 of its name: ``< 8`` EVALUATION (3%), ``< 16``
CALIBRATION (3%), else TRAIN. EVALUATION and CALIBRATION keep code and prose apart (the two
workload kinds, for distribution shift); TRAIN mixes both. Within a split, documents follow
sorted by name, separated by one NUL byte (a byte no source file holds).

The *manifest* (``train/data/corpus_manifest.json``, committed) records the Python version and
every source file's sha256; :func:`build` refuses to build from sources that differ from it
(naming the first file and what to do), so a corpus with a given manifest is the same bytes on
every machine. A machine with another Python (the GPU machine has 3.12) does not rebuild: it
reads the built split files, whose sha256 the manifest also records (:func:`load`).
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import sys
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MANIFEST = Path(__file__).resolve().parent / "data" / "corpus_manifest.json"
SKIP_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "__pycache__"})
SPLITS = ("train", "calibration", "evaluation")
KINDS = ("code", "prose")
SEP = b"\x00"
TOPICS = "pydoc_data/topics.py"  # the pydoc topics come from this file; its hash pins them


class CorpusError(ValueError):
    """The corpus cannot be built or read as recorded; the message says what to do."""


@dataclass(frozen=True)
class Document:
    """One document: its source name (a stdlib path or ``topic:NAME``), kind and bytes."""

    name: str
    kind: str
    text: bytes


def split_of(name: str) -> str:
    """TRAIN, CALIBRATION or EVALUATION for a source name (see the module docstring)."""
    b = hashlib.sha256(name.encode()).digest()[0]
    return "evaluation" if b < 8 else "calibration" if b < 16 else "train"


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: Path) -> list[str]:
    """The stdlib ``.py`` files the corpus reads, as sorted POSIX paths relative to ``root``."""
    out = [p.relative_to(root).as_posix() for p in root.rglob("*.py")
           if not SKIP_DIRS.intersection(p.relative_to(root).parts)]
    return sorted(out)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def docstrings(source: bytes) -> bytes:
    """The docstrings of a Python source (module, classes, functions), cleaned, blank-line joined."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return b""
    nodes = [tree, *(n for n in ast.walk(tree)
                     if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef))]
    docs = [ast.get_docstring(n, clean=False) for n in nodes]
    return "\n\n".join(inspect.cleandoc(d) for d in docs if d).encode("utf-8", "surrogatepass")


def topics() -> dict[str, str]:
    """The pydoc topics of the running Python (``help('TOPIC')`` texts)."""
    from pydoc_data.topics import topics as table

    return dict(table)


def documents(root: Path, files: list[str]) -> list[Document]:
    """Code and prose documents of ``files`` under ``root`` plus the pydoc topics."""
    out: list[Document] = []
    for rel in files:
        src = (root / rel).read_bytes()
        out.append(Document(rel, "code", src))
        doc = docstrings(src)
        if doc:
            out.append(Document(rel, "prose", doc))
    out += [Document(f"topic:{k}", "prose", v.encode()) for k, v in sorted(topics().items())]
    return out


def split_name(split: str, kind: str | None) -> str:
    """File stem of a built split: ``train``, ``calibration_code``, ``evaluation_prose``, ..."""
    return split if kind is None else f"{split}_{kind}"


def assemble(docs: list[Document]) -> dict[str, bytes]:
    """The built split files' contents (see the module docstring)."""
    parts: dict[str, list[bytes]] = {split_name("train", None): []}
    for s in SPLITS[1:]:
        for k in KINDS:
            parts[split_name(s, k)] = []
    for d in sorted(docs, key=lambda d: (d.name, d.kind)):
        s = split_of(d.name)
        parts[split_name(s, None if s == "train" else d.kind)].append(d.text)
    return {name: SEP.join(texts) + SEP for name, texts in parts.items()}


# ---------------------------------------------------------------- manifest
def current_sources() -> tuple[dict[str, str], Path]:
    """(source path -> sha256, stdlib root) of the running Python."""
    root = stdlib_dir()
    return {rel: sha256((root / rel).read_bytes()) for rel in source_files(root)}, root


def read_manifest(path: Path = MANIFEST) -> dict:
    if not path.is_file():
        raise CorpusError(f"{path}: no corpus manifest; run 'moebits train corpus --new-manifest' to record one")
    return json.loads(path.read_text())


def verify(manifest: dict, sources: dict[str, str]) -> None:
    """Raise a :class:`CorpusError` naming the first difference between ``sources`` and the manifest."""
    want: dict[str, str] = manifest["sources"]
    py = manifest["python"]
    advice = (f"the manifest was recorded with Python {py}; build with that Python "
              f"(this is {sys.version.split()[0]}), or copy the built split files from a machine that has it "
              "(their hashes are checked), or record a new corpus with --new-manifest (a model trained on "
              "another corpus is another model: retrain it)")
    missing, extra = sorted(set(want) - set(sources)), sorted(set(sources) - set(want))
    if missing or extra:
        raise CorpusError(f"stdlib file list differs from the manifest ({len(missing)} missing, e.g. "
                          f"{(missing or ['-'])[0]}; {len(extra)} extra, e.g. {(extra or ['-'])[0]}): {advice}")
    for rel, digest in want.items():
        if sources[rel] != digest:
            raise CorpusError(f"{rel}: sha256 {sources[rel][:12]}... differs from the manifest's {digest[:12]}...: {advice}")


def build(out_dir: Path, manifest_path: Path = MANIFEST, new_manifest: bool = False) -> dict:
    """Build the split files into ``out_dir`` (``NAME.bin``, raw bytes); returns the manifest.

    Verifies the sources against the manifest first, and the built files against its split
    hashes after; ``new_manifest`` records a fresh manifest instead."""
    sources, root = current_sources()
    manifest = None if new_manifest else read_manifest(manifest_path)
    if manifest is not None:
        verify(manifest, sources)
    built = assemble(documents(root, sorted(sources)))
    splits = {name: {"sha256": sha256(data), "bytes": len(data)} for name, data in built.items()}
    if manifest is not None and manifest["splits"] != splits:
        raise CorpusError("the built splits differ from the manifest's although every source matches: the corpus "
                          "code changed; record a new manifest with --new-manifest (and retrain)")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in built.items():
        (out_dir / f"{name}.bin").write_bytes(data)
    manifest = manifest or {
        "python": sys.version.split()[0], "stdlib": "sysconfig stdlib path", "skip_dirs": sorted(SKIP_DIRS),
        "split_rule": "sha256(source name)[0]: <8 evaluation, <16 calibration, else train",
        "separator": "NUL", "tokenizer": "bytes (vocab 256)", "splits": splits, "sources": sources,
    }
    if new_manifest:
        manifest_path.parent.mkdir(parents=True, exist_ok=True)
        manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def load(data_dir: Path, name: str, manifest_path: Path = MANIFEST) -> np.ndarray:
    """A built split as ``uint8 [N]`` after checking its sha256 against the manifest."""
    manifest = read_manifest(manifest_path)
    if name not in manifest["splits"]:
        raise CorpusError(f"no split {name!r}; the corpus has {', '.join(manifest['splits'])}")
    path = Path(data_dir) / f"{name}.bin"
    if not path.is_file():
        raise CorpusError(f"{path}: not built; run 'moebits train corpus --out {data_dir}' "
                          f"(with Python {manifest['python']}) or copy the built files there")
    data = path.read_bytes()
    if sha256(data) != manifest["splits"][name]["sha256"]:
        raise CorpusError(f"{path}: sha256 differs from the manifest; rebuild it with 'moebits train corpus'")
    return np.frombuffer(data, dtype=np.uint8)
