"""Layers: how routing differs by depth in a run with several MoE layers. Per-layer collapse and POS
specialization side by side, the most frequent routing paths (top-1 experts over the layers), the transition
heatmap P(expert at layer b | expert at layer a) and the co-activation heatmap P(j | i) within a token's top-k
(`analysis.collapse`, `routing_paths`, `layer_transitions`, `coactivation`)."""
from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

import lens_ui as ui
from moe_lens.literature_figures import coactivation_figure

st.title("Layers")
table = ui.runs_table()
names = table["run"].tolist()
deep = [r for r in names if len(ui.recorded_layers(r)) > 1]
c1, c2, c3 = st.columns(3)
run = c1.selectbox("Run", names, index=names.index(deep[0]) if deep else 0, key="layers_run",
                   help="runs with several MoE layers: --num-layers and --moe-layers")
split = c2.selectbox("Split", ["valid", "train", "test"], key="layers_split")
layers = ui.recorded_layers(run)
paths = ui.get("routing_paths", run, split=split)
if paths is None:
    st.stop()
datasets = sorted(paths["dataset"].unique())
own = table.set_index("run")["dataset"].get(run)
dataset = c3.selectbox("Dataset", datasets, index=datasets.index(own) if own in datasets else 0, key="layers_dataset",
                       help="a probe dataset recorded into the same split is its own group")
paths = paths[paths["dataset"] == dataset]

st.subheader("Per layer: collapse and POS specialization")
by_layer = []
for layer in layers:
    col = ui.get("collapse", run, split=split, by="epoch", layer=layer)
    if col is not None and not col.empty:
        last = col.sort_values("epoch").iloc[-1]
        by_layer.append(dict(layer=layer, effective_experts=last["effective_experts"],
                             norm_entropy=last["norm_entropy"], dead_experts=last["dead_experts"]))
per = pd.DataFrame(by_layer, columns=["layer", "effective_experts", "norm_entropy", "dead_experts"])
spec = paths[paths["layer"].notna()][["layer", "nmi", "ami", "entropy"]].astype({"layer": int})
per = per.merge(spec, on="layer", how="outer").rename(columns={"nmi": "nmi_pos", "ami": "ami_pos"})
left, right = st.columns(2)
with left:
    ui.show(px.bar(per, x="layer", y="effective_experts", title="Effective experts exp(H) by layer"), "layers-collapse")
with right:
    long = per.melt(id_vars="layer", value_vars=["nmi_pos", "ami_pos"], var_name="measure", value_name="value")
    ui.show(px.bar(long, x="layer", y="value", color="measure", barmode="group",
                   title="POS specialization by layer (NMI, AMI)"), "layers-specialization")
st.dataframe(per, hide_index=True, key="layers_per_layer")

st.subheader("Routing paths")
whole = paths[paths["layer"].isna()]
if len(layers) < 2:
    st.info(f"`{run}` has one MoE layer: no paths, transitions across layers need --moe-layers with two or more.")
else:
    p = whole.iloc[0]
    st.markdown(f"{int(p['tokens']):,} tokens, {int(p['distinct']):,} distinct paths over {len(layers)} layers; "
                f"path entropy {p['entropy']:.3f} nats; NMI(path; POS) {p['nmi']:.3f}, AMI {p['ami']:.3f}.")
    top = ui.get("routing_paths", run, split=split, summary=False, top=20)
    if top is not None:
        st.dataframe(top[top["dataset"] == dataset][["path", "n", "share"]], hide_index=True, key="layers_paths")
    a, b = st.columns(2)
    layer_a = a.selectbox("From layer", layers, index=0, key="layers_a")
    layer_b = b.selectbox("To layer", layers, index=1, key="layers_b")
    if layer_a == layer_b:
        st.info("Choose two different layers.")
    else:
        tr = ui.get("layer_transitions", run, split=split, layer_a=layer_a, layer_b=layer_b)
        if tr is not None and not tr[tr["dataset"] == dataset].empty:
            tr = tr[tr["dataset"] == dataset]
            z = tr.pivot_table(index="expert_a", columns="expert_b", values="p_b_given_a", fill_value=0.0)
            s = tr.iloc[0]
            heat = px.imshow(z, origin="lower", color_continuous_scale="Viridis", zmin=0, zmax=1,
                             labels=dict(x=f"expert at layer {layer_b}", y=f"expert at layer {layer_a}",
                                         color="P(b | a)"),
                             title=f"P(layer {layer_b} expert | layer {layer_a} expert): "
                                   f"NMI {s['nmi']:.3f}, AMI {s['ami']:.3f}")
            ui.show(heat, "layers-transitions")

st.subheader("Co-activation within a token's top-k")
co_layer = st.selectbox("Layer", layers, key="layers_co_layer")
co = ui.get("coactivation", run, split=split, layer=co_layer)
co = co[co["dataset"] == dataset] if co is not None else None
if co is None or co.empty:
    st.info("No expert pairs: this layer routes each token to one expert (top-1).")
else:
    ui.show(coactivation_figure(co, f"P(j in the top-k | i in the top-k), layer {co_layer}"), "layers-coactivation")
