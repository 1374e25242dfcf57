"""`moe-lens data download {wikitext2,squad,conll2003}` and `moe-lens data info`.

Registered by moe_lens/cli.py through `add_commands(subparsers)`; each handler returns an exit
code. `info` lists, per dataset, the files found under the data directory with sizes and counts.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from moe_lens.data import conll, squad, wikitext
from moe_lens.data.download import CONLL_HELP, download
from moe_lens.data.paths import resolve_cache_dir, resolve_data_dir
from moe_lens.errors import MoeLensError


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="download datasets, show what is installed")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    dl = sub.add_parser("download", help="fetch a dataset (sha256-checked); conll2003: how to obtain it")
    dl.add_argument("dataset", choices=["wikitext2", "squad", "conll2003"])
    dl.add_argument("--data-dir", default=None, help="default: $MOE_LENS_DATA, else ~/.cache/moe-lens/data")
    dl.add_argument("--mirror", default=None, help="base URL replacing the origins (default: $MOE_LENS_MIRROR)")
    dl.add_argument("--no-progress", action="store_true", help="no progress bar")
    dl.set_defaults(func=_download)
    info = sub.add_parser("info", help="show the datasets found, with file sizes and counts")
    info.add_argument("--data-dir", default=None, help="default: $MOE_LENS_DATA, else ~/.cache/moe-lens/data")
    info.set_defaults(func=_info)


def _download(args: argparse.Namespace) -> int:
    if args.dataset == "conll2003":
        print(CONLL_HELP.format(dir=resolve_data_dir(args.data_dir) / "conll2003"))
        return 0
    download(args.dataset, args.data_dir, mirror=args.mirror, progress=not args.no_progress)
    return 0


def _info(args: argparse.Namespace) -> int:
    d = resolve_data_dir(args.data_dir)
    print(f"data directory: {d}{'' if d.is_dir() else ' (missing)'}")
    print(f"cache directory: {resolve_cache_dir()}")
    for line in info_lines(d):
        print(line)
    return 0


def info_lines(d: Path) -> list[str]:
    """One line per expected file: size and counts, or 'missing', or the reading error."""
    lines = ["wikitext2:"]
    for split, name in wikitext.SPLIT_FILES.items():
        lines.append(_describe(d / wikitext.SUBDIR / name, _wikitext_counts))
    lines.append("conll2003:")
    for names in conll.SPLIT_FILES.values():
        found = [d / conll.SUBDIR / n for n in names if (d / conll.SUBDIR / n).is_file()]
        lines.append(_describe(found[0] if found else d / conll.SUBDIR / names[0], _conll_counts))
    lines.append("squad:")
    for name in (squad.TRAIN_FILE, squad.DEV_FILE):
        lines.append(_describe(d / squad.SUBDIR / name, _squad_counts))
    return lines


def _describe(path: Path, counts) -> str:
    if not path.is_file():
        return f"  {path}  missing"
    try:
        detail = counts(path)
    except MoeLensError as e:
        detail = f"ERROR {e}"
    return f"  {path}  {path.stat().st_size:,} bytes  {detail}"


def _wikitext_counts(path: Path) -> str:
    p = wikitext.read_wikitext(path)
    return f"{p.meta['lines']:,} lines, {len(p.tokens):,} tokens, {p.meta['articles']:,} articles"


def _conll_counts(path: Path) -> str:
    p = conll.read_conll(path)
    return f"{p.meta['documents']:,} documents, {p.meta['sentences']:,} sentences, {len(p.tokens):,} tokens"


def _squad_counts(path: Path) -> str:
    sf = squad.read_squad(path)
    return f"{len(sf.titles):,} articles, {len(sf.contexts):,} paragraphs, {len(sf.questions):,} questions"
