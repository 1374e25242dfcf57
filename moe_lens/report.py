"""`moe-lens report RUN [RUN ...]`: a one-screen text summary per run, and an optional standalone HTML report.

The text shows the run's config line, a `DAMAGED:` line per damaged file of the run (left out of the
numbers; invalid run.json/config.json named with file and line), its final metrics (metrics.parquet), load balance (CV^2, max/mean,
Gini), collapse (normalised entropy, effective experts, dead experts, experts never chosen first, collapse step), router confidence and
the top POS tags per expert by lift. Every number comes from `moe_lens.analysis` (formulas there).
`--html FILE` writes one self-contained Plotly page (plotly.js inlined: opens offline).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import duckdb
import pandas as pd

from moe_lens import analysis as A
from moe_lens.analysis.registry import ANALYSES
from moe_lens.errors import MoeLensError
from moe_lens.store import connect, default_runs_dir


def _try(fn, *args, **kw) -> pd.DataFrame:
    """An analysis, or an empty frame when the run lacks what it needs (no train split, no POS tags)."""
    try:
        return fn(*args, **kw)
    except MoeLensError:
        return pd.DataFrame()


def summary(con: duckdb.DuckDBPyConnection, run: str, *, split: str = "valid", layer: int = 0) -> str:
    """The text summary of one run (about 20 lines)."""
    info = con.execute("SELECT * FROM runs WHERE run = ?", [run]).df()
    if info.empty:
        known = ", ".join(r[0] for r in con.execute("SELECT run FROM runs ORDER BY run").fetchall())
        raise MoeLensError(f"unknown run {run!r}; available: {known or '(none)'}")
    c = info.iloc[0]
    lines = [f"== {run}  [{c['status']}]  mode={c['mode']} dataset={c['dataset']} router={c['router']} "
             f"experts={c['num_experts']} top_k={c['top_k']} step={c['step']} epoch={c['epoch']}"]
    if c.get("problems"):  # damaged files (moe_lens.health): left out of every number below
        lines += [f"DAMAGED:  {p}" for p in c["problems"].split("; ")]
    fm = A.final_metrics(con, run)
    if not fm.empty:
        lines.append("final:    " + "  ".join(f"{s}_{n}={v:.4g}" for s, n, v in fm[["split", "name", "value"]].itertuples(index=False)))
    bal = _try(A.load_balance, con, run, split=split, layer=layer)
    if bal.empty:
        lines.append(f"(no routing recorded for split={split!r}, layer={layer})")
        return "\n".join(lines)
    b = bal.iloc[-1]
    lines.append(f"balance:  epoch {b['epoch']}  CV^2 load={b['cv2_load']:.4f} importance={b['cv2_importance']:.4f}  "
                 f"max/mean={b['max_over_mean']:.3f}  Gini={b['gini']:.3f}")
    # every number on the line is from `split` at its last epoch, except the collapse step, which is a train step
    k = A.collapse(con, run, split=split, by="epoch", layer=layer).iloc[-1]
    train = _try(A.collapse, con, run, split="train", layer=layer)
    step = train["collapse_step"].iloc[-1] if not train.empty else None
    lines.append(f"collapse: {split} epoch {k['epoch']}  H/ln e={_fmt(k['norm_entropy'])}  "
                 f"effective experts={k['effective_experts']:.2f}  dead={k['dead_experts']}  "
                 f"never top-1={k['never_top1']}  (train) collapse step={_fmt(step)}")
    conf = A.router_confidence(con, run, split=split, layer=layer).iloc[-1]
    lines.append(f"router:   top-1 gate={conf['top1_gate']:.3f}  margin={_fmt(conf['margin'])}  entropy={conf['entropy']:.3f} nats")
    spec = _try(A.specialization, con, run, split=split, layer=layer, top=3, order_by="lift", min_count=20)
    if not spec.empty:
        s = spec.iloc[0]
        lines.append(f"POS:      NMI={_fmt(s['nmi'])} AMI={_fmt(s['ami'])} MI={_fmt(s['mi'])} nats "
                     f"(chance NMI {_fmt(s['nmi_chance'])})  top tags by lift:")
        for expert, g in spec.sort_values("lift", ascending=False).groupby("expert"):
            tags = ", ".join(f"{v} x{l:.1f}" for v, l in zip(g["value"], g["lift"]))
            lines.append(f"  expert {expert:>2}: {tags}")
    return "\n".join(lines)


def _fmt(x: object) -> str:
    return "n/a" if x is None or pd.isna(x) else f"{x:.4g}"


def html_report(con: duckdb.DuckDBPyConnection, runs: list[str], path: str | Path, *, split: str = "valid") -> Path:
    """A standalone HTML page: per-expert share by epoch, effective experts over steps, NMI by attribute."""
    import plotly.express as px
    import plotly.io as pio

    figs = [px.bar(A.load_balance(con, runs, split=split, per_expert=True, layer=0), x="epoch", y="share", color="expert",
                   facet_col="run", title=f"Expert token share per epoch ({split})")]
    col = _try(A.collapse, con, runs, layer=0)
    if not col.empty:
        figs.append(px.line(col, x="step", y="effective_experts", color="run", title="Effective number of experts exp(H), train"))
    figs.append(px.line(A.router_confidence(con, runs, split=split, layer=0), x="epoch", y=["top1_gate", "entropy"],
                        facet_col="run", title="Router confidence"))
    nmi = [s.assign(attribute=a) for a in ("pos_tag", "freq_band", "position_band")
           if not (s := _try(A.specialization, con, runs, attribute=a, split=split, summary=True, layer=0)).empty]
    if nmi:
        figs.append(px.bar(pd.concat(nmi), x="attribute", y=["nmi", "ami", "nmi_shuffled", "nmi_chance"],
                           barmode="group", facet_col="run",
                           title="NMI and AMI (expert; attribute) vs shuffled attribute and expected chance"))
    text = "".join(f"<pre>{summary(con, r, split=split)}</pre>" for r in runs)
    body = "".join(pio.to_html(f, full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(figs))
    out = Path(path)
    out.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>moe-lens report</title></head>"
                   f"<body><h1>moe-lens report</h1>{text}{body}</body></html>")
    return out


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("report", help="one-screen summary of recorded runs (and an HTML report)",
                              description="Analyses: " + ", ".join(a.name for a in ANALYSES if a.report) + ".")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directory names under --runs-dir")
    p.add_argument("--runs-dir", default=None, help="runs directory (default: runs, else sample_runs)")
    p.add_argument("--split", default="valid", help="eval split to summarise (default: valid)")
    p.add_argument("--html", default=None, metavar="FILE", help="also write a standalone Plotly HTML report")
    p.set_defaults(func=_report_command)


def _report_command(args: argparse.Namespace) -> int:
    con = connect(args.runs_dir or default_runs_dir())
    print("\n\n".join(summary(con, r, split=args.split) for r in args.runs))
    if args.html:
        print(f"wrote {html_report(con, args.runs, args.html, split=args.split)}")
    return 0
