"""The standard analyses of routing traces, one function per question, each returning a small DataFrame.

Every function takes a connection from `moe_lens.store.connect`, runs one of the `moe_lens/sql/*.sql`
queries in DuckDB with named parameters, and returns the aggregated result (never the trace itself).
Every group, window and join key includes `dataset`: `dataset=None` analyses each run's own dataset
(config.json), a name selects a probe dataset, '*' gives each dataset its own rows.
Each is registered once, with its SQL files and where the CLI, report and app use it, in `analysis/registry.py`.
Formulas are in each function's docstring, the .sql file and docs/sql.md (each metric defined once there):

- `load_balance`       per-expert token share and gate importance; CV^2, max/mean, Gini (Shazeer et al. 2017)
- `collapse`           normalised entropy, effective number of experts exp(H), dead experts, never_top1, collapse step
- `router_confidence`  mean top-1 gate, top-1 minus top-2 margin, mean router entropy
- `specialization`     P(expert | attribute), lift, MI, NMI, AMI, uncertainty coefficient, exact chance NMI
- `stability`          top-1 changes between epochs, same expert for adjacent tokens
- `agreement`          top-1 agreement between two runs on the same tokens (raw, relabelled, MI, NMI, AMI)
- `capacity`           dropped-token rate where a capacity factor is set, train by default (Fedus et al. 2021)
- `final_metrics`, `compare`  the last metric values, and all of the above across runs in one table (ranked by AMI)
- `metric_curves`      scalar training curves (long format), for plotting
- `contexts`           example contexts of a token routed to an expert (the app's top-tokens view)
- `routing_paths`, `layer_transitions`, `coactivation`  across MoE layers: paths of top-1 experts (entropy,
                       distinct paths, NMI/AMI with POS against each layer's), P(b | a) between two layers,
                       P(j | i) within a token's top-k (analysis/depth.py)
- `consecutive`, `saturation`, `vocabulary`, `fluctuation`  the literature's routing analyses with chance levels:
                       Mixtral's consecutive-token routing, OLMoE's router saturation and vocabulary specialization,
                       StableMoE's routing fluctuation (analysis/literature.py)
- `pos_probe`          POS probe from routing (logistic regression) vs word and class baselines (probe_routing.py)
- `ablation`, `ablation_by`, `ablation_importance`  causal importance from `moe-lens ablate`: mean delta-loss per
                       expert, per POS tag / frequency band, rank correlation with load and specialization
- `bootstrap`          a 95% percentile interval per output row, resampling documents or sentences (bootstrap.py)
"""
from __future__ import annotations

from moe_lens.analysis.bootstrap import bootstrap
from moe_lens.analysis.ablation import ablation, ablation_by, ablation_importance
from moe_lens.analysis.balance import capacity, collapse, load_balance, router_confidence
from moe_lens.analysis.compare import compare, final_metrics, metric_curves
from moe_lens.analysis.literature import consecutive, fluctuation, saturation, vocabulary
from moe_lens.analysis.depth import PATH_ATTRIBUTES, coactivation, layer_transitions, recorded_layers, routing_paths
from moe_lens.analysis.specialization import ATTRIBUTES, POSITION_BANDS, contexts, specialization
from moe_lens.analysis.probe_routing import pos_probe
from moe_lens.analysis.stability import agreement, agreement_scores, stability

__all__ = ["load_balance", "collapse", "router_confidence", "capacity", "specialization", "stability",
           "agreement", "agreement_scores", "final_metrics", "compare", "metric_curves", "contexts",
           "ATTRIBUTES", "POSITION_BANDS", "routing_paths", "layer_transitions", "coactivation", "recorded_layers", "PATH_ATTRIBUTES",
           "bootstrap", "consecutive", "saturation", "vocabulary", "fluctuation",
           "pos_probe", "ablation", "ablation_by", "ablation_importance"]
