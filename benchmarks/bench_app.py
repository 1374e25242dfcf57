"""Time to render each app page with AppTest: on sample_runs/ (target <= 2 s) and on a generated
10-million-token trace (target <= 5 s).

    python benchmarks/bench_app.py [--tokens 10000000] [--repeats 3] [--work DIR]

The generated directory holds one noisy_topk run: `tokens` routing rows per epoch in train and valid
(top-2: 2 x tokens rows each), hidden states for a 1000-token sample. It is written once under --work and
reused. Each page is rendered once cold (connection opened, nothing cached: what a user waits for the first
time) and then `--repeats` times warm in the same AppTest (Streamlit's caches filled), median reported.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from moe_lens.app_pages import NAMES as PAGES, page as registered  # noqa: E402
from moe_lens.synthetic import write_synthetic_run  # noqa: E402



def render(runs_dir: Path, page: str, repeats: int) -> tuple[float, float]:
    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=300)
    at.session_state["runs_dir"] = str(runs_dir)
    at.session_state["clusters_method"] = "PCA"  # UMAP runs in the background; its cache is what reloads read
    if page == "sql":
        at.session_state["sql_query"] = "SELECT expert, count(*) FROM routing WHERE rank = 0 GROUP BY ALL"
    at.run()
    if not registered(page).default:
        at.switch_page(registered(page).file)
    t = time.perf_counter()
    at.run()
    if page == "sql":
        at.button(key="sql_run").click().run()
    cold = time.perf_counter() - t
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    warm = []
    for _ in range(repeats):
        t = time.perf_counter()
        at.run()
        warm.append(time.perf_counter() - t)
    return cold, statistics.median(warm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=10_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default="/tmp/moe-lens-bench-app")
    args = ap.parse_args()
    big = Path(args.work) / f"runs-{args.tokens}"
    if not (big / "big" / "run.json").exists():
        t = time.perf_counter()
        write_synthetic_run(big, "big", num_tokens=args.tokens, epochs=1, steps_per_epoch=200, with_hidden=True,
                            d_model=64, skew=0.3)
        print(f"wrote {big} in {time.perf_counter() - t:.0f} s", flush=True)
    dirs = [("sample_runs", ROOT / "sample_runs", 2.0), (f"{args.tokens / 1e6:g}M tokens", big, 5.0)]
    print(f"{'runs':<14} {'page':<15} {'cold s':>7} {'warm s':>7} {'target':>7}")
    for label, d, target in dirs:
        if not d.is_dir():
            print(f"{label:<14} (missing: skipped)")
            continue
        for page in PAGES:
            cold, warm = render(d, page, args.repeats)
            flag = "" if cold <= target else "  over"
            print(f"{label:<14} {page:<15} {cold:7.2f} {warm:7.2f} {target:7.1f}{flag}", flush=True)


if __name__ == "__main__":
    main()
