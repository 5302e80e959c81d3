"""``moebits traces cache``: show, prune or clear the replay cache.

Replaying a trace file precomputes its layer steps once and caches them as memory-mapped
``.npy`` files under ``$MOEBITS_CACHE/replay`` (default ``~/.cache/moebits/replay``), about
11 MB per real trace and batch size (:mod:`traces.replay`). Nothing is ever stale (an entry
is keyed by the trace's path, size and mtime), but entries of changed or deleted traces stay
until pruned.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from moebits.traces.replay import cache_root

EPILOG = """examples:
  moebits traces cache                        # where the cache is, its entries and size
  moebits traces cache --prune                # drop entries whose trace file is gone or changed
  moebits traces cache --prune --unused-days 30   # ... and those not replayed for 30 days
  moebits traces cache --clear                # drop everything (it is rebuilt on the next replay)"""


@dataclass
class Entry:
    """One cached replay view."""

    path: Path
    size_bytes: int
    last_used_s: float
    source_ok: bool  # its trace file still exists unchanged (False when unknown: an older entry)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _source_ok(head: dict) -> bool:
    src = head.get("source")
    if not isinstance(src, dict):
        return False
    p = Path(str(src.get("path", "")))
    if not p.is_file():
        return False
    st = p.stat()
    return (st.st_size, st.st_mtime_ns) == (src.get("size"), src.get("mtime_ns"))


def entries(root: Path) -> list[Entry]:
    """The cache's entries (folders with a ``view.json``)."""
    out = []
    for view in sorted((root / "replay").glob("*/view.json")):
        try:
            head = json.loads(view.read_text())
        except (OSError, ValueError):
            head = {}
        out.append(Entry(view.parent, _size(view.parent), view.stat().st_mtime, _source_ok(head)))
    return out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="show, prune or clear the replay cache (~/.cache/moebits)",
                       description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--prune", action="store_true", help="remove entries whose trace file is gone or changed")
    what.add_argument("--clear", action="store_true", help="remove every entry")
    p.add_argument("--unused-days", type=float, default=None, help="with --prune: also entries unused this long")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    root = cache_root()
    found = entries(root)
    if args.unused_days is not None and not args.prune:
        raise ValueError("--unused-days needs --prune")
    cutoff = time.time() - 86400 * args.unused_days if args.unused_days is not None else None
    if args.clear:
        drop = found
    elif args.prune:
        drop = [e for e in found if not e.source_ok or (cutoff is not None and e.last_used_s < cutoff)]
    else:
        total = sum(e.size_bytes for e in found)
        print(f"{root / 'replay'}: {len(found)} entries, {total / 1e6:.1f} MB "
              f"({sum(not e.source_ok for e in found)} of traces gone or changed; set $MOEBITS_CACHE to move it)")
        return 0
    for e in drop:
        shutil.rmtree(e.path, ignore_errors=True)
    print(f"removed {len(drop)} of {len(found)} entries ({sum(e.size_bytes for e in drop) / 1e6:.1f} MB) "
          f"from {root / 'replay'}")
    return 0
