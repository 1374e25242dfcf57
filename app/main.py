"""moe-lens app: `streamlit run app/main.py [-- --runs-dir D]` (or `moe-lens app`), one page per question.

Pages (app/pages/): Runs, Load balance, Collapse, Specialization, Clusters, Layers, Compare, SQL. Every number
comes from `moe_lens.analysis` (the SQL layer); the pages draw the small DataFrames it returns.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # lens_ui, for the pages
import streamlit as st  # noqa: E402

import lens_ui as ui  # noqa: E402

st.set_page_config(page_title="moe-lens", layout="wide")
PAGES = [
    st.Page("pages/runs.py", title="Runs", default=True),
    st.Page("pages/load_balance.py", title="Load balance"),
    st.Page("pages/collapse.py", title="Collapse"),
    st.Page("pages/specialization.py", title="Specialization"),
    st.Page("pages/clusters.py", title="Clusters"),
    st.Page("pages/layers.py", title="Layers"),
    st.Page("pages/compare.py", title="Compare"),
    st.Page("pages/sql.py", title="SQL"),
]
page = st.navigation(PAGES)
ui.sidebar()
ui.require_runs()
ui.damage_banner()
page.run()
