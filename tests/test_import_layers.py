"""Imports in moe_lens run one way, down the pipeline (docs/architecture.md):

    base (errors, config, atomic writes, run-file reading, information measures)
      -> data -> moe -> models -> tasks / train / record -> store -> analysis -> report / figures / app / CLI

Every `import` and `from ... import` of every moe_lens module is parsed with ast, at any depth (function-level
imports and `if TYPE_CHECKING:` blocks included), and an import of a module on a higher layer fails. A module
may import its own layer. A new module fails until it is given a layer below.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "moe_lens"
LAYERS = ["base", "data", "moe", "models", "train", "store", "analysis", "top"]

# module (or package: it covers its submodules) -> layer; the longest matching prefix wins ("moe_lens" is the
# package's __init__ only, so a new top-level module has no layer until it is given one)
LAYER_OF = {
    "moe_lens.errors": "base",
    "moe_lens.config": "base",
    "moe_lens.config_help": "base",     # RunConfig's fields as --help text
    "moe_lens.atomic": "base",          # temp-then-rename writes
    "moe_lens.clock": "base",           # UTC timestamps
    "moe_lens.health": "base",          # strict run.json/config.json reading, damage scan: errors only
    "moe_lens.information": "base",     # entropy, MI, NMI, AMI on count tables (numpy)
    "moe_lens.data": "data",
    "moe_lens.moe": "moe",
    "moe_lens.models": "models",
    "moe_lens.tasks": "train",
    "moe_lens.train": "train",
    "moe_lens.train_cli": "train",      # `moe-lens train/record/runs`
    "moe_lens.record": "train",
    "moe_lens.rundir": "train",
    "moe_lens.resume": "train",
    "moe_lens.stats_window": "train",
    "moe_lens.distributed": "train",    # torchrun: process group, each rank's data share, all-reduces
    "moe_lens.probe": "train",          # a trained model over a probe dataset, recorded
    "moe_lens.synthetic": "train",      # writes runs in the recorder's layout (tests, benchmarks)
    "moe_lens.capture": "train",        # `moe-lens capture`: Hugging Face MoE routing through the Recorder
    "moe_lens.ablate": "train",         # `moe-lens ablate`: a checkpoint evaluated with experts removed
    "moe_lens.store": "store",
    "moe_lens.summary": "store",        # per-run routing summaries the balance analyses read
    "moe_lens.analysis": "analysis",
    "moe_lens.projection": "analysis",  # PCA/UMAP of recorded hidden states
    "moe_lens.report": "top",
    "moe_lens.figures": "top",
    "moe_lens.literature_figures": "top",  # figure kinds of the literature's analyses
    "moe_lens.app_cli": "top",
    "moe_lens.summarize_cli": "top",    # `moe-lens summarize`: summaries and the layers page's stored results
    "moe_lens.analyze_cli": "top",      # `moe-lens analyze NAME RUN...` over the analysis registry
    "moe_lens.app_pages": "top",
    "moe_lens.cli": "top",              # imports the command modules by name (COMMAND_MODULES)
    "moe_lens.__main__": "top",         # `python -m moe_lens` (what torchrun -m runs per rank)
    "moe_lens": "top",                  # the package facade: `moe_lens.connect` re-exports store.connect
}

# Same-layer imports that still must not happen: the issue-20 back-edges, kept out for good.
FORBIDDEN = {
    ("moe_lens.rundir", "moe_lens.record"): "the atomic writers live in moe_lens.atomic",
    ("moe_lens.record", "moe_lens.models"): "the recorder takes traces; MoETrace is imported for its type only",
}

# Allowed exceptions to the layering, each with its reason. None today.
ALLOWED: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def layer(module: str) -> str:
    for prefix in sorted(LAYER_OF, key=len, reverse=True):
        if module == prefix or (prefix != "moe_lens" and module.startswith(prefix + ".")):
            return LAYER_OF[prefix]
    raise KeyError(module)


def _type_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside `if TYPE_CHECKING:` blocks."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported moe_lens module, line, type only) for every import in `module`, at any depth."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    typing_only = _type_only(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..y import z
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from pkg import sub` imports the submodule; `from pkg import name` the package
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        out += [(n, node.lineno, id(node) in typing_only) for n in names if n == "moe_lens" or n.startswith("moe_lens.")]
    return out


def test_every_module_has_a_layer() -> None:
    missing = []
    for m in MODULES:
        try:
            layer(m)
        except KeyError:
            missing.append(m)
    assert not missing, f"give these modules a layer in LAYER_OF: {missing}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_back_edge(module: str) -> None:
    here = LAYERS.index(layer(module))
    bad = []
    for target, line, _ in imports(module):
        if target == module or (module, target) in ALLOWED:
            continue
        there = LAYERS.index(layer(target))
        if there > here:
            bad.append(f"{MODULES[module].name}:{line}: {module} ({layer(module)}) imports {target} ({layer(target)})")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("pair", sorted(FORBIDDEN))
def test_forbidden_runtime_import(pair: tuple[str, str]) -> None:
    module, target = pair
    found = [line for t, line, type_only in imports(module) if t == target and not type_only]
    assert not found, f"{module} imports {target} at line(s) {found}: {FORBIDDEN[pair]}"


def test_the_checker_sees_function_level_and_relative_imports(tmp_path: Path, monkeypatch) -> None:
    """A test that cannot fail is a defect: back-edges hidden in a function or written relative are caught."""
    probe = tmp_path / "_layer_probe.py"
    probe.write_text("def f():\n    from moe_lens.analysis import collapse\n    from .. import store\n")
    monkeypatch.setitem(MODULES, "moe_lens.data._layer_probe", probe)
    assert {t for t, _, _ in imports("moe_lens.data._layer_probe")} == {"moe_lens.analysis", "moe_lens.store"}
    with pytest.raises(AssertionError, match=r"_layer_probe.py:2: .* imports moe_lens.analysis \(analysis\)"):
        test_no_back_edge("moe_lens.data._layer_probe")
