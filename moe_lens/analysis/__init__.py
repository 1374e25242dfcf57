"""The standard analyses of routing traces, one function per question, each returning a small DataFrame.

Every function takes a connection from `moe_lens.store.connect`, runs one of the `moe_lens/sql/*.sql`
queries in DuckDB with named parameters, and returns the aggregated result (never the trace itself).
Formulas are in each function's docstring, the .sql file and docs/sql.md:

- `load_balance`       per-expert token share and gate importance; CV^2, max/mean, Gini (Shazeer et al. 2017)
- `collapse`           normalised entropy, effective number of experts exp(H), dead experts, collapse step
- `router_confidence`  mean top-1 gate, top-1 minus top-2 margin, mean router entropy
- `specialization`     P(expert | attribute), lift, NMI with a shuffled-attribute baseline and analytic chance
- `stability`          top-1 changes between epochs, same expert for adjacent tokens
- `agreement`          top-1 agreement between two runs on the same tokens (raw, relabelled, NMI)
- `capacity`           dropped-token rate where a capacity factor is set (Fedus et al. 2021)
- `final_metrics`, `compare`  the last metric values, and all of the above across runs in one table
- `metric_curves`      scalar training curves (long format), for plotting
- `contexts`           example contexts of a token routed to an expert (the app's top-tokens view)
"""
from __future__ import annotations

from moe_lens.analysis.balance import capacity, collapse, load_balance, router_confidence
from moe_lens.analysis.compare import compare, final_metrics, metric_curves
from moe_lens.analysis.specialization import ATTRIBUTES, POSITION_BANDS, contexts, specialization
from moe_lens.analysis.stability import agreement, agreement_scores, stability

__all__ = ["load_balance", "collapse", "router_confidence", "capacity", "specialization", "stability",
           "agreement", "agreement_scores", "final_metrics", "compare", "metric_curves", "contexts",
           "ATTRIBUTES", "POSITION_BANDS"]
