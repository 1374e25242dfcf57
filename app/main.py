"""moe-lens app: `streamlit run app/main.py [-- --runs-dir D]` (or `moe-lens app`), one page per question.

Pages: app/pages/, in the order and with the titles of `moe_lens.app_pages.PAGES`, the one list that the
CLI, the tests and the benchmarks read too. Every number comes from `moe_lens.analysis` (the SQL layer); the
pages draw the small DataFrames it returns.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # lens_ui, for the pages
import streamlit as st  # noqa: E402

import lens_ui as ui  # noqa: E402
from moe_lens.app_pages import PAGES  # noqa: E402

st.set_page_config(page_title="moe-lens", layout="wide")
page = st.navigation([st.Page(p.file, title=p.title, icon=p.icon, default=p.default) for p in PAGES])
ui.sidebar()
ui.require_runs()
ui.damage_banner()
page.run()
