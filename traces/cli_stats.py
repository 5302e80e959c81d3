"""``moebits traces stats TRACE``: routing statistics per layer and overall.

Prints a table (or one JSON object with ``--json``) and optionally writes a figure. The
statistics and their exact definitions are in :mod:`traces.stats`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from moebits.core.plotstyle import PAGE_IN, paper_style, save
from moebits.traces.format import Phase, read_trace
from moebits.traces.stats import StatsRow, TraceStats, compute_stats, uniform_top_share

HELP = """\
statistics (per MoE layer present, and overall):
  activations                expert selections (rows x k); overall: the sum
  distinct_experts           experts used at least once
  top10_share                share of activations taken by the ceil(0.1 E) hottest experts
  experts_for_90pct_mass     fewest experts covering 90% of the activations (and as a fraction of E)
  reuse                      per token with a previous token (step - 1) of its sequence at the same
                             layer: fraction of its k experts that token also used (random ~ k/E)
  next_layer_predictability  a table learned from the trace counts, per expert a at layer l, its
                             most frequent successor succ(a) at the next layer present l' (lowest
                             id on ties; from at most ~2^19 token pairs); per token,
                             the fraction of its l' experts in {succ(a) : a in its l experts}
                             (reported at layer l; in-sample)
  gate_entropy               mean entropy (nats) of a token's gates normalised to sum 1 (null: no gates)
overall: activation-weighted mean over layers; reuse, predictability and entropy pool all tokens.
--phase cuts the trace to that phase first (reuse pairs then lie inside it).
"""

_COLUMNS = (
    ("layer", "layer", "{}"),
    ("activations", "activations", "{:,}"),
    ("distinct", "distinct_experts", "{:.1f}"),
    ("top10", "top10_share", "{:.3f}"),
    ("n90", "experts_for_90pct_mass", "{:.1f}"),
    ("n90/E", "experts_for_90pct_frac", "{:.3f}"),
    ("reuse", "reuse", "{:.3f}"),
    ("next_pred", "next_layer_predictability", "{:.3f}"),
    ("gate_H", "gate_entropy", "{:.3f}"),
)
_PHASES = {"all": None, "prefill": Phase.PREFILL, "decode": Phase.DECODE}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stats",
        help="routing statistics of a trace: skew, reuse, cross-layer predictability, gate entropy",
        description="Routing statistics of a moebits trace, per MoE layer and overall.",
        epilog=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("trace", help="a moebits .parquet trace")
    p.add_argument("--phase", choices=tuple(_PHASES), default="all", help="rows to use (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object (overall, layers) instead of a table")
    p.add_argument("--plot", metavar="FILE.png", help="write a figure (FILE.pdf and a 300-dpi FILE.png): "
                   "top-10%% share, reuse, popularity heat map")
    p.set_defaults(func=run)


def _cell(row: StatsRow, key: str, fmt: str) -> str:
    value = getattr(row, key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def format_table(st: TraceStats) -> str:
    """The statistics as a fixed-width text table, layers then an ``all`` row."""
    head = [name for name, _, _ in _COLUMNS]
    body = [[_cell(r, key, fmt) for _, key, fmt in _COLUMNS] for r in st.layers]
    body.append(["all"] + [_cell(st.overall, key, fmt) for _, key, fmt in _COLUMNS[1:]])
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = [
        f"{st.model}: {st.experts} experts, top-{st.top_k}; phase {st.phase}, {st.tokens:,} tokens",
        "  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)),
    ]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in body]
    return "\n".join(lines)


def _json_safe(obj: object) -> object:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def to_json(st: TraceStats) -> str:
    """The statistics as one JSON object (NaN written as null)."""
    return json.dumps(_json_safe(st.to_dict()), indent=2)


def plot_stats(st: TraceStats, path: Path, title: str) -> None:
    """Three panels: per-layer top-10% share (against uniform routing's), per-layer reuse and
    next-layer predictability (against random), layer x expert popularity. Written as PDF and
    PNG (:mod:`core.plotstyle`)."""
    layers = [r.layer for r in st.layers]
    x = range(len(layers))
    uniform = uniform_top_share(st.experts)
    with paper_style() as plt:
        fig, axes = plt.subplots(3, 1, figsize=(PAGE_IN, 8.0), height_ratios=(1, 1, 2))
        axes[0].bar(x, [r.top10_share for r in st.layers], color="#D55E00")
        axes[0].axhline(uniform, color="0.3", lw=0.8, ls="--", label=f"uniform routing ({uniform:.3g})")
        axes[0].set_ylabel("top-10% share")
        axes[0].legend(loc="lower right")
        reuse = [math.nan if r.reuse is None else r.reuse for r in st.layers]
        axes[1].plot(x, reuse, marker="o", label="reuse")
        pred = [math.nan if r.next_layer_predictability is None else r.next_layer_predictability for r in st.layers]
        axes[1].plot(x, pred, marker="s", label="next-layer predictability")
        axes[1].axhline(st.top_k / st.experts, color="0.3", lw=0.8, ls="--", label="random (k/E)")
        axes[1].set_ylabel("fraction of k experts")
        axes[1].set_ylim(0, 1.05)
        axes[1].legend(loc="upper right", ncols=3)
        step = max(1, len(layers) // 24)  # at most ~24 labelled layers at 8 pt
        for ax in axes[:2]:
            ax.set_xticks(list(x)[::step], [str(v) for v in layers][::step])
            ax.set_xlabel("MoE layer")
        share = st.popularity / st.popularity.sum(axis=1, keepdims=True).clip(min=1)
        im = axes[2].imshow(share, aspect="auto", interpolation="nearest", cmap="viridis")
        axes[2].set_yticks(list(x)[::step], [str(v) for v in layers][::step])
        axes[2].set_xlabel("expert id")
        axes[2].set_ylabel("MoE layer")
        axes[2].grid(False)
        fig.colorbar(im, ax=axes[2], label="share of the layer's activations")
        fig.suptitle(f"{title}: {st.model}, phase {st.phase}, {st.tokens:,} tokens")
        try:
            save(fig, path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot write the plot {path}: {exc}") from None


def run(args: argparse.Namespace) -> int:
    trace = read_trace(args.trace)
    st = compute_stats(trace, _PHASES[args.phase])
    print(to_json(st) if args.json else format_table(st))
    if args.plot:
        plot_stats(st, Path(args.plot), Path(args.trace).name)
    return 0
