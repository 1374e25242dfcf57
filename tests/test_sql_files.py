"""Every .sql file ships as package data, documents its formula and binds values only as parameters."""
from __future__ import annotations

import re
from importlib import resources

import pytest

SQL = sorted(p.name for p in resources.files("moe_lens").joinpath("sql").iterdir() if p.name.endswith(".sql"))


def test_there_are_analyses() -> None:
    assert {"load_balance.sql", "collapse.sql", "router_confidence.sql", "specialization.sql",
            "stability.sql", "agreement.sql", "capacity.sql"} <= set(SQL)


@pytest.mark.parametrize("name", SQL)
def test_sql_file_is_documented_and_parameterised(name: str) -> None:
    text = resources.files("moe_lens").joinpath("sql", name).read_text()
    assert text.startswith("-- "), f"{name} opens with a comment that states what it computes"
    assert "{" not in re.sub(r"--.*", "", text), f"{name} has a format placeholder"
    assert "$" in text or "FROM per_expert" in text, f"{name} takes no parameters"
