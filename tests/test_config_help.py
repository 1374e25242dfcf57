"""`moe-lens train --help` is built from RunConfig's own field comments (moe_lens/config_help.py)."""
from __future__ import annotations

import inspect
import os
import re
from dataclasses import fields

from moe_lens.cli import build_parser
from moe_lens.config import CHOICES, RunConfig
from moe_lens.config_help import field_help, groups


def _train_help() -> str:
    os.environ["COLUMNS"] = "100000"  # no wrapping (argparse would break words at hyphens)
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    try:
        return " ".join(sub.choices["train"].format_help().split())
    finally:
        del os.environ["COLUMNS"]


def test_every_field_has_help_text() -> None:
    helps = field_help()
    lacking = [f.name for f in fields(RunConfig) if not helps.get(f.name) or not helps[f.name].text]
    assert not lacking, f"RunConfig fields without a trailing comment (moe_lens/config.py): {', '.join(lacking)}"


def test_help_text_is_the_fields_comment_in_its_group() -> None:
    src = inspect.getsource(RunConfig)
    group, want = None, {}
    for line in src.splitlines():  # an independent, simpler reading of the same source
        if line.strip() in ("# data", "# model", "# router", "# optim", "# recording"):
            group = line.strip()[2:]
        elif (m := re.match(r"\s+(\w+): .*?  # (.*)$", line)) and group:
            want[m.group(1)] = (group, m.group(2))
    got = field_help()
    assert list(groups()) == ["data", "model", "router", "optim", "recording"]
    for name, (g, comment) in want.items():
        assert got[name].group == g and got[name].text.startswith(comment), name
    assert got["record_tokens"].text.endswith("holds only the tokens of recorded batches")  # continued comment


def test_train_help_shows_comments_groups_and_choices() -> None:
    text = _train_help()
    for g in ("data", "model", "router", "optim", "recording"):
        assert f"{g} (RunConfig):" in text
    for f in fields(RunConfig):
        assert "--" + f.name.replace("_", "-") in text
        assert " ".join(field_help()[f.name].text.split()) in text, f.name
    for name in ("mode", "dataset", "router", "expert_type", "dispatch", "router_init", "device"):
        assert "choices: " + ", ".join(CHOICES[name]) in text, name
    assert "'hybrid'" not in text and "hybrid" in text
