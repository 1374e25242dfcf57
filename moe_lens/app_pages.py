"""The app's pages, written once: app/main.py builds its navigation from PAGES, `moe-lens app --help` lists
them, and the app tests (AppTest, damage, layer picker, headless browser) and benchmarks/bench_app.py
iterate over them. A new page is one file under app/pages/ plus one line here (and its test).

Data only (no streamlit import), so the CLI and the tests read it without starting the app; `moe_lens`
imports nothing from app/ (docs/architecture.md).
"""
from __future__ import annotations

from typing import NamedTuple


class Page(NamedTuple):
    name: str                 # the file's stem: AppTest's `switch_page(f"pages/{name}.py")`, the URL path
    title: str                # the navigation label and the page's st.title
    icon: str | None = None   # st.Page(icon=...); None draws no icon (today's look)
    default: bool = False     # the page `/` opens (exactly one)

    @property
    def file(self) -> str:
        """Path relative to app/, as st.Page and AppTest.switch_page take it."""
        return f"pages/{self.name}.py"

    @property
    def url_path(self) -> str:
        """What a browser opens: `/` for the default page, else `/<name>` (Streamlit's rule for st.Page)."""
        return "" if self.default else self.name


# In navigation order.
PAGES: tuple[Page, ...] = (
    Page("runs", "Runs", default=True),
    Page("load_balance", "Load balance"),
    Page("collapse", "Collapse"),
    Page("specialization", "Specialization"),
    Page("clusters", "Clusters"),
    Page("layers", "Layers"),
    Page("literature", "Literature"),
    Page("compare", "Compare"),
    Page("sql", "SQL"),
)
NAMES: tuple[str, ...] = tuple(p.name for p in PAGES)
assert sum(p.default for p in PAGES) == 1, "exactly one default page"


def page(name: str) -> Page:
    """The registered page called `name`; ValueError naming the allowed ones otherwise."""
    for p in PAGES:
        if p.name == name:
            return p
    raise ValueError(f"unknown app page {name!r} (pages: {', '.join(NAMES)})")
