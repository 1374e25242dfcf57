"""Specialization: expert x POS / frequency band / dataset (share P(e|v) or lift), NMI and AMI per run against
the exact expected NMI under permutation (and one shuffled attribute), MI, NMI and AMI with 95% bootstrap intervals
over documents (`analysis.bootstrap`; a checkbox, on by default for a few runs), and for one expert its top tokens
with example contexts (`analysis.specialization`)."""
from __future__ import annotations

import html

import numpy as np
import plotly.express as px
import streamlit as st

import lens_ui as ui
from moe_lens import analysis

st.title("Specialization")
names = ui.runs_table()["run"].tolist()
c1, c2, c3, c4 = st.columns(4)
OPEN = "wikitext2-importance"  # the README's finding 3: a balanced router's POS experts
run = c1.selectbox("Run", names, index=names.index(OPEN) if OPEN in names else ui.first_routed(names), key="spec_run")
attribute = c2.selectbox("Attribute", ["pos_tag", "freq_band", "dataset", "ner_tag", "position_band"], key="spec_attr")
value = c3.radio("Colour", ["log2 lift", "share"], horizontal=True, key="spec_value",
                 help="log2 lift = log2(P(expert | value) / P(expert)): 0 = chance, +1 = twice as often; "
                      "share = P(expert | value), dominated by each expert's overall load")
split = c4.selectbox("Split", ["valid", "train", "test"], key="spec_split")
kw = dict(split=split, layer=ui.layer())
shuffled = st.toggle("Shuffled-attribute baseline for the NMI (a second pass over the traces: slower on big runs)",
                     value=False, key="spec_shuffled")  # fmt: skip
include_oov = st.toggle("Include tokens outside the model's vocabulary (<unk> to the model)", value=False,
                        key="spec_oov")  # fmt: skip
kw["include_oov"] = include_oov

# one query serves the heatmap and the NMI; without the shuffled baseline it is one join of routing with tokens
full = ui.get("specialization", names, attribute=attribute, shuffled=shuffled, **kw)
df = None if full is None or full[full["run"] == run].empty else full[full["run"] == run]
if df is None and full is not None:
    st.info(f"Run `{run}` has no routing rows with a {attribute} in {split}.")
if df is not None:
    if value == "share":
        z = df.pivot_table(index="expert", columns="value", values="p_expert_given_value", aggfunc="sum").fillna(0.0)
        scale, mid = "Viridis", None
    else:  # an expert never seen with a value has lift 0: shown at the colour scale's floor, -4
        z = np.log2(df.pivot_table(index="expert", columns="value", values="lift", aggfunc="sum")
                    .fillna(0.0).clip(lower=2.0**-4))
        scale, mid = "RdBu_r", 0.0
    z = z[sorted(z.columns, key=lambda v: -df[df["value"] == v]["n_value"].iloc[0])]  # frequent values first
    fig = px.imshow(z, aspect="auto", origin="lower", color_continuous_scale=scale, color_continuous_midpoint=mid,
                    labels=dict(x=attribute, y="expert", color=value), title=f"{run}: expert x {attribute} ({value})")
    ui.show(fig, "spec-heatmap")

st.subheader("NMI and AMI per run against chance, and the mutual information beside them")
ci = ui.intervals_toggle(len(names), "spec_ci")
if full is not None:
    measures = ["nmi", "ami", "nmi_shuffled", "nmi_chance"] if shuffled else ["nmi", "ami", "nmi_chance"]
    keys = ["run", "dataset", "layer"]
    nmi = full.drop_duplicates(keys)[[*keys, *measures, "mi"]]
    if ci:  # MI, NMI, AMI intervals resampling documents (cached per run and trace fingerprint)
        boot = ui.bootstrap("specialization", names, attribute=attribute, summary=True, shuffled=False, stored=True,
                            **kw)  # stored per run set: `moe-lens summarize` writes the default view's
        if boot is not None:
            nmi = nmi.merge(boot[[*keys, *(f"{m}_{s}" for m in ("mi", "nmi", "ami") for s in ("lo", "hi"))]],
                            on=keys, how="left")  # fmt: skip
    n1, n2 = st.columns(2)
    with n1:
        ui.interval_bars(nmi, [(m, m) for m in measures], f"NMI and AMI (expert; {attribute}) vs "
                         f"{'one shuffle and ' if shuffled else ''}the expected NMI under permutation"
                         + (f" (95% intervals, n={ui.BOOTSTRAP_N})" if ci else ""), "spec-nmi", yaxis="value")
    # a collapsed router scores a high normalised score on little information: MI (nats) tells them apart
    with n2:
        ui.interval_bars(nmi.sort_values("mi"), [("mi", "mi")], f"MI(expert; {attribute}) in nats", "spec-mi",
                         yaxis="nats")

st.subheader("POS probe from routing (Antoine et al. 2024)")
if st.toggle("Fit a logistic-regression POS probe on this run's routing (held-out documents; a few seconds)",
             value=False, key="spec_probe"):  # fmt: skip
    probe = ui.get("pos_probe", run, split=split)
    if probe is not None:
        bars = px.bar(probe, x="method", y="accuracy", error_y=probe["accuracy_hi"] - probe["accuracy"],
                      error_y_minus=probe["accuracy"] - probe["accuracy_lo"], range_y=[0, 1],
                      title=f"{run}: POS accuracy from routing vs the word and class baselines (95% intervals)")  # fmt: skip
        ui.show(bars, "spec-probe")
        st.dataframe(probe, hide_index=True)

st.subheader("One expert: top tokens and contexts")
if df is None or not st.toggle("Show the top tokens of an expert (one more pass over the traces)", value=False,
                               key="spec_top"):  # fmt: skip
    st.stop()
experts = sorted(df["expert"].unique().tolist())
e1, e2 = st.columns(2)
expert = e1.selectbox("Expert", experts, key="spec_expert")
min_count = e2.number_input("Min. occurrences", min_value=1, value=5, key="spec_min_count")
# counts, shares and lift only: shuffled=False skips the shuffled-NMI baseline, about half the query's work
top = ui.get("specialization", run, attribute="token", top=15, order_by="lift", min_count=int(min_count),
             shuffled=False, **kw)
if top is None or top[top["expert"] == expert].empty:
    st.info(f"Expert {expert} has no token seen at least {min_count} times.")
    st.stop()
mine = top[top["expert"] == expert].sort_values("lift", ascending=False)
st.dataframe(mine[["value", "n", "n_value", "p_expert_given_value", "lift"]].rename(columns={"value": "token"}),
             hide_index=True, key="spec_top_tokens")
token = st.selectbox("Token", mine["value"].tolist(), key="spec_token")
con, lock = ui.connection()
with lock:
    ctx = analysis.contexts(con, run, split=split, layer=ui.layer(), expert=int(expert), token=token)
for hit, rows in ctx.groupby("hit"):
    words = [f"<mark><b>{html.escape(t)}</b></mark>" if i == hit else html.escape(t)
             for i, t in zip(rows["token_idx"], rows["token"])]
    st.markdown(f"`{hit}` … " + " ".join(words) + " …", unsafe_allow_html=True)
