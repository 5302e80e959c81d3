"""The project's one figure style: paper-ready matplotlib figures for every command that draws.

- **Size and fonts**: figures are sized in inches of a paper's column (:data:`COLUMN_IN`, a
  two-column paper's text width :data:`PAGE_IN`), with every font at least :data:`FONT_PT`
  points at that size, so a figure printed at its own width keeps readable text.
- **Colours and markers**: Okabe & Ito's colour-blind-safe palette plus Paul Tol's muted
  colours for the rest; every policy has its own colour *and* its own marker
  (:func:`policy_style`), so LRU/LFU or the two static policies never look alike, even in grey.
- **Files**: :func:`save` writes a vector PDF and a 300-dpi PNG of the same figure.
- **Log axes**: :func:`log_axis` labels ticks with plain numbers densely enough that a band
  inside one decade (a 13.7 ms decode TPOT) can be read off.

matplotlib is imported inside the functions: importing this module stays free of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

COLUMN_IN = 3.5  # one column of a two-column paper, inches
PAGE_IN = 7.0  # the full text width
FONT_PT = 8.0  # the smallest font anywhere in a figure
DPI = 300  # the raster copy's resolution

# Okabe & Ito (2008) without its yellow, then Paul Tol's muted scheme; the yellow (hard to see on
# white) last.
PALETTE = (
    "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000",
    "#332288", "#882255", "#117733", "#999933", "#44AA99", "#AA4499", "#F0E442",
)
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p", "d", "8")
LINESTYLES = ("-", "--", ":", "-.")

# Fixed positions for the known policies, so a policy looks the same in every figure of every report.
POLICY_ORDER = ("static_uniform", "static_frequency", "mxmoe", "routernorm", "lru_offload", "lfu_offload",
                "oracle", "dynaexq", "dynamo", "dymoe", "hobbit")

RC = {
    "font.size": FONT_PT,
    "axes.titlesize": FONT_PT,
    "axes.labelsize": FONT_PT,
    "xtick.labelsize": FONT_PT,
    "ytick.labelsize": FONT_PT,
    "legend.fontsize": FONT_PT,
    "figure.titlesize": FONT_PT + 1,
    "axes.prop_cycle": None,  # filled in by rc() (needs matplotlib's cycler)
    "lines.linewidth": 1.2,
    "lines.markersize": 4.5,
    "axes.grid": True,
    "grid.linewidth": 0.4,
    "grid.alpha": 0.5,
    "legend.frameon": False,
    "figure.constrained_layout.use": True,
    "savefig.dpi": DPI,
    "pdf.fonttype": 42,  # TrueType in PDFs: editable text, accepted by publishers
    "ps.fonttype": 42,
}


def rc() -> dict[str, Any]:
    """The rcParams of the style (with the palette as colour cycle)."""
    from cycler import cycler

    return {**RC, "axes.prop_cycle": cycler(color=list(PALETTE))}


@contextlib.contextmanager
def paper_style() -> Iterator[Any]:
    """``with paper_style() as plt:`` draws with the Agg backend in the project's style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context(rc()):  # type: ignore[arg-type]
        yield plt


def figure_size(columns: int = 1, rows: int = 1, width_in: float | None = None,
                panel_h_in: float = 2.2) -> tuple[float, float]:
    """Width and height (inches) of a figure of ``rows`` panels high: one column wide, or
    the page's width for ``columns`` > 1 panels (wider still beyond 3 panels across)."""
    if width_in is None:
        width_in = COLUMN_IN if columns == 1 else max(PAGE_IN, 2.4 * columns)
    return width_in, panel_h_in * rows + 0.5


def _ordered(names: Sequence[str]) -> list[str]:
    seen = list(dict.fromkeys(names))
    return [p for p in POLICY_ORDER if p in seen] + sorted(p for p in seen if p not in POLICY_ORDER)


def policy_style(labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """A colour, marker and line style per line label (``policy`` or ``policy variant``).

    A policy keeps its own colour and marker in every figure (known policies by
    :data:`POLICY_ORDER`, others after them by name). Variants of one policy
    (``dynaexq int8/int2``) keep the policy's marker and differ by colour and line style."""
    names = list(dict.fromkeys(labels))
    policies = _ordered([*POLICY_ORDER, *(n.split(" ")[0] for n in names)])
    variants: dict[str, list[str]] = {}
    for name in names:
        policy, _, variant = name.partition(" ")
        variants.setdefault(policy, []).append(variant)
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        policy, _, variant = name.partition(" ")
        i = policies.index(policy)
        j = sorted(variants[policy]).index(variant)  # the plain policy ("") first
        out[name] = {"color": PALETTE[(i + 3 * j) % len(PALETTE)], "marker": MARKERS[i % len(MARKERS)],
                     "ls": LINESTYLES[j % len(LINESTYLES)]}
    return out


def log_axis(ax: Any, which: str, values: Any, min_span: float = 4.0) -> bool:
    """Make ``which`` ('x' or 'y') of ``ax`` a log axis with plain-number tick labels, when the
    positive finite ``values`` span at least ``min_span`` (else leave it linear); returns
    whether it did. Within one decade the 1, 2, 3, 5, 7 x 10^n ticks are labelled, within 2.5
    decades 1, 2, 5 x 10^n, beyond that the powers of ten: a value inside a decade has labelled
    ticks on both sides of it, and labels do not collide in a narrow panel."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size == 0 or v.max() / v.min() < min_span:
        return False
    decades = np.log10(v.max() / v.min())
    subs = (1.0, 2.0, 3.0, 5.0, 7.0) if decades <= 1 else (1.0, 2.0, 5.0) if decades <= 2.5 else (1.0,)
    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis.set_major_locator(LogLocator(subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:g}"))
    axis.set_minor_locator(LogLocator(subs="auto"))
    axis.set_minor_formatter(NullFormatter())
    return True


def save(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as ``<stem>.pdf`` (vector) and ``<stem>.png`` (300 dpi) beside each other;
    returns the PNG's path (for Markdown)."""
    import matplotlib.pyplot as plt

    base = Path(path).with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(base.with_suffix(".pdf"))
        fig.savefig(base.with_suffix(".png"), dpi=DPI)
    finally:
        plt.close(fig)
    return base.with_suffix(".png")
