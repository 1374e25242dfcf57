"""Analysis scaling: time every registered analysis and every app page on synthetic traces of several sizes.

    python benchmarks/bench_sql.py --rows 20M,100M,200M [--repeat 5] [--work-dir DIR] [--pages-at 100M]

Each size N is one synthetic run `bench` (`moe_lens.synthetic`, noisy_topk, 8 experts, top-2, 2 MoE layers,
splits train + valid, 10 epochs, 100 steps per epoch: N / 80 tokens per split, N routing rows) plus a second run
`bench-b` (valid only, another seed) for `agreement`. Traces are written once, streamed (1M tokens per chunk,
2M-row part files), under --work-dir (default ~/.cache/moe-lens/bench/rows-N), never into the repository.

Every analysis of `moe_lens.analysis.registry.ANALYSES` is timed with the arguments in ARGS (analyses added to
the registry later run as `fn(con, "bench")`; one that fails prints its error instead of a time), plus the
heavier full-series variants in EXTRA, and every app page of `moe_lens.app_pages.PAGES` is rendered with
Streamlit's AppTest. Analyses run their queries (stored per-token results off, MOE_LENS_STORED_RESULTS=0);
pages read what `moe-lens summarize` stored, as in the app. Each case runs in its own Python process (so its peak RSS, ru_maxrss, is its own): one
warm-up call, then --repeat timed calls, median reported. The connection is `store.connect` with its defaults
(DuckDB threads = cores, memory_limit 4 GB, spilling to the cache directory); per-run summaries and the layers
and literature pages' stored results (what `moe-lens summarize` writes, moe_lens/summary.py) are built before timing (their
build time is printed) unless --no-summaries. Pages also print their first render (the warm-up).
Targets (issue 25): seconds per row at the largest size <= 1.2x that at the smallest; each page <= 5 s at 100M.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from moe_lens.synthetic import write_synthetic_ablation, write_synthetic_run  # noqa: E402 - after the sys.path line

SHAPE = dict(num_experts=8, top_k=2, epochs=10, steps_per_epoch=100, layers=2, specialization=1.0, drop_rate=0.01,
             capacity_factor=1.25, mode="noisy_topk", chunk_tokens=1_000_000)
ROWS_PER_TOKEN = 2 * 10 * 2 * 2  # splits x epochs x layers x top_k
RUN, RUN_B = "bench", "bench-b"

# name -> keyword arguments (the app's default call); "runs" is the run under test
ARGS: dict[str, dict] = {
    "agreement": dict(run_a=RUN, run_b=RUN_B),
    "contexts": dict(run=RUN, split="valid", layer=0, expert=0, token="w1"),
    "layer_transitions": dict(runs=RUN, layer_a=0, layer_b=1),
    "compare": dict(runs=[RUN]),
}
EXTRA: dict[str, tuple[str, dict]] = {
    "load_balance (train, per step)": ("load_balance", dict(runs=RUN, split="train", by="step")),
    "load_balance per_expert": ("load_balance", dict(runs=RUN, per_expert=True)),
    "specialization top tokens": ("specialization", dict(runs=RUN, attribute="token", top=10, order_by="lift",
                                                         min_count=20)),
    "stability (last epoch)": ("stability", dict(runs=RUN, epoch=9)),
    "routing_paths (paths table)": ("routing_paths", dict(runs=RUN, summary=False)),
}


def parse_rows(text: str) -> list[int]:
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}
    return [int(float(t[:-1]) * scale[t[-1].upper()]) if t[-1].upper() in scale else int(t)
            for t in text.split(",") if t]


def label(rows: int) -> str:
    return f"{rows / 1e6:g}M"


def ensure_trace(work: Path, rows: int) -> Path:
    """The runs directory with `rows` routing rows in run `bench` (and run `bench-b`), written once."""
    root = work / f"rows-{label(rows)}"
    tokens = rows // ROWS_PER_TOKEN
    for run, seed, splits in ((RUN, 0, ("train", "valid")), (RUN_B, 1, ("valid",))):
        if (root / run / "run.json").exists():
            continue
        shutil.rmtree(root / run, ignore_errors=True)  # a half-written run from an interrupted generation
        t = time.perf_counter()
        write_synthetic_run(root, run, num_tokens=tokens, seed=seed, splits=splits, **SHAPE)
        print(f"wrote {root / run} ({tokens:,} tokens per split) in {time.perf_counter() - t:.0f} s", file=sys.stderr,
              flush=True)
    if not (root / RUN / "ablation").exists():  # what `moe-lens ablate` writes (the valid split's last epoch)
        write_synthetic_ablation(root / RUN)
    return root


def calls() -> dict[str, tuple[str, dict]]:
    """case name -> (registered analysis, kwargs): every registry entry, then EXTRA."""
    from moe_lens.analysis.registry import ANALYSES
    return {a.name: (a.name, ARGS.get(a.name, dict(runs=RUN))) for a in ANALYSES} | EXTRA


def one_analysis(root: Path, case: str, repeat: int) -> dict:
    """Run in a child process: warm-up + `repeat` timed calls of one case."""
    from moe_lens.analysis.registry import BY_NAME
    from moe_lens.store import connect
    name, kw = calls()[case]
    os.environ["MOE_LENS_STORED_RESULTS"] = "0"  # time the analysis's query, not a read of its stored result
    con = connect(root)
    fn = BY_NAME[name].fn
    n = len(fn(con, **kw))  # warm-up (and the summaries' lazy build, should they be missing)
    times, cpu = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), _cpu()
        n = len(fn(con, **kw))
        times.append(time.perf_counter() - t)
        cpu.append(_cpu() - c)
    return dict(median=statistics.median(times), times=times, cpu=statistics.median(cpu), result_rows=n)


def _cpu() -> float:
    """CPU seconds of this process, all threads (user + system): less sensitive than wall time to a shared CPU."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def one_page(root: Path, name: str, repeat: int) -> dict:
    """Run in a child process: a cold render of one page (Streamlit caches cleared, a new connection), repeated."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from moe_lens.app_pages import page
    times, cpu = [], []
    for _ in range(repeat + 1):  # the first is a warm-up (imports, OS file cache)
        st.cache_data.clear()
        st.cache_resource.clear()
        at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=600)
        at.session_state["runs_dir"] = str(root)
        at.session_state["clusters_method"] = "PCA"
        at.run()
        t, c = time.perf_counter(), _cpu()
        if not page(name).default:
            at.switch_page(page(name).file)
        at.run()
        if name == "sql":  # the example query over the whole routing view
            at.button(key="sql_run").click().run()
        times.append(time.perf_counter() - t)
        cpu.append(_cpu() - c)
        errors = [e.value for e in [*at.exception, *at.error]]
        assert not errors, errors
    # first: the warm-up render, which also writes the run's stored per-token results (moe_lens/summary.py) when
    # they are missing; the median is over the renders after it (what every later open of the page costs)
    return dict(median=statistics.median(times[1:]), times=times[1:], cpu=statistics.median(cpu[1:]), first=times[0],
                first_cpu=cpu[0])


def child(args: argparse.Namespace) -> None:
    root = Path(args.child_root)
    try:
        out = (one_page if args.child_kind == "page" else one_analysis)(root, args.child_case, args.repeat)
    except Exception as e:  # noqa: BLE001 - reported in the table, the benchmark goes on
        out = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160])
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out), flush=True)


def run_child(root: Path, kind: str, case: str, repeat: int, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-root", str(root), "--child-kind", kind,
           "--child-case", case, "--repeat", str(repeat)]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return dict(error=f"over {timeout:.0f} s")
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(lines[-1][7:]) if lines else dict(error=(p.stderr.strip().splitlines() or ["?"])[-1][:160])


def build_summaries(root: Path) -> float:
    """What `moe-lens summarize` writes: the routing summaries, the layers page's stored per-token results, the
    literature page's stored tables and the collapse and specialization pages' default intervals."""
    from moe_lens import summary
    from moe_lens.store import connect
    from moe_lens.summarize_cli import store_interval_results, store_layers_results, store_literature_results
    t = time.perf_counter()
    con = connect(root)
    for run in summary.build(con, [RUN, RUN_B]):
        store_layers_results(con, run)
    store_literature_results(con)
    store_interval_results(con)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="20M,100M,200M", help="comma-separated sizes (routing rows of run 'bench')")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--work-dir", default=None, help="where traces are cached (default ~/.cache/moe-lens/bench)")
    ap.add_argument("--pages-at", default="100M", help="sizes whose app pages are rendered ('all', 'none')")
    ap.add_argument("--only", default=None, help="comma-separated case names (default: all)")
    ap.add_argument("--generate-only", action="store_true", help="write the traces and stop")
    ap.add_argument("--no-summaries", action="store_true", help="time without per-run summaries (full scans)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per case (all its repetitions)")
    ap.add_argument("--child-root", help=argparse.SUPPRESS)
    ap.add_argument("--child-kind", help=argparse.SUPPRESS)
    ap.add_argument("--child-case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_root:
        if args.no_summaries or os.environ.get("MOE_LENS_SUMMARIES") == "0":
            os.environ["MOE_LENS_SUMMARIES"] = "0"
        return child(args)
    if args.no_summaries:
        os.environ["MOE_LENS_SUMMARIES"] = "0"  # inherited by the child processes
    work = Path(args.work_dir or Path(os.environ.get("MOE_LENS_CACHE", "~/.cache/moe-lens")) / "bench").expanduser()
    sizes = parse_rows(args.rows)
    pages_at = sizes if args.pages_at == "all" else [] if args.pages_at == "none" else parse_rows(args.pages_at)
    roots = {rows: ensure_trace(work, rows) for rows in sizes}
    if args.generate_only:
        return
    from moe_lens.app_pages import NAMES
    cases = [("analysis", c) for c in calls()] + [("page", p) for p in NAMES]
    if args.only:
        cases = [(k, c) for k, c in cases if c in args.only.split(",")]
    print(f"# bench_sql: --rows {args.rows} --repeat {args.repeat}; {os.cpu_count()} CPUs; "
          f"summaries {'off' if args.no_summaries else 'on'}", flush=True)
    results: dict[tuple[str, str, int], dict] = {}
    for rows in sizes:
        if not args.no_summaries:
            print(f"summaries of {label(rows)} built (or found) in {build_summaries(roots[rows]):.1f} s", flush=True)
        for kind, case in cases:
            if kind == "page" and rows not in pages_at:
                continue
            r = run_child(roots[rows], kind, case, args.repeat, args.timeout)
            results[(kind, case, rows)] = r
            shown = f"{r['median']:.3f} s  cpu {r['cpu']:.3f} s" if "median" in r else r["error"]
            if "first" in r:
                shown += f"  (first render {r['first']:.3f} s, cpu {r['first_cpu']:.3f} s)"
            print(f"{label(rows):>5} {kind:<8} {case:<32} {shown:>22}  peak RSS {r.get('peak_rss_mb', 0):.0f} MB",
                  flush=True)
    table(results, cases, sizes, args.repeat)


def table(results: dict, cases: list, sizes: list[int], repeat: int) -> None:
    """The markdown table: median wall and CPU seconds and peak RSS per size, and the per-row ratios largest/smallest."""
    head = " | ".join(f"{label(r)} s | {label(r)} cpu s | {label(r)} RSS MB" for r in sizes)
    big, small = label(sizes[-1]), label(sizes[0])
    print(f"\n| case | {head} | s/row {big} / {small} | cpu/row {big} / {small} |")
    print("|---|" + "---|---|---|" * len(sizes) + "---|---|")
    for kind, case in cases:
        cells, per_row = [], []
        for rows in sizes:
            r = results.get((kind, case, rows))
            if r is None:
                cells.append("- | - | -")
            elif "median" in r:
                cells.append(f"{r['median']:.3f} | {r['cpu']:.3f} | {r['peak_rss_mb']:.0f}")
                per_row.append((r["median"] / rows, r["cpu"] / rows))
            else:
                cells.append(f"{r['error']} | - | -")
        ratio = " | ".join(f"{per_row[-1][i] / per_row[0][i]:.2f}" if len(per_row) > 1 and per_row[0][i] else "-"
                           for i in (0, 1))
        name = case if kind == "analysis" else f"page: {case}"
        print(f"| {name} | {' | '.join(cells)} | {ratio} |")
    print(f"\nmedians over {repeat} repetitions after one warm-up; cpu = user + system seconds of the process")


if __name__ == "__main__":
    main()
