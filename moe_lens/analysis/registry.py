"""The analyses, registered once: name -> function, the `moe_lens/sql/*.sql` files it runs, a one-line
description, and where it is shown (`moe-lens figure` kinds, `moe-lens report`, app pages).

`moe-lens figure` takes its kinds from here, `moe-lens report --help` names the analyses it prints, and
tests/test_analysis_registry.py checks every entry against the code: each .sql file belongs to an analysis
or to HELPER_SQL, each registered file exists and is loaded by its function, each page listed here calls the
analysis (and no page calls an unregistered one). A new analysis is one .sql file, one function in a module
of this package, and one line below (docs/architecture.md).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import pandas as pd

from moe_lens.analysis.ablation import ablation, ablation_by, ablation_importance
from moe_lens.analysis.balance import capacity, collapse, load_balance, router_confidence
from moe_lens.analysis.compare import compare, final_metrics, metric_curves
from moe_lens.analysis.depth import coactivation, layer_transitions, recorded_layers, routing_paths
from moe_lens.analysis.literature import consecutive, fluctuation, saturation, vocabulary
from moe_lens.analysis.specialization import contexts, specialization
from moe_lens.analysis.probe_routing import pos_probe
from moe_lens.analysis.stability import agreement, stability


class Analysis(NamedTuple):
    name: str                        # the function's name in `moe_lens.analysis`, and the app's `ui.get(name)`
    fn: Callable[..., pd.DataFrame]  # fn(con, runs, **options) -> a small DataFrame
    sql: tuple[str, ...]             # its moe_lens/sql/<name>.sql files (stems); helpers below are not repeated
    about: str                       # one line, for --help and docs
    figures: tuple[str, ...] = ()    # `moe-lens figure KIND` kinds drawn from it (builders in moe_lens/figures.py)
    report: bool = False             # `moe-lens report` prints it
    pages: tuple[str, ...] = ()      # app pages calling it (moe_lens.app_pages names)


ANALYSES: tuple[Analysis, ...] = (
    Analysis("load_balance", load_balance, ("load_balance", "load_balance_summary"),
             "per-expert token share and gate importance; CV^2, max/mean, Gini (Shazeer et al. 2017)",
             report=True, pages=("load_balance", "compare")),
    Analysis("collapse", collapse, ("load_balance", "collapse"),
             "normalised entropy, effective experts exp(H), dead experts, never top-1, collapse step",
             figures=("collapse", "collapse-curve"), report=True,
             pages=("collapse", "layers", "compare", "literature")),
    Analysis("router_confidence", router_confidence, ("router_confidence",),
             "mean top-1 gate, top-1 minus top-2 margin, mean router entropy", report=True, pages=("compare",)),
    Analysis("capacity", capacity, ("capacity",),
             "dropped-token rate where a capacity factor is set (Fedus et al. 2021)", pages=("compare",)),
    Analysis("specialization", specialization, ("specialization",),
             "P(expert | attribute), lift, MI, NMI, AMI, uncertainty coefficient, exact chance NMI",
             figures=("specialization", "nmi"), report=True, pages=("specialization", "compare", "literature")),
    Analysis("stability", stability, ("stability", "stability_sorted"),
             "top-1 changes between epochs, same expert for adjacent tokens"),
    Analysis("agreement", agreement, ("agreement",),
             "top-1 agreement between two runs on the same tokens (raw, relabelled, MI, NMI, AMI)"),
    Analysis("final_metrics", final_metrics, ("final_metrics",),
             "the last value of each scalar metric per run and split", report=True, pages=("runs",)),
    Analysis("metric_curves", metric_curves, ("metric_curves",),
             "scalar training curves, long format", pages=("runs",)),
    Analysis("compare", compare, (),
             "one row per run: config, final metrics and the analyses above at its last epoch, ranked by AMI",
             pages=("compare",)),
    Analysis("contexts", contexts, ("contexts",),
             "example contexts of a token routed to an expert", pages=("specialization",)),
    Analysis("routing_paths", routing_paths, ("routing_paths",),
             "paths of top-1 experts over the MoE layers: entropy, distinct paths, NMI/AMI with POS",
             pages=("layers",)),
    Analysis("layer_transitions", layer_transitions, ("layer_transitions",),
             "P(expert at layer b | expert at layer a) and its NMI/AMI", pages=("layers",)),
    Analysis("coactivation", coactivation, ("coactivation",),
             "P(j | i) of expert pairs within a token's top-k", figures=("coactivation",), pages=("layers", "literature")),
    Analysis("recorded_layers", recorded_layers, ("recorded_layers",),
             "the MoE layers each run recorded (the app's layer picker)", pages=("layers",)),
    Analysis("consecutive", consecutive, ("consecutive",),
             "same top-1 expert for consecutive tokens, top-1 in the next token's top-2, vs chance (Mixtral, Table 5)",
             figures=("consecutive",), pages=("literature",)),
    Analysis("saturation", saturation, ("saturation",),
             "each epoch's top-1 match and top-k overlap with the final epoch, vs chance (OLMoE router saturation)",
             figures=("saturation",), pages=("literature",)),
    Analysis("vocabulary", vocabulary, ("vocabulary",),
             "share of each token type routed to its most frequent expert, vs chance (OLMoE vocabulary specialization)",
             figures=("vocabulary",), pages=("literature",)),
    Analysis("fluctuation", fluctuation, ("fluctuation", "epoch_steps"),
             "last epoch each token's top-1 changed; share still changing after 20/50/80% (StableMoE)",
             figures=("fluctuation",), pages=("literature",)),
    Analysis("pos_probe", pos_probe, ("probe_routing",),
             "logistic-regression POS probe from routing vs majority-tag-per-word and majority class (Antoine et al. 2024)",
             figures=("pos-probe",), pages=("specialization",)),
    Analysis("ablation", ablation, ("ablation_units",),
             "per-expert mean delta-loss when the expert is removed at the router (`moe-lens ablate`)",
             figures=("ablation",), pages=("load_balance",)),
    Analysis("ablation_by", ablation_by, ("ablation_by",),
             "mean delta-loss of each ablated expert per POS tag or frequency band", pages=("load_balance",)),
    Analysis("ablation_importance", ablation_importance, ("ablation_units", "ablation_routing"),
             "Spearman rank correlation of causal importance with observed load, importance and specialization",
             figures=("ablation-importance",), pages=("load_balance",)),
)

# .sql files that are building blocks of several analyses rather than an analysis of their own.
HELPER_SQL: dict[str, str] = {
    "run_datasets": "'run|dataset' keys an analysis covers (analysis/_query.py)",
    "last_epochs": "each (run, dataset)'s last recorded epoch in a split (analysis/_query.py)",
    "epochs": "the recorded epochs of one run, dataset and split (stability)",
    "unk_ids": "the unknown-token id of runs without an in_vocab column (specialization)",
    "recorded_layers": "the MoE layers a run recorded (stability over every layer)",
    "collapse_units": "collapse's expert counts per document or sentence (analysis.bootstrap)",
    "specialization_units": "specialization's contingency counts per document or sentence (analysis.bootstrap)",
    "routing_counts": "routing rows per (step, layer, expert, rank): the per-run summaries, or the balance analyses' scan",
}

BY_NAME: dict[str, Analysis] = {a.name: a for a in ANALYSES}
assert len(BY_NAME) == len(ANALYSES), "analysis names are unique"

# `moe-lens figure` kinds, in registry order, with the analysis each one draws.
FIGURE_KINDS: dict[str, str] = {kind: a.name for a in ANALYSES for kind in a.figures}


def analysis(name: str) -> Analysis:
    """The registered analysis called `name`; ValueError naming the allowed ones otherwise."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown analysis {name!r} (analyses: {', '.join(BY_NAME)})") from None
