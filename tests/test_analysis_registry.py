"""The analyses registry (moe_lens/analysis/registry.py) against the code: every .sql file is an analysis's or a
listed helper's, every analysis loads exactly the SQL it registers (spied on a synthetic run), the app pages it
names are the pages that call it, and `moe-lens figure` offers the registry's kinds."""
from __future__ import annotations

import ast
import importlib
from importlib import resources
from pathlib import Path

import pytest

import moe_lens.analysis as A
from moe_lens import app_pages, figures
from moe_lens.analysis import _query
from moe_lens.analysis.registry import ANALYSES, BY_NAME, FIGURE_KINDS, HELPER_SQL, analysis
from moe_lens.cli import build_parser
from moe_lens.store import connect
from moe_lens.synthetic import write_synthetic_ablation, write_synthetic_run

ROOT = Path(__file__).resolve().parents[1]
SQL = {p.name[:-4] for p in resources.files("moe_lens").joinpath("sql").iterdir() if p.name.endswith(".sql")}
# stability.sql packs a token's experts over epochs into one HUGEINT; stability_sorted.sql is the same numbers
# when the packing does not fit (analysis/stability.py `_stability_sql`), so one call loads one of the two.
ONE_OF = {"stability": {"stability", "stability_sorted"}}
MODULES = [importlib.import_module(f"moe_lens.analysis.{m}")  # each holds its own `sql_text` name
           for m in ("_query", "balance", "compare", "depth", "specialization", "stability", "literature",
                     "bootstrap", "ablation", "probe_routing")]


def test_every_sql_file_is_an_analysis_or_a_helper() -> None:
    used = {s for a in ANALYSES for s in a.sql} | set(HELPER_SQL)
    assert SQL - used == set(), f"moe_lens/sql files no analysis registers: {sorted(SQL - used)}"
    assert used - SQL == set(), f"registered SQL files that do not exist: {sorted(used - SQL)}"


def test_every_registered_function_is_the_public_one() -> None:
    for a in ANALYSES:
        assert getattr(A, a.name) is a.fn, a.name
        assert a.about and "\n" not in a.about, a.name
    with pytest.raises(ValueError, match="unknown analysis 'nope'.*load_balance"):
        analysis("nope")


@pytest.fixture(scope="module")
def con(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("registry")
    write_synthetic_run(d, "a", num_tokens=400, layers=2, num_experts=4, top_k=2, capacity_factor=1.0,
                        drop_rate=0.1)
    write_synthetic_run(d, "b", num_tokens=400, num_experts=4, top_k=2, seed=1)
    write_synthetic_ablation(d / "a")  # what `moe-lens ablate` would write (the synthetic run has no checkpoint)
    return connect(d)


# one or more calls per analysis; together they take each branch that loads a different .sql file
CALLS = {
    "load_balance": [dict(runs="a"), dict(runs="a", per_expert=True)],
    "collapse": [dict(runs="a")],
    "router_confidence": [dict(runs="a")],
    "capacity": [dict(runs="a")],
    "specialization": [dict(runs="a")],
    "stability": [dict(runs="a")],
    "agreement": [dict(run_a="a", run_b="b")],
    "final_metrics": [dict(runs="a")],
    "metric_curves": [dict(runs="a")],
    "compare": [dict(runs=["a", "b"])],
    "contexts": [dict(run="a", split="valid", layer=0, expert=0, token="the")],
    "routing_paths": [dict(runs="a")],
    "layer_transitions": [dict(runs="a", layer_a=0, layer_b=1)],
    "coactivation": [dict(runs="a")],
    "recorded_layers": [dict(runs="a")],
    "consecutive": [dict(runs="a")],
    "saturation": [dict(runs="a")],
    "vocabulary": [dict(runs="a")],
    "fluctuation": [dict(runs="a")],
    "pos_probe": [dict(runs="a")],
    "ablation": [dict(runs="a")],
    "ablation_by": [dict(runs="a")],
    "ablation_importance": [dict(runs="a")],
}


def test_calls_cover_the_registry() -> None:
    assert set(CALLS) == set(BY_NAME)


@pytest.mark.parametrize("name", [a.name for a in ANALYSES])
def test_analysis_loads_the_sql_it_registers(con, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    loaded: list[str] = []
    sql_text = _query.sql_text

    def spy(stem: str) -> str:
        loaded.append(stem)
        return sql_text(stem)

    for module in MODULES:
        monkeypatch.setattr(module, "sql_text", spy)
    a = BY_NAME[name]
    for kw in CALLS[name]:
        a.fn(con, **kw)
    own = set(loaded) - (set(HELPER_SQL) - set(a.sql))  # recorded_layers is an analysis and a helper
    if name == "compare":  # composes the other analyses: their SQL, none of its own
        assert a.sql == () and own <= {s for b in ANALYSES for s in b.sql}
        return
    expected = set(a.sql)
    if name in ONE_OF:
        assert len(own & ONE_OF[name]) == 1, loaded
        expected -= ONE_OF[name] - own
    assert own == expected, f"{name} loaded {sorted(set(loaded))}, registers {sorted(a.sql)}"


def _called(page: Path) -> set[str]:
    """Registered analysis names a page mentions: `ui.get("name")`, `analysis.name(`, `ui.name(`, CHARTS tuples."""
    tree = ast.parse(page.read_text())
    names = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    return names & set(BY_NAME)


@pytest.mark.parametrize("page", app_pages.PAGES, ids=app_pages.NAMES)
def test_pages_listed_are_the_pages_calling(page: app_pages.Page) -> None:
    registered = {a.name for a in ANALYSES if page.name in a.pages}
    assert _called(ROOT / "app" / page.file) == registered


def test_registered_pages_exist() -> None:
    for a in ANALYSES:
        for p in a.pages:
            app_pages.page(p)  # ValueError naming the pages otherwise


def test_figure_kinds_come_from_the_registry(con) -> None:
    assert figures.KINDS == tuple(FIGURE_KINDS) == ("collapse", "collapse-curve", "specialization", "nmi",
                                                    "coactivation", "consecutive", "saturation", "vocabulary",
                                                    "fluctuation", "pos-probe", "ablation", "ablation-importance")
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["figure"]
    kind = next(a for a in sub._actions if a.dest == "kind")
    assert tuple(kind.choices) == figures.KINDS
    for k in FIGURE_KINDS:  # each registered kind has a builder
        fig, table = figures.build(con, k, ["a"])
        assert len(fig.data) and not table.empty, k
