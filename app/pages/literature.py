"""Literature: the routing analyses of the MoE papers on your runs, each beside its chance level, with 95%
bootstrap intervals over documents (`analysis.bootstrap`): Mixtral's consecutive-token routing (`consecutive`),
OLMoE's router saturation (`saturation`) and vocabulary specialization (`vocabulary`), StableMoE's routing
fluctuation (`fluctuation`), co-activation within the top-k (`coactivation`), and the headline effective experts
(`collapse`) and POS NMI/AMI (`specialization`) with their intervals.

Every table is read from the runs' stored copy when current (`stored=True`: moe_lens.summary.stored_frame, exactly
the analysis's table, keyed by the runs' part files and the code), which `moe-lens summarize` writes for the default
view (summarize_cli.literature_calls) and any other view writes on its first computation: the default render does
not scan the trace (docs/sql.md, 'Summaries')."""
from __future__ import annotations

import plotly.express as px
import streamlit as st

import lens_ui as ui
from moe_lens.literature_figures import coactivation_figure

st.title("Literature")
runs = ui.pick_runs(key="runs_literature", limit=None, prefer=ui.STORY_RUNS)
c1, c2, c3 = st.columns(3)
split = c1.selectbox("Split", ["valid", "test"], key="literature_split")
by = c2.selectbox("Resample", ["document", "sentence"], key="literature_by",
                  help="bootstrap unit: documents (articles, -DOCSTART- documents) or sentences (lines, examples)")
n = int(c3.number_input("Bootstrap replicates", min_value=20, max_value=1000, value=200, step=20, key="literature_n"))
layer = ui.layer()
BOOT = dict(by=by, n=n, split=split, layer=layer)


st.subheader("Consecutive tokens (Mixtral, Table 5)")
within = st.radio("Pairs within the same", ["document", "sentence"], horizontal=True, key="literature_within")
con = ui.bootstrap("consecutive", runs, within=within, stored=True, **BOOT)
if con is not None:
    ui.interval_bars(con, [("same_top1", "same top-1"), ("same_top1_chance", "chance sum p_i^2"),
               ("top1_in_next_top2", "top-1 in next top-2"), ("top1_in_next_top2_chance", "chance (top-2)")],
         f"Consecutive tokens with the same expert, layer {layer}", "literature-consecutive")
    st.dataframe(con, hide_index=True, key="literature_consecutive_table")

st.subheader("Router saturation (OLMoE)")
sat = ui.bootstrap("saturation", runs, by=by, n=n, split=split, layer=layer, stored=True)
if sat is not None:
    fig = px.line(sat, x="epoch", y="top1_match", color="run", markers=True, error_y=sat["top1_match_hi"] - sat["top1_match"],
                  error_y_minus=sat["top1_match"] - sat["top1_match_lo"],
                  title=f"Top-1 match with the final epoch's routing, layer {layer} (dotted: chance)")
    for run, d in sat.groupby("run"):
        fig.add_scatter(x=d["epoch"], y=d["top1_match_chance"], mode="lines", line_dash="dot", name=f"{run} chance")
    ui.show(fig, "literature-saturation")
    st.dataframe(sat, hide_index=True, key="literature_saturation_table")

st.subheader("Vocabulary specialization (OLMoE)")
m = int(st.number_input("Token types seen at least", min_value=1, value=20, key="literature_min_count"))
voc = ui.bootstrap("vocabulary", runs, min_count=m, stored=True, **BOOT)
if voc is not None:
    ui.interval_bars(voc, [("mean_share", "share to the top expert (mean over types)"),
               ("mean_share_chance", "chance (experts drawn from p)")],
         f"Share of a token type's occurrences on its most frequent expert, layer {layer}", "literature-vocabulary")
    st.dataframe(voc, hide_index=True, key="literature_vocabulary_table")
    top = ui.get("vocabulary", runs[:1], split=split, layer=layer, min_count=m, summary=False, top=5, stored=True)
    if top is not None:
        st.caption(f"`{runs[0]}`: each expert's 5 types with the largest share")
        st.dataframe(top[["expert", "token", "n", "share"]], hide_index=True, key="literature_vocabulary_top")

st.subheader("Routing fluctuation (StableMoE)")
fl = ui.get("fluctuation", runs, split=split, layer=layer, stored=True)
if fl is not None:
    long = fl.melt(id_vars="run", value_vars=["changing_after_20", "changing_after_50", "changing_after_80"],
                   var_name="after", value_name="share")
    ui.show(px.bar(long, x="after", y="share", color="run", barmode="group",
                   title=f"Tokens whose top-1 still changes after 20/50/80% of training, layer {layer}"),
            "literature-fluctuation")
    st.dataframe(fl, hide_index=True, key="literature_fluctuation_table")

st.subheader("Co-activation within the top-k")
co_run = st.selectbox("Run", runs, key="literature_co_run")
co = ui.get("coactivation", co_run, split=split, layer=layer)
if co is None or co.empty:
    st.info("No expert pairs: this run routes each token to one expert (top-1).")
else:
    ui.show(coactivation_figure(co, f"P(j in the top-k | i in the top-k), {co_run}, layer {layer}"),
            "literature-coactivation")

st.subheader("Headline numbers with 95% intervals")
col = ui.bootstrap("collapse", runs, by=by, n=n, split=split, layer=layer, fn_options=(("by", "epoch"),), stored=True)
spec = ui.bootstrap("specialization", runs, by=by, n=n, split=split, layer=layer, summary=True, stored=True)
if col is not None:
    last = col.sort_values("epoch").groupby("run", as_index=False).last()
    ui.interval_bars(last, [("effective_experts", "effective experts exp(H)")], "Effective experts (last epoch, top-1)",
         "literature-collapse")
if spec is not None:
    ui.interval_bars(spec, [("nmi", "NMI(expert; POS)"), ("ami", "AMI(expert; POS)")], "POS specialization (last epoch)",
         "literature-specialization")
