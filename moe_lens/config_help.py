"""`--help` text for every RunConfig field, read from the dataclass's own source.

RunConfig is written as groups of fields, each group opened by a comment line (``# data``, ``# model``,
``# router``, ``# optim``, ``# recording``), each field followed by a trailing comment that explains
it; a comment line right after a field continues that field's comment. This module parses that
source (``inspect.getsource``), so the explanation is written once, beside the default, and the CLI,
its ``--help`` and the tests read it from there. Enumerated fields list their choices from
``config.CHOICES``.
"""
from __future__ import annotations

import functools
import inspect
import re
from typing import NamedTuple

from moe_lens.config import CHOICES, RunConfig

_GROUP = re.compile(r"^    # (\w+)\s*$")  # a group header: one word alone on a comment line
_FIELD = re.compile(r"^    (\w+): [^=]+=.*?(?:  # (.*))?$")  # name: type = default  # comment
_MORE = re.compile(r"^    # (.*)$")  # a comment line continuing the previous field's comment


class FieldHelp(NamedTuple):
    group: str  # data | model | router | optim | recording
    text: str  # the trailing comment ('' when the field has none)


@functools.lru_cache(maxsize=1)
def field_help() -> dict[str, FieldHelp]:
    """{field name: FieldHelp} in declaration order, parsed from RunConfig's source."""
    out: dict[str, FieldHelp] = {}
    group, last = "", None
    for line in inspect.getsource(RunConfig).splitlines():
        if line.startswith("    def ") or line.startswith("    @"):
            break  # methods follow the fields
        if m := _GROUP.match(line):
            group, last = m.group(1), None
        elif m := _FIELD.match(line):
            last = m.group(1)
            out[last] = FieldHelp(group, (m.group(2) or "").strip())
        elif (m := _MORE.match(line)) and last is not None:
            out[last] = out[last]._replace(text=f"{out[last].text} {m.group(1).strip()}".strip())
    return out


def help_text(name: str, default: object) -> str:
    """One flag's help: its comment, its choices (enumerated fields) and its default."""
    h = field_help().get(name)
    parts = [h.text] if h is not None and h.text else []
    if name in CHOICES:
        parts.append("choices: " + ", ".join(CHOICES[name]))
    parts.append(f"default: {default}")
    # argparse formats help with %-style: a literal % must be doubled
    return "; ".join(parts).replace("%", "%%")


def groups() -> dict[str, list[str]]:
    """{group: [field names]} in declaration order."""
    out: dict[str, list[str]] = {}
    for name, h in field_help().items():
        out.setdefault(h.group, []).append(name)
    return out
