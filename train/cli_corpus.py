"""``moebits train corpus``: build the standard-library text splits (see :mod:`train.corpus`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from moebits.train import corpus

DESCRIPTION = """\
Build the corpus from this Python's standard library into OUT: train.bin, calibration_code.bin,
calibration_prose.bin, evaluation_code.bin, evaluation_prose.bin (raw bytes, documents separated
by NUL). Every source file's sha256 is checked against train/data/corpus_manifest.json first and
the built files against it after, so the corpus is the same bytes everywhere. With another
Python version the sources differ: build on a machine with the recorded version and copy OUT
(other commands check the files' hashes), or record a new corpus with --new-manifest.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("corpus", help="build the stdlib corpus splits", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="where the split files go")
    p.add_argument("--new-manifest", action="store_true",
                   help="record a new manifest from this Python instead of checking against it")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    manifest = corpus.build(args.out, new_manifest=args.new_manifest)
    for name, s in manifest["splits"].items():
        print(f"{name:<20}{s['bytes']:>12,} bytes  sha256 {s['sha256'][:16]}")
    print(f"corpus of Python {manifest['python']} ({len(manifest['sources'])} files) in {args.out}")
    return 0
